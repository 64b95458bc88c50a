"""Host memory of one LIBERO simulation process: the freed C heap handed back, and MuJoCo's asset cache.

With the 7B's optimizer state in host memory (``actor.fsdp.optimizer_offload=true``: 84 GiB), the env
processes decide whether an iteration fits the host: an 80 GB H100's 128 GB host ran 12 envs beside it and
not 16. Each setting runs in a fresh child process that builds a ``LiberoSim``, then changes task
``--changes`` times (each change resets an episode), reporting the resident set size (``Rss`` of
``/proc/self/smaps_rollup``) and the seconds of each step:

- ``untrimmed``: the baseline, what the library did before: glibc keeps the heap pages a scene compile
  frees (``srpo_rl.envs.sim.release_free_heap`` replaced by a no-op in this child);
- ``default``: the library as it is: ``LiberoSim.set_task`` hands them back (``malloc_trim(0)``);
- ``off``: the same, and MuJoCo's process-wide asset cache (decoded textures and meshes kept for a later
  compile of the same assets) sized to 0 bytes through the C API's ``mj_setCacheSize(mj_globalCache(), 0)``
  (the Python bindings of mujoco 3.3.2 do not expose it).

    python benchmarks/sim_memory.py                      # libero_object, tasks 0 -> 1 -> 2 -> 0 -> 3
    python benchmarks/sim_memory.py --suite libero_10 --changes 6

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time

from _common import command, machine, versions

SETTINGS = ("untrimmed", "default", "off")


def resident_mib() -> float:
    """This process's resident set size in MiB."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:")) / 1024


def disable_asset_cache() -> None:
    """Sets MuJoCo's global asset cache to 0 bytes: nothing decoded is kept once a compile ends."""
    import mujoco

    library = glob.glob(os.path.join(os.path.dirname(mujoco.__file__), "libmujoco.so*"))
    if not library:
        raise RuntimeError(f"no libmujoco.so* next to {mujoco.__file__}: cannot size the asset cache")
    lib = ctypes.CDLL(library[0])
    lib.mj_globalCache.restype = ctypes.c_void_p
    lib.mj_setCacheSize.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mj_setCacheSize(lib.mj_globalCache(), 0)


def child(args: argparse.Namespace) -> None:
    """One setting in this (fresh) process: build, then change task; one JSON line of the figures."""
    if args.setting == "off":
        disable_asset_cache()
    from srpo_rl.envs import sim as sim_module

    if args.setting == "untrimmed":
        sim_module.release_free_heap = lambda: False
    LiberoSim = sim_module.LiberoSim

    tasks = ([1, 2, 0] + list(range(3, 3 + args.changes)))[: args.changes]  # task 0 comes back once
    start = time.perf_counter()
    sim = LiberoSim(args.suite, task_id=0)
    sim.reset(0)
    rows = [{"task": 0, "seconds": time.perf_counter() - start, "rss_mib": resident_mib()}]
    for task in tasks:
        start = time.perf_counter()
        sim.set_task(task)
        sim.reset(0)
        rows.append({"task": task, "seconds": time.perf_counter() - start, "rss_mib": resident_mib()})
    print(json.dumps({"setting": args.setting, "rows": rows}))


def run_setting(args: argparse.Namespace, setting: str) -> dict:
    script = [sys.executable, __file__, "--child", setting, "--suite", args.suite, "--changes", str(args.changes)]
    result = subprocess.run(script, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the {setting!r} run failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--changes", type=int, default=4, help="task changes after the first build")
    parser.add_argument("--child", choices=SETTINGS, default=None, dest="setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.changes < 1:
        parser.error(f"--changes must be >= 1, got {args.changes}")
    if args.setting is not None:
        child(args)
        return

    runs = {setting: run_setting(args, setting) for setting in SETTINGS}
    print(f"\nOne LiberoSim process ({args.suite}): resident MiB and seconds after each build / task change")
    print(f"{'step':<14}" + "".join(f"{s + ' MiB':>15}{s + ' s':>13}" for s in SETTINGS))
    for i, row in enumerate(runs["untrimmed"]["rows"]):
        label = f"build task {row['task']}" if i == 0 else f"-> task {row['task']}"
        cells = [runs[s]["rows"][i] for s in SETTINGS]
        print(f"{label:<14}" + "".join(f"{c['rss_mib']:>15.0f}{c['seconds']:>13.2f}" for c in cells))
    last = {s: runs[s]["rows"][-1]["rss_mib"] for s in SETTINGS}
    changes = {s: sum(r["seconds"] for r in runs[s]["rows"][1:]) / args.changes for s in SETTINGS}
    for setting in ("default", "off"):
        print(f"{setting}: {last['untrimmed'] - last[setting]:.0f} MiB less than untrimmed at the end, a task change "
              f"{changes[setting] / changes['untrimmed']:.2f}x the time "
              f"({changes[setting]:.2f} s against {changes['untrimmed']:.2f} s)")
    print(json.dumps({
        "benchmark": "sim_memory",
        "suite": args.suite,
        "runs": runs,
        "rss_saved_mib": {s: last["untrimmed"] - last[s] for s in ("default", "off")},
        "task_change_s": changes,
        "machine": machine(),
        "versions": versions(),
        "command": command(),
    }))


if __name__ == "__main__":
    main()
