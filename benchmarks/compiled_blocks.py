"""The 7B's forward and forward+backward with its blocks compiled (``OpenVLAOFT.compile_blocks``) against eager.

Every figure is measured in one run on one model (random weights, bf16): first eager, then the same model
after ``compile_blocks()``:

- ``kernels``: where the eager batch-``--profile-batch`` forward spends its GPU time, from the profiler's
  kernel list: matrix products (cuBLAS / CUTLASS kernels), attention, and everything else (norms, the rotary
  embedding, activations, residual adds, copies), with the forward's FLOPs (``FlopCounterMode``) over the
  matrix products' time;
- ``forward``: the inference forward (``model(ids, mask, pixels)``) at each ``--batches`` size, eager op by op
  and through the policy's CUDA graphs (:class:`srpo_rl.cuda_graphs.GraphedActionLogits`, how the rollout runs
  it), in env-steps/s (batch x 8 / time);
- ``train``: forward + backward with gradient checkpointing at micro-batch ``--micro`` (the update's unit),
  samples/s and peak memory;
- ``compiled``: the same after ``compile_blocks()``, the first call's time (the compilation), the largest
  logit difference to the eager forward, and Dynamo's count of compiled graphs.

    python benchmarks/compiled_blocks.py               # OpenVLA-OFT-7B random weights, bf16, CUDA
    python benchmarks/compiled_blocks.py --tiny        # the tiny checkpoint on the CPU (checks the script)

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter

import torch
from tensordict import NonTensorStack, TensorDict

from _common import command, machine, versions
from policy_latency import timed
from train_throughput import make_policy, sync

_GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_", re.IGNORECASE)
_ATTENTION = re.compile(r"fmha|flash|attention|attn|cudnn", re.IGNORECASE)


def model_inputs(policy, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt ids, prompt mask, pixel values)`` of ``batch`` random frames with LIBERO instructions."""
    from policy_latency import INSTRUCTIONS

    g = torch.Generator().manual_seed(batch)
    obs = TensorDict({
        ("observation", "image"): torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, generator=g),
        "instruction": NonTensorStack(*(INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch))),
    }, [batch])
    prepared = policy.preprocess(obs)
    mask = prepared["prompt_mask"]
    used = int(mask.sum(1).max())
    return prepared["prompt_ids"][:, :used], mask[:, :used], policy.pixel_values(prepared["policy_image"])


def median_ms(fn, device: torch.device, repeats: int) -> float:
    return timed(fn, device, warmup=1, repeats=repeats)[0]


