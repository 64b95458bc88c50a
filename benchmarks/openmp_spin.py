"""What torch's idle OpenMP threads cost the CPU between small ops a few milliseconds apart, and what
``srpo_rl.rollout.single_cpu_thread`` (one intra-op thread) saves.

In a rollout on an accelerator the policy's process runs a few small host ops (copies of a batch of frames)
every few milliseconds and sleeps in between. After each parallel op torch's idle OpenMP threads spin for a
while before they sleep; with ops a few milliseconds apart they spin all the time, on the cores the (niced)
simulation workers need. ``collect_rollouts`` therefore keeps torch to one thread off the CPU. This script
runs ``--ops`` copies of a rollout-sized uint8 batch (32 x 3 x 256 x 256), ``--gap-ms`` apart, with torch's
``--threads`` threads and then inside ``single_cpu_thread()``, and reports the process's CPU time outside the
ops as a share of the wall time outside them (the spinning; 0 = the threads slept through the gaps). Each case
runs ``--repeats`` times (the table gives the median and the largest share).

    python benchmarks/openmp_spin.py                      # 2 threads, 100 copies 5 ms apart, 3 repeats

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from _common import command, machine, versions
from srpo_rl.rollout import single_cpu_thread


def spin_share(ops: int, gap_s: float) -> dict:
    """CPU time outside the ops over the wall time outside them, for ``ops`` copies ``gap_s`` apart."""
    images = torch.zeros(32, 3, 256, 256, dtype=torch.uint8)
    usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731 - user + system
    cpu, wall, inside = usage(), time.perf_counter(), 0.0
    for _ in range(ops):
        t0 = time.perf_counter()
        images.clone()
        inside += time.perf_counter() - t0
        time.sleep(gap_s)
    cpu, wall = usage() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "inside_ops_s": inside, "wall_s": wall, "spin_share": (cpu - inside) / (wall - inside)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch's intra-op threads for the first case")
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows = []
    try:
        for case, context in ((f"{args.threads} threads", lambda: single_cpu_thread(enabled=False)),
                              ("single_cpu_thread()", single_cpu_thread)):
            with context():
                runs = [spin_share(args.ops, args.gap_ms / 1e3) for _ in range(args.repeats)]
            shares = [run["spin_share"] for run in runs]
            rows.append({"case": case, "median_spin_share": statistics.median(shares), "max_spin_share": max(shares),
                         "runs": runs})
    finally:
        torch.set_num_threads(before)
    baseline = rows[0]["median_spin_share"]

    print(f"\n{args.ops} copies of a 32 x 3 x 256 x 256 uint8 batch, {args.gap_ms:g} ms apart ({args.repeats} repeats)")
    print(f"{'case':<22} {'spin share (median)':>20} {'largest':>8} {'vs ' + rows[0]['case']:>14}")
    for row in rows:
        ratio = row["median_spin_share"] / baseline if baseline > 0 else float("nan")
        print(f"{row['case']:<22} {row['median_spin_share']:>20.3f} {row['max_spin_share']:>8.3f} {ratio:>13.2f}x")
    print(json.dumps({"benchmark": "openmp_spin", "threads": args.threads, "ops": args.ops, "gap_ms": args.gap_ms,
                      "results": rows, "machine": machine(), "versions": versions(), "command": command()}))


if __name__ == "__main__":
    main()
