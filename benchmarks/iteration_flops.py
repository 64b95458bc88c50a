"""What one iteration of the recipe costs in FLOPs, phase by phase, and the V-JEPA reward's share of it.

The full-size models (OpenVLA-OFT-7B, V-JEPA 2 ViT-g/16) are built on PyTorch's meta device, so nothing is
allocated and no GPU is needed; ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the operations
that actually run:

- ``rollout``: one policy forward per decision (a chunk of 8 actions), the prompt of ``--prompt-tokens`` tokens
  (``<s>`` and a LIBERO instruction in OpenVLA's prompt) with one image's 256 patches and the 56 action slots;
- ``update``: forward + backward of every decision once (``ppo_epochs: 1``; the old log-probabilities are the
  rollout's), under each memory plan: every weight trained or rank-32 LoRA, with gradient checkpointing
  (the recipe's ``enable_gradient_checkpointing: true``, which recomputes the forward) or without;
- ``reward``: one V-JEPA 2 forward per trajectory (``embedding_num_frames`` frames at ``embedding_img_size``).

An iteration is ``--trajectories`` trajectories (the recipe: 64 groups x 8) of ``--decisions`` decisions each
(default: the issue's SFT-like workload, half the rollouts succeeding at a step drawn in [150, 400] and the
others running to 512 steps). If every phase ran at the same FLOP rate, the reward's share of the wall time
would be its share of the FLOPs; the last column says how many times faster per FLOP than the other phases the
reward would have to run to take under ``--target`` of the wall time (with no GPU time left idle to hide it in).

    python benchmarks/iteration_flops.py                     # the recipe (384 px) and 256 px reward frames
    python benchmarks/iteration_flops.py --embedding-img-sizes 384 --trajectories 512

Prints a table, then one JSON line with every count, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import command, machine, versions

CHUNK = 8
PLANS = {  # name: (LoRA rank or 0, gradient checkpointing)
    "full, checkpointed (the recipe)": (0, True),
    "full, no checkpointing": (0, False),
    "LoRA 32, checkpointed": (32, True),
    "LoRA 32, no checkpointing": (32, False),
}


def sft_like_decisions(max_steps: int = 512, first: int = 150, last: int = 400) -> float:
    """Mean decisions per trajectory when half succeed at a step uniform in ``[first, last]`` and half run on."""
    succeeding = sum(math.ceil(step / CHUNK) for step in range(first, last + 1)) / (last - first + 1)
    return 0.5 * succeeding + 0.5 * math.ceil(max_steps / CHUNK)


def tflop(fn, per: int) -> float:
    """TFLOP of ``fn()`` divided by ``per`` (its batch)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / per / 1e12


def policy_tflop(prompt_tokens: int, batch: int = 2) -> dict[str, float]:
    """TFLOP of one decision: the rollout's forward, then forward + backward under each plan."""
    from srpo_rl.lora import add_lora
    from srpo_rl.models.openvla_oft import OpenVLAOFT

    with torch.device("meta"):
        model = OpenVLAOFT().to(torch.bfloat16)
        ids = torch.zeros(batch, prompt_tokens, dtype=torch.long)
        lengths = torch.full((batch,), prompt_tokens)
        pixels = torch.empty(batch, 6, 224, 224)  # one image: DINOv2's and SigLIP's 3 channels each
    logits = lambda: model.logits_from_lengths(ids, lengths, pixels)  # noqa: E731
    with torch.no_grad():
        out = {"rollout": tflop(logits, batch)}
    model.train()
    # LoRA freezes the base weights for good: the full plans first
    for name, (rank, checkpointing) in sorted(PLANS.items(), key=lambda item: item[1][0]):
        if rank and not any(hasattr(m, "lora_A") for m in model.modules()):
            add_lora(model, rank)
        (model.gradient_checkpointing_enable if checkpointing else model.gradient_checkpointing_disable)()
        out[name] = tflop(lambda: logits().sum().backward(), batch)
    return out


