"""AdamW with its fp32 master weights and moments in host memory: the 7B actor's update on one 80 GB GPU.

The recipe's FSDP2 plan keeps fp32 weights, fp32 gradients and two fp32 AdamW moments on the GPUs: 16 bytes a
parameter, 112 GiB for OpenVLA-OFT-7B, more than one 80 GB GPU holds. With :class:`HostAdamW` the model's
parameters stay on the GPU in the dtype the forward computes in (bf16), and the optimizer keeps what only
the update needs in host memory: the fp32 master copy of every weight and its two moments (12 bytes a
parameter, 84 GiB for the 7B). A step brings the gradients to the host about ``chunk_bytes`` at a time,
runs torch's fused AdamW on the master weights and copies the rounded new weights back. Between steps the GPU
holds bf16 weights and, during a mini-batch, FSDP2's fp32 gradient accumulators (with
``MixedPrecisionPolicy(reduce_dtype=float32)``, as :func:`srpo_rl.distributed.shard_actor` sets it).

What differs from the fp32-master plan: nothing in the forward (FSDP2 casts fp32 weights to bf16 before
every forward; here they are stored so), and the mini-batch's summed gradient is rounded to bf16 once when
FSDP2 hands it to the sharded parameter (a relative error of at most 2^-9 per element) before the fp32 update.

With ``state_dtype=torch.bfloat16`` the two moments are stored in bf16 (8 bytes a parameter, 56 GiB for the
7B: room for the recipe's 16 env processes beside it on a 128 GB host). A step widens them to fp32, runs the
same fused update and rounds them back stochastically (:func:`round_to_bf16_stochastic`): rounded to nearest,
the second moment's increment of ``(1 - beta2) = 0.1 %`` a step falls below bf16's half spacing (0.2-0.4 %)
once the average has settled, and the moment stops moving (``tests/test_optim.py`` shows it stalled at about
half its value); rounded stochastically it is unbiased. The master weights stay fp32. The rounding's noise is
a function of the step count and the parameter's place in the optimizer: a resumed run continues bit for bit.

The state has torch AdamW's keys (``step``, ``exp_avg``, ``exp_avg_sq``) plus ``master``, each tensor on the
host; for a DTensor parameter (FSDP2) each is a DTensor with the same mesh and placements whose local shard
lives on the host, as FSDP2's own CPU offload stores parameters, so ``torch.distributed.checkpoint`` saves
and reloads it shard by shard (:class:`srpo_rl.checkpoint.CheckpointManager`).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    >>> optimizer = HostAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    >>> model(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
    >>> optimizer.step()
    >>> optimizer.state[model.weight]["master"].dtype
    torch.float32
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.optim.adamw import adamw

__all__ = ["HostAdamW", "available_host_bytes", "check_gpu_update_fits", "round_to_bf16_stochastic"]

_HOST_KEYS = ("master", "exp_avg", "exp_avg_sq")
_MOMENTS = ("exp_avg", "exp_avg_sq")
STATE_DTYPES = (torch.float32, torch.bfloat16)
_BLOCK = 2**20  # elements a bf16-moment update works on at once: its fp32 copies stay in the CPU's caches


class _BlockNoise:
    """Uniform integers in [0, 2^16) for stochastic rounding, cheap enough for billions of elements a step.

    Drawing fresh noise for the 7B's 15 billion moment elements costs about a minute of CPU a step (torch's CPU
    ``randint``); instead one table of ``2 x block`` values is drawn once, and each call reads up to ``block``
    consecutive values from an offset that a hash of the call's ``key`` picks (the step, the parameter, the
    block, the moment). An element so meets a value from a pseudo-random place of the table at every step:
    uniform, and independent from step to step (up to the table's 2^21 draws). The draws are a function of the
    optimizer's state: a resumed run rounds as an uninterrupted one would have.
    """

    def __init__(self, seed: int = 0, block: int = _BLOCK) -> None:
        self.block = block
        self.table = torch.randint(0, 2**16, (2 * block,), dtype=torch.int32,
                                   generator=torch.Generator().manual_seed(seed))

    def __call__(self, numel: int, key: tuple[int, ...]) -> torch.Tensor:
        """Noise for ``numel <= block`` elements, the same for the same ``key`` (non-negative integers)."""
        offset = _hash(key) % self.block
        return self.table[offset:offset + numel]


def _hash(key: tuple[int, ...]) -> int:
    """A 64-bit hash of non-negative integers (splitmix64's finalizer over each): the same in every process,
    where Python's ``hash`` of a tuple is not guaranteed to be."""
    mask, x = 2**64 - 1, 0
    for value in key:
        x = (x ^ value) + 0x9E3779B97F4A7C15 & mask
        x = (x ^ x >> 30) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ x >> 27) * 0x94D049BB133111EB & mask
        x ^= x >> 31
    return x


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, settings: dict) -> None:
    """torch's fused AdamW (decoupled weight decay) on fp32 host tensors; counts each ``steps`` tensor up by one."""
    adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True, amsgrad=False, maximize=False, **settings)


