"""CUDA graphs of OpenVLA-OFT's inference forward: one captured graph per (batch, prompt width) bucket.

An eager forward launches its kernels one by one from Python (two ViTs, 32 decoder layers), a fixed CPU
cost per forward that matters when the batch is small, as it is in an asynchronous rollout (the slots whose
chunk just came back). A replayed graph launches them all in one call. Measured on an H200 with the 7B
(``benchmarks/rollout_throughput.py``, idle machine): batch 4 42.4 ms against 55.1 ms eager, batch 8 84.4
against 95.0; from batch 16 on the forward is GPU-bound and the graph is no faster.

A batch is padded up to the next bucket (rows: copies of the first row; width: the prompt length rounded
up to ``width_multiple``): the forward attends only to each row's own tokens, so the padding changes no
logit of a real row beyond the rounding of differently shaped GEMMs. Graphs are captured on first use of a
bucket (one eager warm-up forward, one capture), into one shared memory pool: the graphs reuse one another's
activation memory (each keeps its own static inputs and output).

With ``prepare`` the graph also turns the camera frames into the model's pixel values (the policy's resize,
crop and normalisation), so that a decision is one replay rather than a few dozen small kernels launched from
Python, each of which waits for the GIL while the rollout loop runs beside it.

Example:
    >>> import torch
    >>> from srpo_rl.cuda_graphs import GraphedActionLogits, batch_bucket
    >>> batch_bucket(11), batch_bucket(17), batch_bucket(40)
    (11, 18, 40)
    >>> # on a CUDA device: graphed = GraphedActionLogits(model); logits, _ = graphed(ids, lengths, pixel_values)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

__all__ = ["GraphedActionLogits", "batch_bucket", "graphs_supported"]

_MAX_BUCKET = 256


def batch_bucket(batch: int) -> int:
    """The captured batch size a batch of ``batch`` rows runs at: itself up to 16, at most 12.5 % more to 64.

    Buckets: 1..16, even sizes to 32, multiples of 4 to 64, of 16 beyond. A padded row costs a real row's GPU
    time, and the asynchronous rollout's batches are mostly 1-16 rows: on an H100 with 32 envs the pool ran
    628.8 env-steps/s with these buckets against 580.8 with the earlier ones (1..8, then even sizes to 16,
    multiples of 4 to 32), and 626.0 against 612.0 with the two run in the other order
    (``benchmarks/rollout_throughput.py``, ``pool_padded``). Graphs share one memory pool, so more of them cost
    capture time, not activation memory.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for limit, step in ((16, 1), (32, 2), (64, 4)):
        if batch <= limit:
            return -(-batch // step) * step
    return -(-batch // 16) * 16


def graphs_supported(model: nn.Module) -> bool:
    """Whether ``model``'s inference forward can be captured: plain (not FSDP-sharded) parameters on CUDA.

    An FSDP2 module is never captured, even with its parameters gathered (:func:`srpo_rl.distributed.gathered`
    makes them plain tensors): its forward hooks would run at capture only, and the gathered storage changes
    from one gathering to the next.
    """
    params = list(model.parameters())
    return (bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)
            and not any(isinstance(m, FSDPModule) for m in model.modules()))


class _Graph:
    """One captured forward at fixed input shapes: copy inputs in, replay, read the static outputs."""

    def __init__(self, forward: Callable, batch: int, width: int, image_shape: tuple[int, ...],
                 image_dtype: torch.dtype, pool, device) -> None:
        self.ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.lengths = torch.full((batch,), 2, dtype=torch.long, device=device)
        self.images = torch.zeros(batch, *image_shape, dtype=image_dtype, device=device)
        run = lambda: forward(self.ids, self.lengths, self.images)  # noqa: E731
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy cuBLAS / allocator / cached tables
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a background reward embedder) may allocate and sync meanwhile
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = run()

    def __call__(self, ids: torch.Tensor, lengths: torch.Tensor, images: torch.Tensor) -> tuple:
        rows, width = ids.shape
        self.ids[:rows, :width].copy_(ids)
        self.ids[rows:, :width].copy_(ids[:1].expand(self.ids.shape[0] - rows, -1))
        self.lengths[:rows].copy_(lengths)
        self.lengths[rows:].copy_(lengths[:1].expand(self.lengths.shape[0] - rows))
        self.images[:rows].copy_(images)  # padded rows keep earlier (finite) images: their outputs are dropped
        self.graph.replay()
        return tuple(None if out is None else out[:rows].clone() for out in self.outputs)


