import os

# Headless rendering: EGL (Mesa llvmpipe on CPU machines) unless the user chose otherwise.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
# llvmpipe draws the small frames rendered in this process (Reacher's 64x64) faster in the calling thread than
# through its worker threads; read once, at the process's first EGL context. NVIDIA's EGL ignores it.
os.environ.setdefault("LP_NUM_THREADS", "0")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _gloo_main(rank: int, world_size: int, port: int, fn, args: tuple, timeout_s: float | None) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from srpo_rl.distributed import close_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **timeout)
    fn(rank, world_size, *args)
    close_distributed()  # fn's models are freed by now


def spawn_gloo(fn, world_size: int, *args, timeout_s: float | None = None) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` CPU processes joined in a gloo group.

    ``timeout_s``: the group's collective timeout (gloo's default is 30 minutes): a test of collectives that
    must line up fails in that time instead of hanging."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_main, args=(world_size, port, fn, args, timeout_s), nprocs=world_size, join=True)


def first_success_step(sim, init_state_id: int) -> int | None:
    """The env step at which ``sim`` (a :class:`srpo_rl.envs.sim.LiberoSim`), reset to ``init_state_id`` and
    teleported to its goal, first reports success under zero actions, stepped one action at a time: what a
    chunk of zero actions must stop at. ``None`` if not within 8 steps."""
    import numpy as np

    sim.reset(init_state_id=init_state_id)
    sim.teleport_to_goal()
    for step in range(1, 9):
        if sim.step_chunk(np.zeros((1, 7), np.float32))["success"]:
            return step
    return None
