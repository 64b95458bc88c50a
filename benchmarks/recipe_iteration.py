"""One iteration of the full SRPO recipe through ``examples/srpo_libero.py``: time per phase and peak memory.

Random-weight checkpoints are written first in the published formats (OpenVLA-OFT-7B as its Hugging Face
directory, V-JEPA 2 ViT-g/16 as a Hugging Face directory, which serves 384 px and 256 px alike: its position
encoding is rotary) unless they exist; then the example
script runs as a user would run it, with a reduced batch (``--train-batch-size`` groups of 8 rollouts,
``--max-steps`` per episode, one validation pass over every task), and its console lines are read back.
Random weights never succeed, so the accuracy filter is off (every group is trained on; its advantages are
0, the update's cost is the same) and nothing is checkpointed (fp32 weights + AdamW are 90 GB). With
``--forced-successes F LOW HIGH`` a share F of the rollouts (training and validation) is made to succeed at an
env step drawn from [LOW, HIGH] (the scene moved into its goal, as ``rollout_throughput.py`` does): episode
lengths like an SFT policy's, and failed trajectories whose reward V-JEPA computes against real successes.

    python benchmarks/recipe_iteration.py                  # OpenVLA-OFT-7B + ViT-g, one CUDA GPU
    python benchmarks/recipe_iteration.py --tiny           # tiny models on the CPU (checks the script)
    python benchmarks/recipe_iteration.py --gpu-memory-gib 78 --override actor.fsdp.optimizer_offload=true
                                                           # would it fit an 80 GB H100? (on a larger GPU)
    python benchmarks/recipe_iteration.py --train-batch-size 64 --max-steps 512 --forced-successes 0.5 150 400
                                                           # the full iteration, half the rollouts succeeding

Prints a table of the phases, then one JSON line with every logged figure, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import command, machine, versions

PHASES = ("time/rollout", "time/reward_and_advantage", "time/update", "time/validation")
# a cleared progress bar may leave its spaces and a cursor move before the line
LINE = re.compile(r"\[step (\d+)\] (.*)$")
# runs the example after prepare(argv[1] as JSON) in the child process
LAUNCH = ("import json, runpy, sys; options = json.loads(sys.argv.pop(1)); sys.path.insert(0, options['benchmarks']); "
          "import recipe_iteration; recipe_iteration.prepare(options); "
          "runpy.run_module('srpo_rl.examples.srpo_libero', run_name='__main__', alter_sys=True)")


class DrawnSuccessSteps:
    """The env step at which a rollout is made to succeed, or None, drawn from its id and ``seed``.

    The recipe hands out rollout ids as it goes, so each draw depends on the id alone: a share ``fraction``
    of the ids succeeds, at a step uniform in ``[low, high]``. It serves as ``ForcedSuccessEnv``'s
    ``success_step`` mapping (only ``get`` is used).
    """

    def __init__(self, fraction: float, low: int, high: int, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0 or not 1 <= low <= high:
            raise ValueError(f"need 0 <= fraction <= 1 and 1 <= low <= high, got {fraction}, {low}, {high}")
        self.fraction, self.low, self.high, self.seed = fraction, low, high, seed

    def get(self, rollout_id: int, default: int | None = None) -> int | None:
        rng = np.random.default_rng([self.seed, rollout_id % 2**32])
        succeeds, step = rng.random() < self.fraction, int(rng.integers(self.low, self.high + 1))
        return step if succeeds else default


def prepare(options: dict) -> None:
    """In the child process, before the example runs: caps PyTorch's CUDA caching allocator at
    ``gpu_memory_gib`` (past the cap an allocation raises out-of-memory as on a smaller GPU; the CUDA context and
    the env processes' EGL memory are not counted), and builds the env with forced successes."""
    if options.get("gpu_memory_gib") is not None:
        cap = options["gpu_memory_gib"] * 2**30
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    if options.get("forced_successes"):
        from rollout_throughput import ForcedSuccessEnv

        from srpo_rl.examples import utils_srpo

        steps = DrawnSuccessSteps(*options["forced_successes"])
        utils_srpo.make_libero_env = lambda suite, num_envs, **kwargs: ForcedSuccessEnv(
            suite, num_envs, success_step=steps, **kwargs)


def write_checkpoints(root: Path, device: torch.device) -> tuple[Path, Path, float]:
    """The 7B policy and ViT-g reward model with random weights, in their published formats."""
    from reward_throughput import vitg

    from srpo_rl.models.openvla_oft import write_random_checkpoint

    policy_dir, vjepa_dir = root / "openvla_oft_7b_random", root / "vjepa2_vitg_random"
    t0 = time.perf_counter()
    if not (policy_dir / "config.json").exists():
        write_random_checkpoint(policy_dir, device=device)  # the returned model is dropped at once
    if not (vjepa_dir / "config.json").exists():
        vitg(device).save_pretrained(vjepa_dir)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return policy_dir, vjepa_dir, time.perf_counter() - t0


def overrides(args, policy_dir: Path | None, vjepa_dir: Path | None, out: Path) -> list[str]:
    if args.tiny:
        return ["--config-name", "tiny", f"output_dir={out}", "trainer.total_training_steps=1", "trainer.test_freq=1",
                "trainer.save_freq=0", "trainer.num_val_videos=0", "trainer.resume_mode=disable"]
    return [
        f"env={args.suite}", "model=openvla_oft_7b", f"model.path={policy_dir}", f"model.vjepa_path={vjepa_dir}",
        f"env.num_envs={args.num_envs}", f"env.max_steps={args.max_steps}", "env.num_trials_per_task=1",
        f"data.train_batch_size={args.train_batch_size}", f"actor.ppo_mini_batch_size={args.train_batch_size}",
        f"rollout.overlap={args.overlap}",
        "algorithm.embodied_sampling.filter_accuracy=false", "trainer.total_training_steps=1",
        "trainer.save_freq=0", "trainer.test_freq=1", "trainer.val_before_train=false", "trainer.num_val_videos=0",
        "trainer.resume_mode=disable", "trainer.logger=[console,tensorboard]", f"output_dir={out}", *args.override,
    ]


def run_recipe(script: list[str], log_path: Path) -> tuple[dict[str, float], float, int]:
    """Runs the example script, echoing its output; returns the logged scalars of its step lines."""
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}  # less fragmentation at 7B
    with open(log_path, "w") as log, subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1, env=env) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if match := LINE.search(line.strip()):
                metrics.update({k: float(v) for k, v in (kv.split("=", 1) for kv in match.group(2).split())})
    return metrics, time.perf_counter() - t0, proc.returncode