class GraphedActionLogits:
    """:meth:`OpenVLAOFT.logits_from_lengths` through CUDA graphs captured per (batch, width) bucket.

    Args:
        model: an :class:`~srpo_rl.models.openvla_oft.OpenVLAOFT` with plain parameters on a CUDA device
            (:func:`graphs_supported`); its weights may change between calls (a graph reads them in place),
            its parameter tensors must not be replaced.
        prepare: ``images -> (kept, pixel_values)``, captured with the forward: the call's ``images`` are then
            whatever it takes (the policy's uint8 camera frames) and ``kept`` comes back with the logits (the
            preprocessed frames the policy stores). It must not sync with the host. Without it, ``images``
            are the pixel values.
        width_multiple: prompt widths are rounded up to a multiple of this (fewer graphs, a little padding).
        max_batch: batches above this run eagerly (each bucket's graph holds its own static inputs).

    Attributes:
        capture_seconds: wall time spent capturing so far (warm-up forward included).
    """

    def __init__(self, model: nn.Module, *, prepare: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                 | None = None, width_multiple: int = 16, max_batch: int = 64) -> None:
        if not graphs_supported(model):
            raise ValueError("CUDA graphs need a model whose parameters are plain tensors on a CUDA device "
                             "(not on the CPU, not FSDP-sharded)")
        if not 1 <= max_batch <= _MAX_BUCKET:
            raise ValueError(f"max_batch must be in 1..{_MAX_BUCKET}, got {max_batch}")
        self.model, self.prepare = model, prepare
        self.width_multiple, self.max_batch = width_multiple, max_batch
        self.device = next(model.parameters()).device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Graph | None] = {}
        self.capture_seconds = 0.0

    def forward(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a graph captures, run eagerly: ``(logits, kept)`` (``kept`` None without ``prepare``)."""
        kept, pixels = (None, images) if self.prepare is None else self.prepare(images)
        return self.model.logits_from_lengths(input_ids, prompt_lengths, pixels), kept

    def __call__(self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                 images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 logits ``[B, 56, 256]`` as ``model.logits_from_lengths`` (inputs on the model's device), and
        ``prepare``'s kept tensor (None without ``prepare``)."""
        rows, width = input_ids.shape
        graph = None
        if rows <= self.max_batch and not torch.is_grad_enabled():
            graph = self.graph(rows, width, tuple(images.shape[1:]), images.dtype)
        if graph is None:
            return self.forward(input_ids, prompt_lengths, images)
        return graph(input_ids, prompt_lengths, images)

    def graph(self, rows: int, width: int, image_shape: tuple[int, ...],
              image_dtype: torch.dtype = torch.float32) -> _Graph | None:
        """The graph that runs ``rows`` x ``width`` prompts, captured on the bucket's first use.

        None if the capture failed (warned once): that bucket then runs eagerly.
        """
        key = (batch_bucket(rows), -(-width // self.width_multiple) * self.width_multiple, image_shape, image_dtype)
        if key not in self.graphs:
            t0 = time.perf_counter()
            try:
                # plain tensors even under inference_mode: later calls copy into them outside of it
                with torch.inference_mode(False), torch.no_grad():
                    self.graphs[key] = _Graph(self.forward, *key, self.pool, self.device)
            except RuntimeError as error:  # e.g. an op that syncs with the host: not capturable
                warnings.warn(f"CUDA graph capture failed for batch {key[0]} x width {key[1]}; that bucket runs "
                              f"eagerly: {error}", RuntimeWarning, stacklevel=3)
                self.graphs[key] = None
            torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - t0
        return self.graphs[key]

    def capture(self, batch_sizes: Iterable[int], width: int, image_shape: tuple[int, ...],
                image_dtype: torch.dtype = torch.float32) -> None:
        """Captures the buckets of ``batch_sizes`` ahead of use (largest first: the pool is sized once)."""
        for batch in sorted({batch_bucket(b) for b in batch_sizes if b <= self.max_batch}, reverse=True):
            self.graph(batch, width, image_shape, image_dtype)