def round_to_bf16_stochastic(wide: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rounds the contiguous fp32 tensor ``wide`` in place to a bf16 value, stochastically, and returns it.

    A finite value between the bf16 neighbours ``a < |x| < b`` becomes ``b`` with probability
    ``(|x| - a) / (b - a)``, else ``a`` (its sign kept): the expectation is ``x``. ``noise``: int32 of ``wide``'s
    numel, uniform in ``[0, 2^16)``, added to the 16 bits that bf16 drops before they are cleared (a carry
    moves the value to the next bf16 up). The result converts to bf16 exactly.

    Example:
        >>> x = torch.full((4,), 1.0 + 2**-9)  # a quarter of the way from bf16's 1.0 to its next value, 1 + 2^-7
        >>> noise = torch.tensor([0, 30000, 50000, 65535], dtype=torch.int32)
        >>> round_to_bf16_stochastic(x, noise).tolist()
        [1.0, 1.0, 1.0078125, 1.0078125]
    """
    bits = wide.view(torch.int32)
    bits.add_(noise.view_as(bits))
    bits.bitwise_and_(-(2**16))  # 0xFFFF0000: the bits bf16 keeps
    return wide


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _synchronize(tensors: Iterable[torch.Tensor]) -> None:
    """Waits for the CUDA devices of ``tensors`` (their asynchronous copies to and from pinned memory)."""
    for device in {t.device for t in tensors}:
        torch.cuda.synchronize(device)


def available_host_bytes() -> int | None:
    """The host memory the kernel can still give without swapping (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_gpu_update_fits(params: Iterable[torch.Tensor], *, capacity_bytes: int, allocated_bytes: int) -> int:
    """Raises MemoryError at start-up when the gradients and AdamW moments of ``params`` cannot fit the GPU.

    torch's AdamW creates its moments at the first step and the gradients come with the first backward: for the
    recipe's 7B plan on one 80 GB GPU that is an out-of-memory error after the whole first rollout. Each
    trainable parameter (this process's shard of it) gets a gradient and two moments of its own dtype; they
    must fit beside what is allocated already (weights, the reward model), activations apart.

    Args:
        params: the optimizer's parameters (those without ``requires_grad`` are not counted).
        capacity_bytes: the memory this process may use on the GPU.
        allocated_bytes: what it holds now.

    Returns:
        The bytes the gradients and moments will take.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(1024, 1024)  # 1.05 M fp32 parameters: 12 MiB of gradients and moments
        >>> check_gpu_update_fits(layer.parameters(), capacity_bytes=2**30, allocated_bytes=0) // 2**20
        12
    """
    trainable = [_local(p) for p in params if p.requires_grad]
    need = sum(3 * p.numel() * p.element_size() for p in trainable)
    if allocated_bytes + need > capacity_bytes:
        gib = 2**30
        count = sum(p.numel() for p in trainable)
        raise MemoryError(
            f"the update's gradients and AdamW moments need {need / gib:.1f} GiB on this GPU ({count / 1e9:.2f} B "
            f"trainable parameters here, {trainable[0].dtype}) beside the {allocated_bytes / gib:.1f} GiB "
            f"allocated, and this process may use {capacity_bytes / gib:.1f} GiB. Choose a plan that fits: "
            "actor.fsdp.optimizer_offload=true (fp32 master weights and moments on the host, bf16 weights here), "
            "actor.lora_rank=32 (low-rank adapters only), or more GPUs to shard over (trainer.n_gpus_per_node, "
            "trainer.nnodes)"
        )
    return need


def _like(param: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """``host`` (this process's part, in host memory) shaped as ``param`` is: a DTensor for a DTensor."""
    if isinstance(param, DTensor):
        # not DTensor.from_local: it moves the local tensor to the mesh's device type (CUDA under NCCL); FSDP2's
        # own CPU offload builds its host-sharded parameters this way too
        meta = TensorMeta(param.shape, param.stride(), host.dtype)
        return DTensor(host, DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta), requires_grad=False)
    return host


class HostAdamW(torch.optim.Optimizer):
    """AdamW (torch's, decoupled weight decay) whose fp32 master weights and moments live in host memory.

    Args:
        params: the parameters (plain tensors or FSDP2 DTensors, on any device, in any floating dtype); the
            master copies start from their values.
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW`.
        chunk_bytes: fp32 gradient bytes brought to the host per fused update (bounds the host's
            temporary gradient memory).
        state_dtype: the moments' dtype in host memory: ``torch.float32`` (torch's AdamW exactly) or
            ``torch.bfloat16`` (two thirds of the host memory; the moments rounded stochastically after every
            step: see the module's text).

    ``step`` does what :class:`torch.optim.AdamW` (``fused=True``) does to fp32 copies of the parameters with
    the same gradients, bit for bit (``tests/test_optim.py``), then writes the new master weights into the
    parameters in their own dtype. Parameters without a gradient are skipped, as torch's AdamW skips them.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        chunk_bytes: int = 2**30,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid HostAdamW settings lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}: lr, eps, weight_decay >= 0 and betas in [0, 1)")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"HostAdamW state_dtype must be one of {[str(d) for d in STATE_DTYPES]}, "
                             f"got {state_dtype}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.chunk_bytes = chunk_bytes
        self.state_dtype = state_dtype
        self._noise = _BlockNoise() if state_dtype == torch.bfloat16 else None

    def _state_bytes(self, numel: int) -> int:
        """Host bytes of one parameter's state: the fp32 master and the two moments."""
        return numel * (4 + 2 * self.state_dtype.itemsize)

    def host_bytes(self) -> int:
        """Host memory the state holds now (master weights and moments)."""
        return sum(_local(state[key]).nbytes for state in self.state.values() for key in _HOST_KEYS if key in state)

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            # row-major whatever the parameter's strides: the fused update pairs elements by memory position, and
            # the gradient comes over row-major (a transposed parameter was updated at the wrong elements)
            master = _local(param).detach().to("cpu", torch.float32, copy=True, memory_format=torch.contiguous_format)
            state["step"] = torch.tensor(0.0)
            state["master"] = _like(param, master)
            for key in _MOMENTS:
                state[key] = _like(param, torch.zeros_like(master, dtype=self.state_dtype))
        return state

    def init_state(self, reserve_bytes: int = 0) -> None:
        """Builds every parameter's host state now (its fp32 master copy and zero moments), not at the first step.

        The host memory is then taken at start-up: a state that cannot fit fails here with MemoryError, before
        any rollout, and whatever starts later (env processes) sees the host as the step will leave it. Every
        parameter gets a state, also one that never receives a gradient.

        Args:
            reserve_bytes: host memory the job still takes after this call (this process and the others on the
                host: env processes that grow as they render and change task, the rollout's data), which must
                stay free beside the state: counted as needed by the check.
        """
        if reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
        params = [p for group in self.param_groups for p in group["params"]]
        self._check_host_memory(params, reserve_bytes)
        for param in params:
            self._state(param)

    def _check_host_memory(self, params: list[torch.Tensor], reserve_bytes: int = 0) -> None:
        """Raises MemoryError, naming the sizes, before a first step whose new state cannot fit the host: the
        kernel would kill the process part-way through allocating it, or later, with no message."""
        new = [p for p in params if not self.state.get(p)]
        if not new:
            return
        needed = sum(self._state_bytes(_local(p).numel()) for p in new)
        # the step's buffers: a chunk holds less than chunk_bytes + its last parameter; one fp32 copy of it, and a
        # pinned one in the gradients' dtype that may be reallocated once as chunks grow
        needed += 3 * (self.chunk_bytes + max(4 * _local(p).numel() for p in params))
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this host, each its shard
        available = available_host_bytes()
        if available is not None and ranks_here * needed + reserve_bytes > available:
            gib, each = 2**30, f" on each of {ranks_here} processes" if ranks_here > 1 else ""
            beside = f" plus {reserve_bytes / gib:.1f} GiB that the job takes beside it" if reserve_bytes else ""
            raise MemoryError(
                f"HostAdamW needs {needed / gib:.1f} GiB of host memory{each} for the fp32 master weights and "
                f"{str(self.state_dtype).removeprefix('torch.')} moments "
                f"of {sum(_local(p).numel() for p in new) / 1e9:.2f} B parameters{beside}, and "
                f"{available / gib:.1f} GiB are available; free host memory (fewer env processes: env.num_envs), "
                f"store the moments in bf16 (actor.fsdp.optimizer_state_dtype=bf16), shard over more GPUs, or "
                f"keep the optimizer on the GPU (actor.fsdp.optimizer_offload=false)")

    def _chunks(self, params: list[torch.Tensor]):
        chunk, size = [], 0
        for param in params:
            chunk.append(param)
            size += 4 * _local(param).numel()
            if size >= self.chunk_bytes:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def _buffer(self, name: str, sizes: list[int], dtype: torch.dtype, pinned: bool = False) -> list[torch.Tensor]:
        """Flat host buffers of ``sizes``, kept from step to step: fresh host memory costs a page fault per 4 KiB
        on first touch, more than the AdamW update itself (``benchmarks/host_adamw.py``)."""
        buffers = self.__dict__.setdefault("_buffers", {})  # not state: a copy or an unpickled one starts anew
        buffer, numel = buffers.get((name, dtype)), sum(sizes)
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype, pin_memory=pinned)
        return list(buffer[:numel].split(sizes))

    def _pinned(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pinned host buffers shaped as the CUDA ``tensors`` and of their dtypes (reused by the next call)."""
        out, by_dtype = [None] * len(tensors), defaultdict(list)
        for i, tensor in enumerate(tensors):
            by_dtype[tensor.dtype].append(i)
        for dtype, index in by_dtype.items():
            buffers = self._buffer("pinned", [tensors[i].numel() for i in index], dtype, pinned=True)
            for i, buffer in zip(index, buffers):
                out[i] = buffer.view_as(tensors[i])
        return out

    def _host_gradients(self, chunk: list[torch.Tensor]) -> list[torch.Tensor]:
        """The chunk's gradients as fp32 host tensors; CUDA ones cross in their own dtype (bf16: half the bytes)
        into pinned memory and widen on the host."""
        grads = [_local(p.grad) for p in chunk]
        wide = [w.view_as(g) for w, g in zip(self._buffer("wide", [g.numel() for g in grads], torch.float32), grads)]
        cuda = [i for i, g in enumerate(grads) if g.device.type != "cpu"]
        for i, pinned in zip(cuda, self._pinned([grads[i] for i in cuda])):
            grads[i] = pinned.copy_(grads[i], non_blocking=True)
        _synchronize(chunk[i] for i in cuda)
        for w, g in zip(wide, grads):
            w.copy_(g)
        return wide

    def _write_back(self, chunk: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
        """The new master weights into the parameters, rounded on the host so that only the narrow copy crosses."""
        targets = [_local(p) for p in chunk]
        cuda = [i for i, t in enumerate(targets) if t.device.type != "cpu"]
        for i, pinned in zip(cuda, self._pinned([targets[i] for i in cuda])):
            targets[i].copy_(pinned.copy_(masters[i]), non_blocking=True)
        for target, master in zip(targets, masters):
            if target.device.type == "cpu":
                target.copy_(master)
        _synchronize(chunk[i] for i in cuda)  # before the next chunk writes the pinned buffers again

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of the master weights on the host; the parameters get the new weights."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_host_memory([p for group in self.param_groups for p in group["params"] if p.grad is not None])
        position = {p: i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for chunk in self._chunks([p for p in group["params"] if p.grad is not None]):
                states = [self._state(p) for p in chunk]
                masters = [_local(s["master"]) for s in states]
                grads = self._host_gradients(chunk)
                settings = dict(beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                                eps=group["eps"])
                if self.state_dtype == torch.float32:
                    _fused_adamw(masters, grads, [_local(s["exp_avg"]) for s in states],
                                 [_local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], settings)
                else:
                    for param, master, grad, state in zip(chunk, masters, grads, states):
                        self._bf16_moments_update(master, grad, state, settings, position[param])
                self._write_back(chunk, masters)
        return loss

    def _bf16_moments_update(self, master: torch.Tensor, grad: torch.Tensor, state: dict, settings: dict,
                             position: int) -> None:
        """One parameter's update with bf16 moments, ``_BLOCK`` elements at a time: the moments' fp32 copies, the
        fused update and the stochastic rounding back each pass over data still in the CPU's caches (over the
        whole parameter, each pass goes to memory: the step took 2.3x the fp32 one on a 16-core host, 1.65x so).
        ``position``: the parameter's place in the optimizer, part of the rounding noise's key."""
        master, grad = master.view(-1), grad.view(-1)
        moments = [_local(state[key]).view(-1) for key in _MOMENTS]
        for start in range(0, master.numel(), _BLOCK):
            end = min(start + _BLOCK, master.numel())
            wide = [w.copy_(m[start:end]) for w, m in zip(self._buffer("moments", [end - start] * 2, torch.float32),
                                                          moments)]
            step = state["step"].clone()  # the fused update counts the step: once per parameter, below
            _fused_adamw([master[start:end]], [grad[start:end]], wide[:1], wide[1:], [step], settings)
            for moment, (w, m) in enumerate(zip(wide, moments)):
                noise = self._noise(end - start, (int(step) - 1, position, start, moment))  # step: counted up
                m[start:end].copy_(round_to_bf16_stochastic(w, noise))  # exact: a bf16 value
        state["step"] += 1

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, except that the state stays in host memory, the master in fp32 and the
        moments in ``state_dtype`` (a state saved with the other ``state_dtype`` is converted).

        (torch's casts every state tensor to its parameter's dtype and device: a bf16 GPU copy of the master.)
        """
        state = state_dict["state"]
        host = {pid: {k: v for k, v in s.items() if k in _HOST_KEYS} for pid, s in state.items()}
        rest = {pid: {k: v for k, v in s.items() if k not in _HOST_KEYS} for pid, s in state.items()}
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for pid, tensors in host.items():
            param = by_id[pid]
            for key, value in tensors.items():
                dtype = torch.float32 if key == "master" else self.state_dtype
                local = _local(value).detach().to("cpu", dtype).contiguous()
                if local.shape != _local(param).shape:
                    raise ValueError(f"HostAdamW state {key!r} of shape {tuple(local.shape)} does not fit the "
                                     f"parameter's local shape {tuple(_local(param).shape)}")
                self.state[param][key] = _like(param, local)