def derived(metrics: dict[str, float], wall: float) -> dict:
    """The figures the table derives: each phase's share of the wall time and of the phases, the start-up, the
    update's samples/s."""
    phases = {name: metrics.get(name) for name in PHASES}
    accounted = sum(v for v in phases.values() if v is not None)
    return {
        "phases_total_s": accounted,
        "startup_s": wall - accounted,
        "share_of_wall": {name: v / wall for name, v in phases.items() if v is not None},
        "share_of_phases": {name: v / accounted for name, v in phases.items() if v is not None and accounted},
        "update_samples_per_s": (metrics["train/samples"] / metrics["time/update"]
                                 if metrics.get("time/update") and "train/samples" in metrics else None),
    }


def print_table(metrics: dict[str, float], wall: float, setup_s: float) -> None:
    phases = {name: metrics.get(name, float("nan")) for name in PHASES}
    accounted = sum(v for v in phases.values() if v == v)
    print(f"\nOne SRPO iteration through examples/srpo_libero.py ({wall:.1f} s in all, {accounted:.1f} s in its phases)")
    print(f"{'phase':<34} {'seconds':>8} {'share':>6} {'of phases':>9}")
    for name, seconds in phases.items():
        print(f"{name:<34} {seconds:>8.1f} {100 * seconds / wall:>5.1f}% {100 * seconds / accounted:>8.1f}%")
    print(f"{'start-up (load models, build envs)':<34} {wall - accounted:>8.1f} {100 * (wall - accounted) / wall:>5.1f}%")
    print(f"rollout: {metrics.get('rollout/trajectories', 0):.0f} trajectories, "
          f"{metrics.get('rollout/env_steps_per_s', float('nan')):.1f} env-steps/s "
          f"(env wait {metrics.get('time/rollout_env', float('nan')):.1f} s, "
          f"policy {metrics.get('time/rollout_policy', float('nan')):.1f} s; "
          f"{metrics.get('rollout/policy_calls', float('nan')):.0f} policy calls of "
          f"{metrics.get('rollout/mean_batch', float('nan')):.1f} rows on average)")
    if metrics.get("rollout/policy_gpu_share"):  # CUDA events: none on the CPU
        print(f"the forwards kept the GPU busy {100 * metrics['rollout/policy_gpu_share']:.1f} % of the rollout")
    if "train/samples" in metrics:
        print(f"update: {metrics['train/samples']:.0f} samples (decision steps x epochs), "
              f"{metrics['train/samples'] / metrics['time/update']:.2f} samples/s, "
              f"{metrics.get('train/optimizer_steps', float('nan')):.0f} optimizer steps")
    if "memory/peak_allocated_gib" in metrics:
        print(f"peak GPU memory through rollout, reward and update: {metrics['memory/peak_allocated_gib']:.1f} GiB "
              f"allocated, {metrics['memory/peak_reserved_gib']:.1f} GiB reserved")
    print(f"writing the random checkpoints beforehand: {setup_s:.1f} s")


