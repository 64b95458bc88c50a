"""Peak host memory of stacking a rollout's trajectories into one zero-padded batch (``collect_rollouts``' last step).

Each trajectory keeps its decision steps (policy image, tokens, log-probs, the env's outputs) at its own length;
the batch pads them to the longest. ``before``: what ``srpo_rl.rollout`` did until now (a padded copy of every
trajectory, then ``torch.stack`` of those: three copies of the images alive at the peak); ``library``:
``srpo_rl.rollout._stack_trajectories`` as it is (each trajectory written into one preallocated padded batch).
Each runs in a fresh process on the same synthetic trajectories (uint8 ``3 x 224 x 224`` policy images, lengths
drawn between the SFT-like workload's 19 and 64 chunks); the figure is the process's peak resident memory
(``ru_maxrss``) above what it held once the trajectories were built.

    python benchmarks/stack_memory.py                       # 128 trajectories
    python benchmarks/stack_memory.py --trajectories 512    # the recipe's batch (64 groups x 8)

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from tensordict import TensorDict

from _common import command, machine, versions

WAYS = ("before", "library")


def trajectories(count: int, image_size: int, seed: int = 0) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for rollout_id in range(count):
        n = int(torch.randint(19, 65, (), generator=g))
        steps = TensorDict({
            "policy_image": torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g),
            "prompt_ids": torch.zeros(n, 256, dtype=torch.long),
            "action_tokens": torch.zeros(n, 8, 7, dtype=torch.long),
            "action_log_prob": torch.zeros(n, 8, 7),
            "mask": torch.ones(n, dtype=torch.bool),
        }, batch_size=[n])
        rows.append(TensorDict({"rollout_id": torch.tensor(rollout_id), "steps": steps}, batch_size=[]))
    return rows


def stack_before(rows: list[TensorDict]) -> TensorDict:
    """The baseline: pad each trajectory (a copy), then stack the padded copies (another)."""
    longest = max(row["steps"].batch_size[0] for row in rows)

    def pad(steps):
        missing = longest - steps.batch_size[0]
        zeros = steps[:1].apply(lambda x: x.new_zeros((missing, *x.shape[1:])), batch_size=[missing])
        return torch.cat([steps, zeros])

    return torch.stack([row.clone(recurse=False).set("steps", pad(row.get("steps"))) for row in rows])


def child(way: str, count: int, image_size: int) -> None:
    from srpo_rl.rollout import _stack_trajectories

    rows = trajectories(count, image_size)
    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; building the rows only ever grew it
    start = time.perf_counter()
    batch = stack_before(rows) if way == "before" else _stack_trajectories(rows, keep_steps=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"way": way, "rows_mib": sum(r["steps"].bytes() for r in rows) / 2**20,
                      "batch_mib": batch.bytes() / 2**20, "peak_above_rows_mib": (peak - held) / 1024,
                      "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--child", choices=WAYS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trajectories < 1:
        parser.error(f"--trajectories must be >= 1, got {args.trajectories}")
    if args.child:
        child(args.child, args.trajectories, args.image_size)
        return
    runs = {}
    for way in WAYS:
        script = [sys.executable, __file__, "--child", way, "--trajectories", str(args.trajectories),
                  "--image-size", str(args.image_size)]
        out = subprocess.run(script, capture_output=True, text=True, check=True).stdout
        runs[way] = json.loads(out.strip().splitlines()[-1])
    print(f"\n{args.trajectories} trajectories, {runs['library']['rows_mib']:.0f} MiB of steps, "
          f"{runs['library']['batch_mib']:.0f} MiB padded")
    print(f"{'way':<10}{'peak above the rows MiB':>26}{'seconds':>10}")
    for way in WAYS:
        print(f"{way:<10}{runs[way]['peak_above_rows_mib']:>26.0f}{runs[way]['seconds']:>10.2f}")
    saved = runs["before"]["peak_above_rows_mib"] - runs["library"]["peak_above_rows_mib"]
    print(f"library: {saved:.0f} MiB less at the peak, {runs['library']['seconds'] / runs['before']['seconds']:.2f}x "
          f"the time")
    print(json.dumps({"benchmark": "stack_memory", "trajectories": args.trajectories, "image_size": args.image_size,
                      "runs": runs, "peak_saved_mib": saved, "machine": machine(), "versions": versions(),
                      "command": command()}))


if __name__ == "__main__":
    main()
