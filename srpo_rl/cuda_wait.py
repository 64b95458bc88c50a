"""Waiting for the GPU by sleeping, so that the wait leaves the CPU core to the simulation.

With one CUDA context on a machine with many cores, CUDA's default scheduling makes a host thread that
waits for the GPU (``.cpu()``, ``.item()``, ``torch.cuda.synchronize()``) spin on its core for the whole
wait. In a rollout the policy process waits for every forward (tens of milliseconds) and the reward's
V-JEPA 2 embedding (hundreds), while the simulation workers need every core: a spinning wait takes a
core from them, and the workers, being niced, lose it. An event created with ``blocking=True`` makes the
waiting thread sleep until the GPU work is done (``tests/test_cuda_wait.py`` checks the difference in
CPU time on a GPU).

Example:
    >>> import torch
    >>> from srpo_rl.cuda_wait import wait_for_stream
    >>> wait_for_stream()  # no CUDA work queued (or no CUDA): returns at once
"""

from __future__ import annotations

import torch

__all__ = ["wait_for_stream"]


def wait_for_stream(stream: torch.cuda.Stream | None = None) -> None:
    """Blocks, sleeping, until the work queued so far on ``stream`` (default: the current one) is done.

    A no-op without CUDA. Afterwards, copying that work's results to the host costs no further wait.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    event.synchronize()