def embedding_img_size(args) -> int:
    """V-JEPA's input side in this run: the last ``embodied.embedding_img_size`` override, else the config's."""
    sizes = [o.split("=", 1)[1] for o in args.override if o.startswith("embodied.embedding_img_size=")]
    if sizes:
        return int(sizes[-1])
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/config/config.yaml").read_text())
    return int(config["embodied"]["embedding_img_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the README's main job)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoints and run folder (default: a temp dir)")
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=128)
    parser.add_argument("--train-batch-size", type=int, default=4, help="groups of rollout.n=8 rollouts")
    parser.add_argument("--overlap", choices=("true", "false", "halves"), default="true",
                        help="rollout.overlap: true = asynchronous env pool (the default), false = one round of all slots at a time")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for the script")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="cap PyTorch's GPU memory at this many GiB (an 80 GB H100 holds about 78 beside its context)")
    parser.add_argument("--forced-successes", nargs=3, type=float, default=None, metavar=("FRACTION", "LOW", "HIGH"),
                        help="make this share of the rollouts succeed at an env step drawn from [LOW, HIGH]")
    args = parser.parse_args()
    if args.forced_successes is not None:
        fraction, low, high = args.forced_successes
        try:
            args.forced_successes = [fraction, int(low), int(high)]
            DrawnSuccessSteps(*args.forced_successes)
        except ValueError as error:
            parser.error(f"--forced-successes: {error}")

    out = args.out or Path(tempfile.mkdtemp(prefix="srpo_recipe_"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("the full-size iteration needs a CUDA device; pass --tiny to check the script on the CPU")
    policy_dir = vjepa_dir = None
    setup_s = 0.0
    if not args.tiny:
        policy_dir, vjepa_dir, setup_s = write_checkpoints(out, device)
    if args.gpu_memory_gib is not None and device.type != "cuda":
        sys.exit("--gpu-memory-gib caps a CUDA device's memory; this run has none")
    options = {"benchmarks": str(Path(__file__).resolve().parent), "gpu_memory_gib": args.gpu_memory_gib,
               "forced_successes": args.forced_successes}
    script = [sys.executable, "-c", LAUNCH, json.dumps(options), *overrides(args, policy_dir, vjepa_dir, out / "run")]
    print("running:", " ".join(script), flush=True)
    metrics, wall, code = run_recipe(script, out / "recipe.log")
    if code != 0:
        sys.exit(f"the example script failed with exit code {code} (log: {out / 'recipe.log'})")
    print_table(metrics, wall, setup_s)
    print(json.dumps({
        "benchmark": "recipe_iteration",
        "policy": ("tiny (fp32)" if args.tiny else "OpenVLA-OFT-7B (random, bf16 compute; FSDP2, "
                                                       "or plain with LoRA on one GPU)")
        + (f", overrides: {' '.join(args.override)}" if args.override else ""),
        "forced_successes": args.forced_successes,
        "reward_model": "tiny V-JEPA 2" if args.tiny else f"V-JEPA 2 ViT-g/16 {embedding_img_size(args)}px fp16 (random)",
        "suite": "libero_object" if args.tiny else args.suite,
        "wall_s": wall,
        "checkpoint_writing_s": setup_s,
        "gpu_memory_cap_gib": args.gpu_memory_gib,
        "phases_s": {name: metrics.get(name) for name in PHASES},
        "derived": derived(metrics, wall),
        "metrics": metrics,
        "machine": machine(device),
        "versions": versions(),
        "command": command(),
    }))


if __name__ == "__main__":
    main()
