"""Training samples/s and peak memory of the SRPO policy update on one GPU, beside the bare ceiling.

A sample is one decision step (one image + prompt -> 56 action tokens). For each micro-batch size
(``traj_mini_batch_size``, decision steps per forward/backward) with gradient checkpointing (as the recipe;
``--no-gradient-checkpointing`` keeps the activations instead) and bf16:

- ``bare``: the model forward + a plain backward on the same inputs (the ceiling): samples/s and the
  peak memory above the resident weights and gradients;
- ``update``: :func:`srpo_rl.trainer.update_policy` with :class:`~srpo_rl.objectives.SRPOLoss` on a
  synthetic trajectory batch (``--trajectories`` x ``--decisions``; old log-probs from a no-grad
  forward, so the ratios start at 1), optimizer step timed apart; ``vs_bare`` is its forward/backward
  rate over the ceiling's.

Memory plans for the 7B actor on one 80 GB GPU (bytes per parameter in brackets):

- ``fp32-master`` (the recipe's FSDP2 default: fp32 weights, fp32 gradients, fp32 AdamW moments
  [16]): counted, not run when it cannot fit;
- ``bf16-adamw``: bf16 weights, gradients and AdamW moments, all on the GPU [8]. Fast, but an update
  smaller than half a bf16 step of the weight rounds away (``changed_fraction`` measures how many
  weights one step at the recipe's learning rate actually moves);
- ``host-adamw``: bf16 weights and gradients on the GPU [4]; fp32 master weights and AdamW moments in
  host memory [12, on the host], the step on the CPU, the new weights copied back
  (:class:`srpo_rl.optim.HostAdamW`, ``actor.fsdp.optimizer_offload=true`` in the recipe): the recipe's
  precision at the price of the host step. Here the model is not FSDP-wrapped, so gradients accumulate in
  bf16; the recipe's FSDP2 accumulates them in fp32 (2 more bytes a parameter on the GPU during a mini-batch);
- ``lora``: rank-32 LoRA adapters (alpha 16) on every linear layer but the head (:mod:`srpo_rl.lora`,
  ``actor.lora_rank=32``), fp32 with fused AdamW on the GPU, the bf16 base weights frozen [2 for the base, 16
  for each adapter parameter]: another training problem (a low-rank update), so it has a ceiling of its own,
  ``bare lora`` (the adapted model's forward + backward, which computes no base-weight gradients), and its
  ``vs_bare`` compares it with that. Run last: it leaves the base frozen;
- ``lora_sum`` (after ``lora``): the same adapters through the library's previous form of their sum
  (``lora_overhead.lora_sum_forward``: in place eager, a plain sum compiled, which Inductor turns into an
  out-of-place ``addmm`` that copies the base product), its own ceiling and update: an A/B of the custom ops
  against it in one run.

    python benchmarks/train_throughput.py            # OpenVLA-OFT-7B random weights, bf16, CUDA
    python benchmarks/train_throughput.py --tiny     # the tiny checkpoint on the CPU (checks the script)

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
import types
from importlib import metadata

import torch
from tensordict import TensorDict

from _common import command, machine, top_kernels

from lora_overhead import lora_sum_forward
from srpo_rl.lora import add_lora, lora_parameters, lora_targets
from srpo_rl.objectives import SRPOLoss
from srpo_rl.optim import HostAdamW
from srpo_rl.trainer import update_policy

LR = 5e-6  # the recipe's actor learning rate
PLANS = ("bf16-adamw", "host-adamw", "lora", "lora_sum")
LORA_RANK, LORA_ALPHA = 32, 16.0  # OpenVLA's LoRA fine-tuning


# -- model and data -----------------------------------------------------------------------------------
def make_policy(tiny: bool, device: torch.device):
    from srpo_rl.policy import OpenVLAOFTPolicy

    if tiny:
        from srpo_rl.models.openvla_oft import write_tiny_checkpoint

        path = tempfile.mkdtemp(prefix="tiny_openvla_oft_")
        write_tiny_checkpoint(path)
        return OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32), "tiny (fp32)"
    from policy_latency import seven_b_policy

    return seven_b_policy(device), "OpenVLA-OFT-7B (bf16, random)"


def trajectory_batch(policy, trajectories: int, decisions: int, device: torch.device, seed: int = 0) -> TensorDict:
    """Trajectories of ``decisions`` executed steps in the layout update_policy reads; old log-probs by the model."""
    g = torch.Generator().manual_seed(seed)
    n, t = trajectories, decisions
    from srpo_rl.envs.suites import suite_info

    names = suite_info("libero_object").instructions
    obs = TensorDict({("observation", "image"): torch.randint(0, 256, (n * t, 3, 256, 256), dtype=torch.uint8,
                                                             generator=g)}, [n * t])
    obs.set_non_tensor("instruction", [names[i // t % len(names)] for i in range(n * t)])
    steps = policy.preprocess(obs).select("policy_image", "prompt_ids", "prompt_mask").to("cpu")
    steps["action_tokens"] = torch.randint(0, 256, (n * t, 8, 7), generator=g)
    with torch.no_grad():
        logps = [policy.log_prob(piece.to(device)).float().cpu() for piece in steps.split(16)]
    steps["action_log_prob"] = torch.cat(logps)
    steps["advantage"] = torch.randn(n * t, generator=g)
    steps["token_mask"] = torch.ones(n * t, 8, 7, dtype=torch.bool)
    steps["mask"] = torch.ones(n * t, dtype=torch.bool)
    return TensorDict({"steps": steps.reshape(n, t), "rollout_id": torch.arange(n)}, [n])


# -- optimizers ---------------------------------------------------------------------------------------
class TimedOptimizer:
    """Times ``step`` (synchronised) of the optimizer update_policy drives."""

    def __init__(self, optimizer, device: torch.device):
        self.optimizer, self.device, self.times = optimizer, device, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.optimizer.step()
        sync(self.device)
        self.times.append(time.perf_counter() - t0)


# -- measurements --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: torch.device) -> float:
    """Resets the peak counter; returns the memory allocated now (GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**30
    return peak_gib(device)


def bare(policy, batch: TensorDict, micro: int, device: torch.device, repeats: int, profile: bool = False) -> dict:
    """Forward + backward of the model alone on ``micro`` samples (gradients accumulate, then are dropped); with
    ``profile``, the CUDA kernels that took the most time in one more of them."""
    model = policy.model
    steps = batch["steps"].reshape(-1)[:micro].to(device)
    ids, mask = steps["prompt_ids"], steps["prompt_mask"]
    used = int(mask.sum(-1).max())
    pixels = policy.pixel_values(steps["policy_image"])

    def once():
        model(ids[:, :used], mask[:, :used], pixels).logsumexp(-1).mean().backward()

    once()
    base = reset_peak(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        once()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = peak_gib(device)
    kernels = top_kernels(once, device, count=20) if profile else None
    model.zero_grad(set_to_none=True)
    seconds = statistics.median(times)
    return {"micro_batch": micro, "seconds": seconds, "samples_per_s": micro / seconds,
            "peak_gib": peak, "peak_above_resident_gib": peak - base} | ({"kernels": kernels} if profile else {})


def update(loss, optimizer, batch: TensorDict, micro: int, device: torch.device, repeats: int) -> dict:
    """update_policy over the whole batch as one mini-batch; the optimizer step is timed apart."""
    timed = TimedOptimizer(optimizer, device)
    samples = int(batch["steps", "mask"].sum())
    update_policy(loss, timed, batch[:1], mini_batch_trajectories=1, traj_mini_batch_size=micro, device=device)
    base = reset_peak(device)
    walls = []
    timed.times.clear()
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        metrics = update_policy(loss, timed, batch, mini_batch_trajectories=batch.batch_size[0],
                                traj_mini_batch_size=micro, device=device)
        sync(device)
        walls.append(time.perf_counter() - t0)
    wall, step = statistics.median(walls), statistics.median(timed.times)
    return {"micro_batch": micro, "samples": samples, "wall_s": wall, "optimizer_step_s": step,
            "samples_per_s": samples / (wall - step), "samples_per_s_with_step": samples / wall,
            "peak_gib": peak_gib(device), "peak_above_start_gib": peak_gib(device) - base,
            "loss": metrics.get("loss_objective"), "grad_norm": metrics.get("grad_norm")}


def changed_fraction(params, before: list[torch.Tensor]) -> float:
    """Fraction of weight elements that the last optimizer step changed at all."""
    changed = sum(int((p.detach() != b.to(p.device)).sum()) for p, b in zip(params, before))
    return changed / sum(p.numel() for p in params)


def run_plan(plan: str, policy, loss, batch, micros, device, repeats, profile: bool = False) -> dict:
    """update_policy under one memory plan at each micro-batch size, and how many weights a step moves."""
    result = {"plan": plan, "rows": []}
    if plan in ("lora", "lora_sum"):  # the last plans: the base weights stay frozen from here on
        if plan == "lora":
            params = add_lora(policy.model, LORA_RANK, LORA_ALPHA)
        else:  # the adapters lora added, through the previous form of their sum
            params = lora_parameters(policy.model)
            for module in policy.model.modules():
                if hasattr(module, "lora_A"):
                    module.forward = types.MethodType(lora_sum_forward, module)
        # its own ceiling: the adapted model's forward + backward, which computes no base-weight gradients
        result["bare"] = [bare(policy, batch, micro, device, repeats, profile) for micro in micros]
    else:
        params = [p for p in policy.model.parameters() if p.requires_grad]
    if plan == "host-adamw":
        optimizer = HostAdamW(params, lr=LR)
    else:  # fused: one kernel, no full-size temporaries (foreach would copy the moments)
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=device.type == "cuda")
    for micro in micros:
        result["rows"].append(update(loss, optimizer, batch, micro, device, repeats))
    # the weights the optimizer keeps: on the GPU (bf16 weights, fp32 adapters), or the fp32 masters on the host
    kept = [optimizer.state[p]["master"] for p in params] if plan == "host-adamw" else params
    probe = kept[len(kept) // 2 : len(kept) // 2 + 8]  # a few decoder weights (or their adapters)
    before = [p.detach().clone() for p in probe]
    update_policy(loss, optimizer, batch[:1], mini_batch_trajectories=1, traj_mini_batch_size=micros[0], device=device)
    result["changed_fraction"] = changed_fraction(probe, before)
    if plan == "host-adamw":
        result["host_gib"] = optimizer.host_bytes() / 2**30
    if plan in ("lora", "lora_sum"):
        result["trainable"] = sum(p.numel() for p in params)
    del optimizer
    policy.model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def memory_plans(policy) -> dict:
    """GiB each plan keeps resident for weights, gradients and optimizer state (activations apart)."""
    total = sum(p.numel() for p in policy.model.parameters())
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    frozen = total - trainable
    gib = 2**30
    return {
        "parameters": total,
        "trainable": trainable,
        "fp32-master": {"gpu_gib": (4 * total + 12 * trainable) / gib, "host_gib": 0.0},
        "bf16-adamw": {"gpu_gib": (2 * total + 6 * trainable) / gib, "host_gib": 0.0},
        "host-adamw": {"gpu_gib": (2 * total + 2 * trainable) / gib, "host_gib": 12 * trainable / gib},
        "fsdp2-cpu-offload": {"gpu_gib": 0.0, "host_gib": (4 * frozen + 16 * trainable) / gib},
        # bf16 base weights, fp32 adapters with gradients and AdamW moments (srpo_rl.lora, every linear layer)
        "lora": {"gpu_gib": (2 * total + 16 * lora_parameter_count(policy.model)) / gib, "host_gib": 0.0},
    }


def lora_parameter_count(model) -> int:
    """The parameters ``add_lora(model, LORA_RANK)`` would add (counted, not added)."""
    return sum(LORA_RANK * (m.in_features + m.out_features) for m in lora_targets(model))


# -- report -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoint on the CPU")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=None, help="default 8 16 32 (tiny 2 4)")
    parser.add_argument("--trajectories", type=int, default=None, help="per update (default 4; tiny 2)")
    parser.add_argument("--decisions", type=int, default=None, help="per trajectory (default 32; tiny 4)")
    parser.add_argument("--plans", default="bf16-adamw,host-adamw,lora",
                        help="lora (then lora_sum, if asked) last: they freeze the base")
    parser.add_argument("--host-micro-batches", type=int, nargs="+", default=None,
                        help="micro-batches of the host-adamw plan, whose every update has a slow host step "
                        "(default 16, the recipe's; tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (tiny 1)")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="the model's blocks compiled (OpenVLAOFT.compile_blocks) in the ceiling and every plan")
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every activation for the backward (the ceiling and every plan) instead of "
                        "recomputing them (actor.enable_gradient_checkpointing=false)")
    parser.add_argument("--profile", action="store_true",
                        help="the top CUDA kernels of one more bare forward + backward (full and LoRA)")
    parser.add_argument("--recipe-samples", type=int, default=1600,
                        help="samples per optimizer step in the recipe (32 trajectories x ~50 decisions)")
    args = parser.parse_args()
    tiny = {"micro_batches": [2, 4], "host_micro_batches": [2], "trajectories": 2, "decisions": 4, "repeats": 1}
    full = {"micro_batches": [8, 16, 32], "host_micro_batches": [16], "trajectories": 4, "decisions": 32,
            "repeats": 3}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    names = args.plans.split(",")
    if unknown := [n for n in names if n not in PLANS]:
        raise SystemExit(f"unknown plan {unknown[0]!r}; choose from {', '.join(PLANS)}")
    adapted = [n for n in names if n.startswith("lora")]
    if adapted not in ([], ["lora"], ["lora", "lora_sum"]) or names[len(names) - len(adapted):] != adapted:
        raise SystemExit("the lora plans freeze the base weights: list lora last, or lora,lora_sum last")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("the 7B benchmark needs a CUDA device; pass --tiny to check the script on the CPU")
    policy, name = make_policy(args.tiny, device)
    if args.compile_blocks:  # the ceiling and every plan then run the compiled blocks
        policy.model.compile_blocks()
        name += ", blocks compiled"
    plans = memory_plans(policy)
    batch = trajectory_batch(policy, args.trajectories, args.decisions, device)
    if args.checkpointing:
        policy.model.gradient_checkpointing_enable()
    policy.model.train()
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28), clip_ratio_c=10000.0)

    bare_rows = [bare(policy, batch, m, device, args.repeats, args.profile) for m in args.micro_batches]
    results = []
    for plan in names:
        if plan == "host-adamw":
            row = run_plan(plan, policy, loss, batch, args.host_micro_batches, device, min(args.repeats, 2))
        else:
            row = run_plan(plan, policy, loss, batch, args.micro_batches, device, args.repeats, args.profile)
        results.append(row)
        print(f"plan {plan} done", file=sys.stderr, flush=True)
    for result in results:
        # the plan's own ceiling where it has one (LoRA's adapted model), else the full model's
        ceiling = {r["micro_batch"]: r["samples_per_s"] for r in result.get("bare", bare_rows)}
        for row in result["rows"]:
            row["vs_bare"] = row["samples_per_s"] / ceiling[row["micro_batch"]]
            # a recipe mini-batch: recipe_samples of forward/backward, then one optimizer step
            recipe_wall = args.recipe_samples / row["samples_per_s"] + row["optimizer_step_s"]
            row["recipe_samples_per_s"] = args.recipe_samples / recipe_wall

    print(f"\n{name} on {device.type}: gradient checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{args.trajectories} trajectories x "
          f"{args.decisions} decisions per update, median of {args.repeats}")
    print(f"{'plan':>12} {'micro':>5} {'samples/s':>9} {'vs bare':>7} {'opt step s':>10} "
          f"{'recipe samples/s':>16} {'peak GiB':>8} {'changed':>8}")
    for r in bare_rows:
        print(f"{'bare fwd+bwd':>12} {r['micro_batch']:>5} {r['samples_per_s']:>9.2f} {'1.00':>7} {'-':>10} "
              f"{'-':>16} {r['peak_gib']:>8.2f} {'-':>8}")
    for result in results:
        for r in result.get("bare", []):
            print(f"{'bare ' + result['plan']:>12} {r['micro_batch']:>5} {r['samples_per_s']:>9.2f} {'1.00':>7} "
                  f"{'-':>10} {'-':>16} {r['peak_gib']:>8.2f} {'-':>8}")
        for row in result["rows"]:
            print(f"{result['plan']:>12} {row['micro_batch']:>5} {row['samples_per_s']:>9.2f} {row['vs_bare']:>7.2f} "
                  f"{row['optimizer_step_s']:>10.2f} {row['recipe_samples_per_s']:>16.2f} {row['peak_gib']:>8.2f} "
                  f"{result['changed_fraction']:>8.3f}")
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    print("resident GiB for weights + gradients + optimizer (activations apart): " + ", ".join(
        f"{k} {v['gpu_gib']:.1f} GPU / {v['host_gib']:.1f} host" for k, v in plans.items() if isinstance(v, dict)))
    profiled = [("full", r) for r in bare_rows] + [(res["plan"], r) for res in results for r in res.get("bare", [])]
    for label, r in profiled:
        if "kernels" in r:
            print(f"\nbare {label}, micro-batch {r['micro_batch']}: {r['kernels']['total_ms']:.1f} ms of kernels")
            for k in r["kernels"]["kernels"]:
                print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {k['name']}")
    print(json.dumps({
        "benchmark": "train_throughput",
        "model": name,
        "device": device.type,
        "gradient_checkpointing": args.checkpointing,
        "update": {"trajectories": args.trajectories, "decisions": args.decisions, "lr": LR,
                   "loss": "SRPOLoss clip (0.2, 0.28), seq-mean-token-mean", "repeats": args.repeats},
        "baseline": "bare model forward + backward at the same micro-batch (the ceiling)",
        "bare": bare_rows,
        "plans": results,
        "memory_plans": plans,
        "gpu_memory_gib": gpu_gib,
        "recipe_samples_per_optimizer_step": args.recipe_samples,
        "machine": machine(device),
        "versions": {name: _version(name) for name in ("torch", "transformers", "torchrl", "tensordict")}
        | {"python": platform.python_version(), "cuda": torch.version.cuda},
        "command": command(),
    }))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
