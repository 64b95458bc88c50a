"""Waiting for the GPU asleep: the waiting thread uses (almost) no CPU, where a plain synchronize spins."""

import time

import pytest
import torch

from srpo_rl.cuda_wait import wait_for_stream


def _cpu_and_wall_of_waiting(wait) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) spent in ``wait`` for a GPU kernel of about 0.3 s."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # a kernel that busy-waits on the GPU for that many cycles
    cpu, wall = time.thread_time(), time.perf_counter()
    wait()
    return time.thread_time() - cpu, time.perf_counter() - wall


@pytest.mark.gpu
def test_waiting_for_the_stream_sleeps_where_synchronize_spins():
    cpu, wall = _cpu_and_wall_of_waiting(wait_for_stream)
    assert torch.cuda.current_stream().query()  # the work is done when it returns
    assert wall > 0.05 and cpu < 0.2 * wall, (cpu, wall)
    # why it exists: CUDA's default wait (one context, many cores) keeps the thread on its core throughout
    cpu, wall = _cpu_and_wall_of_waiting(torch.cuda.synchronize)
    assert wall > 0.05 and cpu > 0.8 * wall, (cpu, wall)
    # on another stream, only that stream's work is waited for
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(5e8))
    wait_for_stream(side)
    assert side.query()
