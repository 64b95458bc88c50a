"""How a simulation worker's reply reaches the parent: through the pipe, or its frames through shared memory.

A reply to ``step_chunk`` carries the observation frame and the reward frame(s) (196 KB each at 256x256),
more than a pipe holds, so the parent's read of a pipe reply waits for the worker to be scheduled again for
every refill; with the cores full of (niced) simulation workers that wait is what the rollout loop pays.
Both transports run the same workers (``SimWorkers(reply_bytes=...)``) on the same tasks, in alternating
timed windows of the same run: each worker steps zero-action chunks back to back (a new chunk as soon as its
last reply is read, resetting at the episode's end), and the parent counts the env steps and the time it
spends reading replies that are ready (``recv`` of the workers ``ready`` returned).

    python benchmarks/worker_replies.py --num-envs 4 --seconds 20

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402

from _common import command, machine, versions  # noqa: E402
from srpo_rl.envs.workers import SimWorkers  # noqa: E402

CHUNK = 8


def window(workers: SimWorkers, seconds: float) -> dict:
    """Every worker stepping chunks back to back for ``seconds``: env steps, replies and reading time."""
    action = np.zeros((CHUNK, 7), np.float32)
    slots = list(range(len(workers)))
    workers.call({s: ("reset", (s % 50,)) for s in slots})
    workers.send({s: ("step_chunk", (action,)) for s in slots})
    env_steps = replies = 0
    read_s = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ready = workers.ready(slots, timeout=None)
        t0 = time.perf_counter()
        results = workers.recv(ready)
        read_s += time.perf_counter() - t0
        replies += len(results)
        env_steps += sum(int(r["chunk_steps"]) for r in results.values())
        # a new episode where one ended (max_steps), else the next chunk
        workers.send({s: ("reset", (s % 50,)) if r["done"] else ("step_chunk", (action,)) for s, r in results.items()})
    workers.recv(slots)  # the commands still in flight, untimed
    return {"env_steps_per_s": env_steps / seconds, "replies": replies,
            "read_ms_per_reply": 1e3 * read_s / max(1, replies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--num-envs", type=int, default=4, help="workers per transport (both sets exist at once)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one timed window")
    parser.add_argument("--windows", type=int, default=2, help="timed windows per transport, alternating")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    kwargs = {"suite": args.suite, "max_steps": 512, "image_size": args.image_size, "channels_first": True,
              "jpeg_quality": 95}
    frame = 3 * args.image_size**2
    tasks = [s % 10 for s in range(args.num_envs)]
    transports = {"pipe": SimWorkers(kwargs, tasks), "shared": SimWorkers(kwargs, tasks, reply_bytes=3 * frame + 65536)}
    rows: dict[str, list[dict]] = {name: [] for name in transports}
    try:
        for name, workers in transports.items():  # untimed: first-use costs (numba, renderer)
            window(workers, 2.0)
        for _ in range(args.windows):
            for name, workers in transports.items():
                # the other transport's workers idle meanwhile: only one set competes for the cores
                rows[name].append(window(workers, args.seconds))
    finally:
        for workers in transports.values():
            workers.close()
    summary = {name: {key: float(np.mean([r[key] for r in runs])) for key in runs[0]} for name, runs in rows.items()}
    pipe, shared = summary["pipe"], summary["shared"]
    ratios = {"read_time_shared_vs_pipe": shared["read_ms_per_reply"] / pipe["read_ms_per_reply"],
              "env_steps_shared_vs_pipe": shared["env_steps_per_s"] / pipe["env_steps_per_s"]}
    print(f"\n{args.num_envs} workers on {os.cpu_count()} cores, {args.windows} x {args.seconds:.0f} s windows each")
    print(f"{'transport':>9} {'env-steps/s':>11} {'replies':>8} {'read ms/reply':>13}")
    for name, row in summary.items():
        print(f"{name:>9} {row['env_steps_per_s']:>11.1f} {row['replies']:>8.0f} {row['read_ms_per_reply']:>13.2f}")
    print(f"shared vs pipe: read time {ratios['read_time_shared_vs_pipe']:.2f}x, "
          f"env-steps/s {ratios['env_steps_shared_vs_pipe']:.2f}x")
    print(json.dumps({"benchmark": "worker_replies", "machine": machine(), "versions": versions(),
                      "command": command(), "num_envs": args.num_envs, "windows": rows, "summary": summary,
                      "ratios": ratios}))


if __name__ == "__main__":
    main()
