"""Latency and peak memory of one OpenVLA-OFT policy step, next to its parts measured in the same run.

For each batch size: the whole policy step (JPEG round trip, resize, crop, prompts, one parallel-decoding
forward, sampling at temperature 1.6, decoding), the model forward alone, the two vision towers (+ projector)
alone, and a bare Llama forward (causal, no mask, no LM head) over the same number of tokens. The baseline of
the policy step and of the model forward is "bare Llama + towers"; the target is a ratio of at most 1.2.

    python benchmarks/policy_latency.py            # OpenVLA-OFT-7B, random weights, bf16, CUDA
    python benchmarks/policy_latency.py --tiny     # the tiny checkpoint on the CPU (checks the script)

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time

import tensordict
import torch
import torchrl
import transformers
from tensordict import NonTensorStack, TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from _common import command, machine

from srpo_rl.models.llama_tokenizer import build_tiny_llama_tokenizer
from srpo_rl.models.openvla_oft import OpenVLAOFT, OpenVLAOFTConfig, write_tiny_checkpoint
from srpo_rl.models.openvla_oft_files import preprocessor_config, synthetic_dataset_statistics
from srpo_rl.policy import OpenVLAOFTPolicy, preprocess_images

INSTRUCTIONS = [  # LIBERO-10 instructions: prompts of realistic length
    "put both the alphabet soup and the tomato sauce in the basket",
    "put both the cream cheese box and the butter in the basket",
    "turn on the stove and put the moka pot on it",
    "put the black bowl in the bottom drawer of the cabinet and close it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the book and place it in the back compartment of the caddy",
    "put the white mug on the plate and put the chocolate pudding to the right of the plate",
    "put both the alphabet soup and the cream cheese box in the basket",
    "put both moka pots on the stove",
    "put the yellow and white mug in the microwave and close it",
]


def seven_b_policy(device: torch.device) -> OpenVLAOFTPolicy:
    """OpenVLA-OFT-7B with random weights (N(0, 0.02)) in bf16 on ``device``; tiny tokenizer, synthetic stats."""
    with torch.device("meta"):
        model = OpenVLAOFT(OpenVLAOFTConfig())
    model = model.to(torch.bfloat16).to_empty(device=device)  # cast on meta: 15 GB allocated, not 30
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else (p.fill_(1.0) if "norm" in name or "scale" in name else p.zero_())
    model.reset_rotary_embedding()
    model.norm_stats = synthetic_dataset_statistics()
    return OpenVLAOFTPolicy(model.eval(), build_tiny_llama_tokenizer(), preprocessor_config(), unnorm_key="libero_10")


def timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn()`` and its peak memory in GiB (CUDA: allocated; CPU: process peak RSS)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return statistics.median(times), peak / 2**30


def measure(policy: OpenVLAOFTPolicy, batch: int, warmup: int, repeats: int) -> dict:
    device = policy.model.projector.fc1.weight.device
    model = policy.model
    g = torch.Generator().manual_seed(batch)
    obs = TensorDict(
        {
            ("observation", "image"): torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, generator=g),
            "instruction": NonTensorStack(*(INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch))),
        },
        [batch],
    )
    prepared = policy.preprocess(obs.clone())
    ids, mask = prepared["prompt_ids"], prepared["prompt_mask"]
    pixels = policy.pixel_values(prepared["policy_image"])
    num_patches = model.vision_backbone.num_patches
    tokens = 1 + num_patches + int(mask.sum(1).max()) - 1 + model.config.num_action_tokens + 1
    embeds = torch.randn(batch, tokens, model.language_model.config.hidden_size, device=device, dtype=pixels.dtype)
    embeds = embeds.to(model.projector.fc1.weight.dtype)

    def step():
        policy(obs.clone())

    rows = {}
    with torch.inference_mode(), set_exploration_type(ExplorationType.RANDOM):
        rows["policy_step"] = timed(step, device, warmup, repeats)
        rows["model_forward"] = timed(lambda: model(ids, mask, pixels), device, warmup, repeats)
        rows["towers"] = timed(
            lambda: model.projector(model.vision_backbone(pixels.to(embeds.dtype))), device, warmup, repeats
        )
        rows["bare_llm"] = timed(lambda: model.language_model.model(inputs_embeds=embeds), device, warmup, repeats)
        rows["preprocess"] = timed(
            lambda: preprocess_images(obs["observation", "image"], device=device), device, warmup, repeats
        )
    base = rows["bare_llm"][0] + rows["towers"][0]
    result = {"batch": batch, "tokens_per_sample": tokens}
    for name, (ms, peak) in rows.items():
        result[f"{name}_ms"] = round(ms, 3)
        result[f"{name}_peak_gib"] = round(peak, 3)
    result["bare_llm_plus_towers_ms"] = round(base, 3)
    result["policy_step_vs_llm_plus_towers"] = round(rows["policy_step"][0] / base, 3)
    result["model_forward_vs_llm_plus_towers"] = round(rows["model_forward"][0] / base, 3)
    result["env_steps_per_s"] = round(batch * model.config.num_actions_chunk / (rows["policy_step"][0] / 1e3), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoint on the CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10 CUDA, 3 CPU)")
    parser.add_argument("--attention", default="bidirectional", choices=["bidirectional", "causal"])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    warmup = 3 if device.type == "cuda" else 1
    if args.tiny:
        path = tempfile.mkdtemp(prefix="tiny_openvla_oft_")
        write_tiny_checkpoint(path)
        policy = OpenVLAOFTPolicy.from_pretrained(
            path, unnorm_key="libero_10", dtype=torch.float32, attention=args.attention
        )
        model_name = "tiny OpenVLA-OFT (fp32, random)"
    else:
        if device.type != "cuda":
            sys.exit("the 7B benchmark needs a CUDA device; pass --tiny to check the script on the CPU")
        policy = seven_b_policy(device)
        policy.model.attention = args.attention
        model_name = "OpenVLA-OFT-7B (bf16, random)"

    results = [measure(policy, b, warmup, repeats) for b in args.batch_sizes]

    print(f"{model_name} on {device.type}, attention={args.attention}, median of {repeats} calls")
    columns = [  # (header, result key, format)
        ("batch", "batch", "d"),
        ("tokens", "tokens_per_sample", "d"),
        ("step ms", "policy_step_ms", ".1f"),
        ("fwd ms", "model_forward_ms", ".1f"),
        ("llm ms", "bare_llm_ms", ".1f"),
        ("towers ms", "towers_ms", ".1f"),
        ("prep ms", "preprocess_ms", ".1f"),
        ("step/(llm+tw)", "policy_step_vs_llm_plus_towers", ".2f"),
        ("fwd/(llm+tw)", "model_forward_vs_llm_plus_towers", ".2f"),
        ("peak GiB", "policy_step_peak_gib", ".2f"),
        ("env st/s", "env_steps_per_s", ".0f"),
    ]
    print(" ".join(f"{h:>{max(9, len(h))}}" for h, _, _ in columns))
    for r in results:
        print(" ".join(f"{r[k]:>{max(9, len(h))}{f}}" for h, k, f in columns))
    print(
        json.dumps(
            {
                "benchmark": "policy_latency",
                "model": model_name,
                "attention": args.attention,
                "device": device.type,
                "repeats": repeats,
                "results": results,
                "baseline": "bare Llama forward (causal, no mask, no LM head) over the same tokens"
                " + vision towers with projector",
                "memory": "CUDA: peak allocated per figure; CPU: process peak RSS so far",
                "machine": {**machine(device), "torch_threads": torch.get_num_threads()},
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "torchrl": torchrl.__version__,
                    "tensordict": tensordict.__version__,
                },
                "command": command(),
            }
        )
    )


if __name__ == "__main__":
    main()