def kernel_split(model, inputs, device: torch.device) -> dict:
    """GPU time of one eager inference forward by kind of kernel, and its FLOPs over the matrix products' time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        model(*inputs)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(*inputs)
            sync(device)
        with FlopCounterMode(display=False) as flops:
            model(*inputs)
    us = Counter()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kind = "gemm" if _GEMM.search(event.name) else "attention" if _ATTENTION.search(event.name) else "other"
            us[kind] += event.time_range.elapsed_us()
    total_ms = sum(us.values()) / 1e3
    gemm_ms = us["gemm"] / 1e3
    return {
        "batch": int(inputs[0].shape[0]), "kernel_ms": round(total_ms, 3),
        **{f"{kind}_ms": round(us[kind] / 1e3, 3) for kind in ("gemm", "attention", "other")},
        **{f"{kind}_share": round(us[kind] / 1e3 / total_ms, 4) for kind in ("gemm", "attention", "other")},
        "tflop": round(flops.get_total_flops() / 1e12, 3),
        "tflop_per_s_in_gemm": round(flops.get_total_flops() / 1e12 / (gemm_ms / 1e3), 1) if gemm_ms else None,
    }


def forward_rows(policy, batches, device: torch.device, repeats: int, reference=None) -> tuple[list, dict]:
    """Eager and graphed forward times per batch; the logits, and their largest difference to ``reference``."""
    from srpo_rl.cuda_graphs import GraphedActionLogits

    model, rows, logits = policy.model, [], {}
    chunk = model.config.num_actions_chunk
    graphed = GraphedActionLogits(model) if device.type == "cuda" else None
    for batch in batches:
        ids, mask, pixels = model_inputs(policy, batch)
        lengths = mask.sum(1)
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits[batch] = model(ids, mask, pixels).float()
            sync(device)
            row = {"batch": batch, "first_call_s": round(time.perf_counter() - t0, 3),
                   "eager_ms": round(median_ms(lambda: model(ids, mask, pixels), device, repeats), 3)}
        if graphed is not None:
            with torch.no_grad():
                row["graph_ms"] = round(median_ms(lambda: graphed(ids, lengths, pixels), device, repeats), 3)
                graph_logits = graphed(ids, lengths, pixels)[0].float()
            row["graph_vs_eager_max_abs_logit_diff"] = (graph_logits - logits[batch]).abs().max().item()
        best = min(row.get("graph_ms", row["eager_ms"]), row["eager_ms"])
        row["env_steps_per_s"] = round(batch * chunk / (best / 1e3), 1)
        if reference is not None:
            row["max_abs_logit_diff_vs_eager"] = (logits[batch] - reference[batch]).abs().max().item()
        rows.append(row)
    return rows, logits


def train_row(policy, micro: int, device: torch.device, repeats: int) -> dict:
    """Forward + backward with gradient checkpointing on ``micro`` samples; gradients dropped after each.

    In training mode, as the update runs: transformers checkpoints the decoder layers only then.
    """
    model = policy.model
    ids, mask, pixels = model_inputs(policy, micro)
    model.gradient_checkpointing_enable()
    model.train()

    def once():
        model(ids, mask, pixels).logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    once()
    sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(once, device, repeats)
    model.gradient_checkpointing_disable()
    model.eval()
    row = {"micro_batch": micro, "first_call_s": round(first, 3), "ms": round(ms, 3),
           "samples_per_s": round(micro / (ms / 1e3), 3)}
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"frames_ok": counters["frames"]["ok"], "frames_total": counters["frames"]["total"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (checks the script)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="forward batch sizes (default 8 16 32)")
    parser.add_argument("--micro", type=int, default=None, help="forward+backward micro-batch (default 16)")
    parser.add_argument("--profile-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 5; tiny 2)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: its default)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        parser.exit(1, "the 7B benchmark needs a CUDA device; pass --tiny to check the script on the CPU\n")
    batches = args.batches or ([2] if args.tiny else [8, 16, 32])
    micro = args.micro or (2 if args.tiny else 16)
    repeats = args.repeats or (2 if args.tiny else 5)
    torch.manual_seed(0)
    policy, name = make_policy(args.tiny, device)

    result = {"benchmark": "compiled_blocks", "policy": name, "mode": args.mode or "default"}

    def record(key: str, value) -> None:  # printed as it comes: a run cut off by a time limit still shows it
        result[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)

    if device.type == "cuda":
        record("kernels_eager", kernel_split(policy.model, model_inputs(policy, args.profile_batch), device))
    eager, reference = forward_rows(policy, batches, device, repeats)
    record("eager", eager)
    record("train_eager", train_row(policy, micro, device, repeats))

    options = {"mode": args.mode} if args.mode else {}
    policy.model.compile_blocks(**options)
    record("compiled", forward_rows(policy, batches, device, repeats, reference)[0])
    record("train_compiled", train_row(policy, micro, device, repeats))
    if device.type == "cuda":
        record("kernels_compiled", kernel_split(policy.model, model_inputs(policy, args.profile_batch), device))
    result["dynamo"] = dynamo_counts()
    result["compiled_vs_eager"] = {
        **{f"forward_b{e['batch']}": round(min(e.get("graph_ms", e["eager_ms"]), e["eager_ms"])
                                           / min(c.get("graph_ms", c["eager_ms"]), c["eager_ms"]), 3)
           for e, c in zip(result["eager"], result["compiled"], strict=True)},
        "train": round(result["train_compiled"]["samples_per_s"] / result["train_eager"]["samples_per_s"], 3),
    }

    print(f"{'':<10}{'batch':>6}{'eager ms':>10}{'graph ms':>10}{'env-steps/s':>13}{'logit diff':>12}")
    for label in ("eager", "compiled"):
        for row in result[label]:
            print(f"{label:<10}{row['batch']:>6}{row['eager_ms']:>10.1f}{row.get('graph_ms', float('nan')):>10.1f}"
                  f"{row['env_steps_per_s']:>13.1f}{row.get('max_abs_logit_diff_vs_eager', 0.0):>12.2e}")
    for label in ("train_eager", "train_compiled"):
        row = result[label]
        print(f"{label:<16} micro {row['micro_batch']}: {row['samples_per_s']:.2f} samples/s, "
              f"peak {row.get('peak_gib', float('nan')):.1f} GiB, first call {row['first_call_s']:.1f} s")
    for label in ("kernels_eager", "kernels_compiled"):
        if label in result:
            k = result[label]
            print(f"{label}: {k['kernel_ms']:.1f} ms of kernels: gemm {k['gemm_share']:.0%}, attention "
                  f"{k['attention_share']:.0%}, other {k['other_share']:.0%}; {k['tflop_per_s_in_gemm']} TFLOP/s in gemm")
    print("compiled / eager (time ratio, >1 = faster):", result["compiled_vs_eager"], "dynamo:", result["dynamo"])
    result.update(machine=machine(device), versions=versions(), command=command())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
