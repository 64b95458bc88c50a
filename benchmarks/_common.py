"""What every benchmark's JSON line records: the machine, the package versions, and MuJoCo child runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchrl", "tensordict", "transformers", "mujoco", "robosuite", "numpy", "numba")


def machine(device=None) -> dict:
    """CPU model, cores, host memory, Python, the MuJoCo GL backend and, on a CUDA ``device``, the GPU."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
           "python": platform.python_version(),
           "mujoco_gl": os.environ.get("MUJOCO_GL"), "gpu": None}
    try:
        out["host_memory_gib"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        pass
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30)
    return out


def command() -> str:
    """This run's command line, with the script as ``benchmarks/<name>`` and path arguments by their file name
    only (no path of the machine it ran on)."""
    args = [Path(a).name if a.startswith("/") else a for a in sys.argv[1:]]
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *args])


def versions(names: tuple[str, ...] = PACKAGES) -> dict:
    """Installed versions of ``names`` (``None`` for a missing one), with Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def mujoco_target(version: str, root: str = tempfile.gettempdir()) -> str | None:
    """The ``pip --target`` folder of MuJoCo ``version`` (``root/mj_<version>``), or None for the environment's own."""
    return None if version == metadata.version("mujoco") else os.path.join(root, f"mj_{version}")


def install_mujoco(version: str, root: str = tempfile.gettempdir()) -> None:
    """Installs MuJoCo ``version`` into its :func:`mujoco_target` folder, unless it is there or is the environment's."""
    target = mujoco_target(version, root)
    if target is None or os.path.isdir(os.path.join(target, "mujoco")):
        return
    print(f"installing mujoco=={version} into {target}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, f"mujoco=={version}"],
        check=True,
    )


def with_mujoco(env: dict, version: str, root: str = tempfile.gettempdir()) -> dict:
    """``env`` with MuJoCo ``version``'s folder first on ``PYTHONPATH`` (as it is for the environment's own)."""
    target = mujoco_target(version, root)
    if target is None:
        return env
    return dict(env, PYTHONPATH=os.pathsep.join([target, *filter(None, [env.get("PYTHONPATH")])]))


def run_child(command: list[str], env: dict, version: str, what: str) -> dict:
    """Runs a benchmark's ``--child`` under another MuJoCo and returns its JSON line (checked for ``version``)."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"mujoco {version} {what} failed:\n{result.stderr[-3000:]}")
    out = json.loads(lines[-1])
    if out["mujoco"] != version:
        raise RuntimeError(f"expected mujoco {version} in the child, got {out['mujoco']}")
    return out


def top_kernels(fn, device, count: int = 12) -> dict:
    """The ``count`` CUDA kernels (or CPU ops, off CUDA) with the most self time in one call of ``fn``, and the
    time of all of them (``torch.profiler``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)

    def self_time(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    ranked = sorted(events, key=self_time, reverse=True)[:count]
    return {"total_ms": sum(map(self_time, events)) / 1e3,
            "kernels": [{"name": e.key[:90], "calls": e.count, "ms": self_time(e) / 1e3} for e in ranked]}
