"""Process groups and FSDP2 for the actor, on torch.distributed (launch with ``torchrun``).

One process per GPU: ``torchrun --nproc_per_node=8 examples/srpo_libero.py ...`` on one node; several nodes
with torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``). Without torchrun's variables the run is a
single process. CPU runs use gloo (two CPU processes give the same update as one: tests/test_distributed.py).

Example (one CPU process, no torchrun: nothing to shard, the model comes back as it is):
    >>> import torch
    >>> info = init_distributed("cpu")
    >>> info.world_size, info.device
    (1, device(type='cpu'))
    >>> model = torch.nn.Linear(4, 4)
    >>> shard_actor(model, info, mixed_precision="bf16") is model
    True
"""

from __future__ import annotations

import gc
import os
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

__all__ = ["DistInfo", "all_reduce_sum", "close_distributed", "combine_metrics", "gather_objects", "gathered",
           "init_distributed", "reduce_scalar", "shard_actor"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs, prints and writes the shared files."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Joins the torchrun process group if there is one (NCCL on GPUs, gloo on CPUs) and picks the device."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose one of auto, cpu, cuda")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # the rank's GPU bound to the group: its barriers then know their device (else a warning at each one)
    device_id = torch.device("cuda", local_rank) if use_cuda else None
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device_id)
        elif use_cuda:
            # FSDP2 needs a process group even on one GPU (it gives the fp32-master / bf16-compute split and
            # CPU offload there too); a one-process group needs no rendezvous
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    return DistInfo(rank, world_size, local_rank, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def close_distributed() -> None:
    """Leaves the process group once every rank is done (nothing without one). Call it after the sharded
    models are released: freeing FSDP2's state (and the collectives it holds) while the group still lives, then
    a barrier, avoids an abort in torch's teardown ("terminate called without an active exception"). In a
    one-off count of 40 two-rank FSDP2 runs on gloo (2-core CPU), 13 aborted at exit without this order and
    none with it; the tests' multi-process runs use it (``tests/conftest.py``)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def shard_actor(
    model: torch.nn.Module,
    info: DistInfo,
    *,
    mixed_precision: str = "bf16",
    param_offload: bool = False,
    forward_methods: tuple[str, ...] = ("action_logits",),
) -> torch.nn.Module:
    """Wraps ``model`` with FSDP2 (``fully_shard``) block by block, then the root.

    ``model.fsdp_blocks()`` names the repeated blocks (decoder layers, vision blocks). Parameters keep their
    dtype: fp32 when they are the optimizer's master copy, or already ``mixed_precision`` when the master copy
    lives in :class:`srpo_rl.optim.HostAdamW`. Compute runs in ``mixed_precision``; gradients are accumulated
    and reduced in fp32.
    ``param_offload`` keeps parameters, gradients and optimizer states on the CPU (FSDP2's CPUOffloadPolicy).
    ``forward_methods`` names the model's methods other than ``forward`` that run it (the policy calls
    ``action_logits``): FSDP2 hooks them too, so that they gather the root's parameters.
    On a single CPU process without a process group the model is returned as it is: there is nothing to shard.
    """
    if mixed_precision not in DTYPES:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}; choose one of {', '.join(DTYPES)}")
    if info.world_size == 1 and info.device.type == "cpu" and not dist.is_initialized():
        return model
    model.to(info.device if not param_offload else "cpu")
    options = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32),
    }
    if param_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for block in model.fsdp_blocks():
        fully_shard(block, reshard_after_forward=True, **options)
    # the root keeps its parameters after forward: backward gathers them at once (FSDP2's own default)
    fully_shard(model, reshard_after_forward=False, **options)
    for name in forward_methods:
        # Methods other than forward need FSDP's pre/post hooks to gather the root's parameters.
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


@contextmanager
def gathered(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` with the parameters of its FSDP2-sharded parts (:func:`shard_actor`) gathered once for a
    stretch of inference, such as a rollout or a validation pass, and freed again on exit.

    A sharded model's every forward all-gathers each block's parameters (in ``mixed_precision``): a collective,
    so every rank must run the same forwards, and on one GPU a copy and cast of all the weights per forward
    (for the 7B, by count, about 45 GB of memory traffic). A rollout's forwards differ in number from rank to rank
    (episodes end at different steps, the slot pool batches what comes back), so they cannot be collectives.
    Inside this context every rank has gathered every block once (the same all-gathers in the same order on
    every rank) and the forwards run on local weights, without collectives; :func:`srpo_rl.rollout.
    collect_rollouts` runs inside it. While inside, the gathered weights take their full size in device memory
    (the 7B in bf16: 14 GiB). On exit the flags are as :func:`shard_actor` sets them (an outermost FSDP module
    keeps its parameters after forward, the blocks inside it do not). Without FSDP2 parts: ``module`` as it is.

    Example:
        >>> with gathered(policy):  # doctest: +SKIP
        ...     logits = policy.model.action_logits(ids, mask, pixels)  # no collective, whatever each rank runs
    """
    modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    inner = {id(d) for m in modules for d in m.modules() if d is not m}
    for fsdp_module in modules:
        fsdp_module.set_reshard_after_forward(False, recurse=False)
    for handle in [fsdp_module.unshard(async_op=True) for fsdp_module in modules]:
        handle.wait()
    try:
        yield module
    finally:
        for fsdp_module in modules:
            fsdp_module.reshard()
            fsdp_module.set_reshard_after_forward(id(fsdp_module) in inner, recurse=False)


def all_reduce_sum(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Sums scalars over ranks (identity without a process group)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def gather_objects(obj: object) -> list:
    """``obj`` from every rank, in rank order (picklable objects: small ones, such as metrics); ``[obj]`` without a
    process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def combine_metrics(metrics: Mapping[str, float], weight: float, *, summed: Collection[str] = ()) -> dict[str, float]:
    """One rank's metrics combined with every other rank's (a collective: every rank calls it).

    A name in ``summed`` adds up over the ranks (counts, throughputs); one ending in ``_max`` or starting with
    ``time/`` or ``memory/`` takes the largest value (the slowest rank sets the pace); one ending in ``_min`` the
    smallest; any other is the mean over the ranks that report it, weighted by their ``weight`` (e.g. their
    trajectories). Without a process group: ``metrics`` as they are.

    Example:
        >>> combine_metrics({"rollout/success_rate": 0.5, "rollout/trajectories": 16.0}, 16,
        ...                 summed=["rollout/trajectories"])
        {'rollout/success_rate': 0.5, 'rollout/trajectories': 16.0}
    """
    ranks = gather_objects((dict(metrics), float(weight)))
    out = {}
    for name in dict.fromkeys(k for values, _ in ranks for k in values):  # first-seen order
        reported = [(values[name], w) for values, w in ranks if name in values]
        if name in summed:
            out[name] = sum(v for v, _ in reported)
        elif name.endswith("_max") or name.startswith(("time/", "memory/")):
            out[name] = max(v for v, _ in reported)
        elif name.endswith("_min"):
            out[name] = min(v for v, _ in reported)
        else:
            total = sum(w for _, w in reported)
            out[name] = (sum(v * w for v, w in reported) / total if total > 0
                         else sum(v for v, _ in reported) / len(reported))
    return out


def reduce_scalar(value: float, op: str, device: torch.device | None = None) -> float:
    """``min`` / ``max`` of a scalar over ranks (identity without a process group)."""
    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:  # checked on one process too: a typo must not wait for the first multi-GPU run
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(ops)}")
    if not dist.is_initialized():
        return value
    device = device or (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=ops[op])
    return tensor.item()
