"""The recipe's actor forward as the rollout runs it: FSDP2-sharded, its weights gathered per forward or once.

The recipe shards the actor with FSDP2 even on one GPU (fp32 master weights, forwards in bf16). A sharded
model's forward all-gathers each block's weights, casting them to bf16 (on one GPU a copy and a cast of all
weights per forward); ``srpo_rl.distributed.gathered``, which ``collect_rollouts`` enters, gathers them once
per rollout. For each batch size, the median of ``--repeats`` calls of ``model.action_logits``:

- ``plain``: the model before sharding, in the compute dtype (bf16 on CUDA), as a plain module: what the
  benchmarks' pool runs (eager here, no CUDA graph);
- ``sharded``: the sharded model, every forward gathering (the rollout before ``gathered``);
- ``gathered``: the same model inside ``gathered(model)``; ``vs sharded`` is its speed over that row's, ``vs
  plain`` the plain module's over it (below 1: FSDP2's hooks and casts cost the forward that much).

The pool's batches are small (3-10 rows on average in the GPU runs), where a forward's launches weigh most: the
default batch sizes start at 1.

    python benchmarks/fsdp_inference.py            # OpenVLA-OFT-7B, random weights, fp32 master, bf16, CUDA
    python benchmarks/fsdp_inference.py --tiny     # the tiny checkpoint on the CPU (a one-process gloo group)

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
import torch.distributed as dist
from tensordict import NonTensorStack, TensorDict

from _common import command, machine, versions
from policy_latency import INSTRUCTIONS, seven_b_policy, timed

from srpo_rl.distributed import DistInfo, gathered, shard_actor
from srpo_rl.models.openvla_oft import write_tiny_checkpoint
from srpo_rl.policy import OpenVLAOFTPolicy


def inputs(policy: OpenVLAOFTPolicy, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt ids, mask and pixel values of ``batch`` random frames with LIBERO-10 instructions."""
    g = torch.Generator().manual_seed(batch)
    obs = TensorDict({("observation", "image"): torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8,
                                                              generator=g),
                      "instruction": NonTensorStack(*(INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)))},
                     [batch])
    prepared = policy.preprocess(obs)
    return prepared["prompt_ids"], prepared["prompt_mask"], policy.pixel_values(prepared["policy_image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoint on the CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10 CUDA, 5 CPU)")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type != "cuda" and not args.tiny:
        sys.exit("the 7B benchmark needs a CUDA device; pass --tiny to check the script on the CPU")
    repeats = args.repeats or (10 if device.type == "cuda" else 5)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if args.tiny:
        path = tempfile.mkdtemp(prefix="tiny_openvla_oft_")
        write_tiny_checkpoint(path)
        policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32)
        name, precision = "tiny OpenVLA-OFT (random)", "fp32"
    else:
        torch.cuda.set_device(device)
        policy = seven_b_policy(device)
        name, precision = "OpenVLA-OFT-7B (random)", "bf16"
    plain, unsharded = {}, policy.model.eval()
    with torch.no_grad():  # the same weights as a plain module in the compute dtype, before they are sharded
        for batch in args.batch_sizes:
            ids, mask, pixels = inputs(policy, batch)
            plain[batch] = timed(lambda: unsharded.action_logits(ids, mask, pixels), device, 1, repeats)
    policy.model.float()  # the recipe's fp32 master weights
    model = shard_actor(policy.model.eval(), DistInfo(0, 1, 0, device), mixed_precision=precision)

    rows = []
    with torch.no_grad():  # as the rollout (FSDP2 does not run under inference_mode)
        for batch in args.batch_sizes:
            ids, mask, pixels = inputs(policy, batch)
            forward = lambda: model.action_logits(ids, mask, pixels)  # noqa: E731
            sharded_ms, sharded_gib = timed(forward, device, 1, repeats)
            with gathered(model):
                gathered_ms, gathered_gib = timed(forward, device, 1, repeats)
            rows.append({"batch": batch, "plain_ms": plain[batch][0], "sharded_ms": sharded_ms,
                         "gathered_ms": gathered_ms, "vs_sharded": sharded_ms / gathered_ms,
                         "vs_plain": plain[batch][0] / gathered_ms, "plain_peak_gib": plain[batch][1],
                         "sharded_peak_gib": sharded_gib, "gathered_peak_gib": gathered_gib})
    dist.destroy_process_group()

    print(f"\n{name}: FSDP2 on one process, fp32 master weights, forward in {precision}, {device.type}, "
          f"median of {repeats}")
    print(f"{'batch':>5} {'plain ms':>9} {'sharded ms':>11} {'gathered ms':>12} {'vs sharded':>11} {'vs plain':>9} "
          f"{'peak GiB (sh / ga)':>19}")
    for r in rows:
        print(f"{r['batch']:>5} {r['plain_ms']:>9.1f} {r['sharded_ms']:>11.1f} {r['gathered_ms']:>12.1f} "
              f"{r['vs_sharded']:>10.2f}x {r['vs_plain']:>8.2f}x {r['sharded_peak_gib']:>9.2f} / "
              f"{r['gathered_peak_gib']:.2f}")
    print(json.dumps({"benchmark": "fsdp_inference", "model": name, "compute_dtype": precision,
                      "device": device.type, "repeats": repeats, "results": rows,
                      "baseline": "the same sharded model, every forward gathering its weights; and the plain module",
                      "machine": machine(device), "versions": versions(("torch", "transformers")),
                      "command": command()}))


if __name__ == "__main__":
    main()
