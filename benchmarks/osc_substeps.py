"""LIBERO env steps/s with robosuite's own arm-control substeps against ``srpo_rl.envs.fast_osc``'s, same run.

One LIBERO simulation in this process; the two control paths take turns in timed windows on it (the fast
substeps are uninstalled for robosuite's windows), each window a fresh episode from the same init state with
the same seeded random chunks (gripper toggling), so both paths do the same work. Two workloads:

- ``physics``: robosuite's ``env.step`` alone (no camera renders), where the control substeps matter most;
- ``chunks``: ``LiberoSim.step_chunk`` as the rollout runs it (8 steps, one 256x256 frame per chunk).

Each window also checks that the two paths end in the same state (the physics is bit-identical; the
constraint solver's warm start is set equal at each episode start, see ``tests/test_fast_osc.py``).

    python benchmarks/osc_substeps.py --windows 6 --steps 200

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402

from _common import command, machine, versions  # noqa: E402
from srpo_rl.envs import LiberoSim  # noqa: E402
from srpo_rl.envs.fast_osc import install, uninstall  # noqa: E402

CHUNK = 8
PATHS = ("robosuite", "fast_osc")


def chunks(seed: int, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(-(-steps // CHUNK)):
        actions = rng.uniform(-1, 1, (CHUNK, 7))
        actions[:, -1] = np.sign(actions[:, -1])
        out.append(actions)
    return out


def window(sim: LiberoSim, path: str, workload: str, actions: list[np.ndarray], warm_start: np.ndarray) -> tuple:
    """One episode on ``path``: ``(env steps/s, final physics state)``."""
    env = sim.env.env
    (install if path == "fast_osc" else uninstall)(env)
    sim.reset(0)
    data = env.sim.data._data
    data.qacc_warmstart[:] = warm_start
    t0 = time.perf_counter()
    if workload == "physics":
        for chunk in actions:
            for action in chunk:
                env.step(action)
    else:
        for chunk in actions:
            sim.step_chunk(chunk)
    seconds = time.perf_counter() - t0
    state = np.concatenate([data.qpos, data.qvel, data.qacc_warmstart, data.ctrl])
    return CHUNK * len(actions) / seconds, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--task-id", type=int, default=0)
    parser.add_argument("--windows", type=int, default=6, help="windows per path and workload (alternating)")
    parser.add_argument("--steps", type=int, default=200, help="env steps per window")
    args = parser.parse_args()

    sim = LiberoSim(args.suite, task_id=args.task_id, max_steps=args.steps + CHUNK, num_steps_wait=0)
    sim.reset(0)
    warm_start = sim.env.env.sim.data._data.qacc_warmstart.copy()
    actions = chunks(0, args.steps)
    results = {}
    for workload in ("physics", "chunks"):
        rates = {path: [] for path in PATHS}
        states = {}
        window(sim, "fast_osc", workload, actions[:2], warm_start)  # warm-up: numba, caches
        for i in range(args.windows):
            for path in (PATHS if i % 2 == 0 else PATHS[::-1]):  # alternating order
                rate, states[path] = window(sim, path, workload, actions, warm_start)
                rates[path].append(rate)
        median = {path: statistics.median(r) for path, r in rates.items()}
        results[workload] = {
            "env_steps_per_s": median, "windows": rates,
            "speedup": median["fast_osc"] / median["robosuite"],
            "same_final_state": bool(np.array_equal(states["fast_osc"], states["robosuite"])),
        }
    sim.close()

    print(f"\nLIBERO {args.suite} task {args.task_id}, env steps/s, median of {args.windows} windows of "
          f"{args.steps} steps (same run, alternating)")
    print(f"{'workload':<10} {'robosuite':>10} {'fast_osc':>10} {'ratio':>7} {'same state':>10}")
    for workload, r in results.items():
        print(f"{workload:<10} {r['env_steps_per_s']['robosuite']:>10.1f} {r['env_steps_per_s']['fast_osc']:>10.1f} "
              f"{r['speedup']:>6.2f}x {str(r['same_final_state']):>10}")
    print(json.dumps({"benchmark": "osc_substeps", "suite": args.suite, "task_id": args.task_id,
                      "steps_per_window": args.steps, "results": results, "machine": machine(),
                      "versions": versions(), "command": command()}))


if __name__ == "__main__":
    main()