def reward_tflop(img_size: int, num_frames: int) -> float:
    """TFLOP of embedding one trajectory with V-JEPA 2 ViT-g/16 (the recipe's encoder)."""
    from transformers import VJEPA2Config, VJEPA2Model

    config = VJEPA2Config(
        patch_size=16, crop_size=img_size, frames_per_clip=num_frames, tubelet_size=2, hidden_size=1408,
        num_attention_heads=22, num_hidden_layers=40, mlp_ratio=48 / 11, pred_num_hidden_layers=0,
    )
    with torch.device("meta"):
        encoder = VJEPA2Model(config)
        clip = torch.empty(1, num_frames, 3, img_size, img_size)
    encoder.set_attn_implementation("sdpa")
    with torch.no_grad():
        return tflop(lambda: encoder(clip, skip_predictor=True), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=512, help="per iteration (64 groups x 8)")
    parser.add_argument("--decisions", type=float, default=None,
                        help="mean policy forwards per trajectory (default: the SFT-like workload, see above)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="<s> + the instruction's prompt tokens")
    parser.add_argument("--embedding-img-sizes", type=int, nargs="+", default=[384, 256])
    parser.add_argument("--num-frames", type=int, default=64, help="V-JEPA frames per trajectory")
    parser.add_argument("--target", type=float, default=0.05, help="the reward's share of the wall time aimed at")
    args = parser.parse_args()
    if not 0 < args.target < 1:
        parser.error(f"--target must be in (0, 1), got {args.target}")
    decisions = args.decisions if args.decisions is not None else sft_like_decisions()

    per_decision = policy_tflop(args.prompt_tokens)
    per_clip = {size: reward_tflop(size, args.num_frames) for size in args.embedding_img_sizes}
    rollout = per_decision["rollout"] * decisions * args.trajectories / 1e3  # PFLOP
    rows = []
    for plan in PLANS:
        update = per_decision[plan] * decisions * args.trajectories / 1e3
        for size, clip in per_clip.items():
            reward = clip * args.trajectories / 1e3
            share = reward / (rollout + update + reward)
            # the reward at k times the others' FLOP rate takes reward / k of the time: under the target when
            # k > reward / others * (1 - target) / target
            needed = reward / (rollout + update) * (1 - args.target) / args.target
            rows.append({"plan": plan, "embedding_img_size": size, "rollout_pflop": rollout,
                         "update_pflop": update, "reward_pflop": reward, "reward_share": share,
                         "reward_speed_needed": needed})

    print(f"One iteration: {args.trajectories} trajectories x {decisions:.2f} decisions; per decision: forward "
          f"{per_decision['rollout']:.2f} TFLOP; per trajectory's V-JEPA clip ({args.num_frames} frames): "
          + ", ".join(f"{clip:.1f} TFLOP at {size} px" for size, clip in per_clip.items()))
    print(f"{'update plan':<32} {'px':>4} {'fwd+bwd TFLOP':>13} {'rollout PF':>10} {'update PF':>9} "
          f"{'reward PF':>9} {'reward share':>12} {'speed for <' + format(args.target, '.0%'):>13}")
    for row in rows:
        print(f"{row['plan']:<32} {row['embedding_img_size']:>4} {per_decision[row['plan']]:>13.2f} "
              f"{row['rollout_pflop']:>10.1f} {row['update_pflop']:>9.1f} {row['reward_pflop']:>9.1f} "
              f"{row['reward_share']:>12.1%} {row['reward_speed_needed']:>12.2f}x")
    print(json.dumps({"benchmark": "iteration_flops", "trajectories": args.trajectories, "decisions": decisions,
                      "prompt_tokens": args.prompt_tokens, "num_frames": args.num_frames, "target": args.target,
                      "tflop_per_decision": per_decision, "tflop_per_clip": per_clip, "rows": rows,
                      "machine": machine(), "versions": versions(), "command": command()}))


if __name__ == "__main__":
    main()
