"""Low-rank adapters (LoRA) on OpenVLA-OFT: train 1.4 % of the 7B's parameters instead of all of them.

LoRA (Hu et al., 2021) freezes a linear layer's weight ``W`` and trains ``A`` ``[rank, in]`` and ``B``
``[out, rank]`` beside it: the layer computes ``x W^T + (alpha / rank) x A^T B^T``. ``B`` starts at zero, so the
adapted model starts as the checkpoint. :func:`add_lora` puts adapters on every linear layer the policy's
forward runs through except the output head, as OpenVLA's own LoRA fine-tuning does (``all-linear``, rank 32,
alpha 16, ``A`` drawn with standard deviation 1/rank).

For the 7B at rank 32 that is 107.9 M parameters, 1.4 % of its 7.54 B: no gradients for the base weights and
AdamW's state for the adapters alone (by count, 14.0 GiB for the bf16 base and 1.6 GiB for the fp32 adapters, their
gradients and moments, against 112 GiB for full fine-tuning with fp32 master weights), so the update needs
neither the host optimizer nor several GPUs for its memory; the backward also skips the base weights' gradient
products.

The adapters are parameters of the existing ``nn.Linear`` modules (``lora_A``, ``lora_B`` and the buffer
``lora_scaling`` beside ``weight``), so the base weights keep their names: a published checkpoint loads as
before, a training checkpoint (``torch.distributed.checkpoint``) holds the adapters with the rest, and
:func:`merge_lora_state` folds them into the weights for the published format
(:meth:`srpo_rl.models.openvla_oft.OpenVLAOFT.save_pretrained` does it), which loads without LoRA.

An adapted layer runs through two custom ops (``srpo_rl::lora_linear`` and its gradient), which accumulate the
adapter's products into the base ones in place, eager and under ``torch.compile`` alike; they treat the base weight
as frozen (a layer whose base is trained again falls back to a plain sum). Under ``torch.autocast`` an adapted
layer computes in autocast's dtype, as a plain linear layer does; its adapters stay in their own dtype.

Inference need not pay for the adapters: :func:`merged_adapters` folds them into the weights in place for the
length of a ``with`` block (the rollout, validation), where every adapted layer runs as the plain linear layer it
was, and puts the base weights back bit for bit when the block ends.

Example:
    >>> import torch
    >>> from srpo_rl.lora import add_lora, merged_adapters
    >>> layer = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> adapters = add_lora(layer, rank=2, alpha=4.0, skip=())
    >>> [tuple(p.shape) for p in adapters], layer[0].weight.requires_grad
    ([(2, 8), (4, 2)], False)
    >>> with merged_adapters(layer):  # inference at the plain layer's cost
    ...     y = layer(torch.ones(1, 8))
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["add_lora", "adapters_active", "check_adapters_apart", "lora_parameters", "lora_targets", "merge_lora_state",
           "merged_adapters"]

_SUFFIXES = ("lora_A", "lora_B", "lora_scaling")


@torch.library.custom_op("srpo_rl::lora_linear", mutates_args=())
def _lora_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows W^T + b + (rows A^T) up^T`` for a frozen ``W``, and ``rows A^T`` (kept for the backward)."""
    down = F.linear(rows, lora_a)
    return F.linear(rows, weight, bias).addmm_(down, up.t()), down


@_lora_linear.register_fake
def _(rows, weight, bias, lora_a, up):
    return rows.new_empty(rows.shape[0], weight.shape[0]), rows.new_empty(rows.shape[0], lora_a.shape[0])


@torch.library.custom_op("srpo_rl::lora_linear_grad", mutates_args=())
def _lora_linear_grad(grad: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                      up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``rows``, ``A`` and ``up``; the adapter's part of the input's accumulates in place."""
    grad_down = grad @ up
    return (grad @ weight).addmm_(grad_down, lora_a), grad_down.t() @ rows, grad.t() @ down


@_lora_linear_grad.register_fake
def _(grad, rows, weight, lora_a, up, down):
    return rows.new_empty(rows.shape), lora_a.new_empty(lora_a.shape), up.new_empty(up.shape)


def _lora_linear_context(ctx, inputs, output):
    rows, weight, _bias, lora_a, up = inputs
    ctx.save_for_backward(rows, weight, lora_a, up, output[1])


def _lora_linear_backward(ctx, grad, _grad_down):
    rows, weight, lora_a, up, down = ctx.saved_tensors
    grad_rows, grad_a, grad_up = _lora_linear_grad(grad.contiguous(), rows, weight, lora_a, up, down)
    return grad_rows, None, None, grad_a, grad_up


_lora_linear.register_autograd(_lora_linear_backward, setup_context=_lora_linear_context)


# FlopCounterMode sees a custom op as one call with no count of its own: the products it runs, 2 FLOPs a multiply-add
@register_flop_formula(torch.ops.srpo_rl.lora_linear)
def _lora_linear_flops(rows_shape, weight_shape, _bias_shape, a_shape, _up_shape, **_) -> int:
    (n, k), out, r = rows_shape, weight_shape[0], a_shape[0]
    return 2 * n * (k * out + k * r + r * out)  # rows W^T, rows A^T, then (rows A^T) up^T


@register_flop_formula(torch.ops.srpo_rl.lora_linear_grad)
def _lora_linear_grad_flops(grad_shape, rows_shape, _weight_shape, a_shape, _up_shape, _down_shape, **_) -> int:
    (n, out), k, r = grad_shape, rows_shape[1], a_shape[0]
    return 2 * n * (out * r + out * k + r * k + r * k + out * r)  # grad up, grad W, (grad up) A, its^T rows, grad^T down


def _lora_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The adapters are kept in fp32 (AdamW's precision) and computed in the input's dtype, the scale on the small B.
    # The adapter's products accumulate in place into the base ones, forward and backward, inside two custom ops:
    # compiled as a plain sum, Inductor rewrites it as an out-of-place addmm that copies the base product first
    # wherever the sum feeds a non-pointwise op (q, k, v: 343 copies, 3 % of the 7B's kernel time). Through the ops,
    # 4 decoder layers of the 7B's shape trained 1.02x faster compiled and 1.01x eager (H100,
    # benchmarks/lora_overhead.py, docs/gpu_lora_overhead_llama_op_h100.json).
    weight, bias, autocast = self.weight, self.bias, contextlib.nullcontext()
    # As autocast runs a linear layer: every operand in its dtype. Autocast has no state on the meta device, where the
    # FLOP counts run (benchmarks/iteration_flops.py): asking it there raises
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        autocast = torch.autocast(device, enabled=False)
    rows = x.reshape(-1, x.shape[-1])
    lora_a = self.lora_A.to(x.dtype)
    up = (self.lora_B * self.lora_scaling).to(x.dtype)
    with autocast:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):  # the ops freeze it
            out = F.linear(rows, weight, bias) + F.linear(rows, lora_a) @ up.t()
        else:
            out, _ = _lora_linear(rows, weight, bias, lora_a, up)
    return out.view(*x.shape[:-1], out.shape[-1])


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0, *, skip: Iterable[str] = ("lm_head",),
             dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Freezes every parameter of ``model`` and adds a rank-``rank`` adapter to each of its ``nn.Linear`` modules.

    Args:
        model: any module; for OpenVLA-OFT the whole :class:`~srpo_rl.models.openvla_oft.OpenVLAOFT` (vision
            towers, projector and language model).
        rank: the adapters' rank (>= 1).
        alpha: the scale numerator: the update is ``alpha / rank * B @ A``.
        skip: names of linear modules left without adapter (the last part of their qualified name); the
            default leaves the output head, whose action rows the forward slices out of the full vocabulary.
            Linear layers whose weights are already frozen (the vision towers' unused last block) get none.
        dtype: the adapters' dtype. fp32 (the default) keeps AdamW's updates exact while the frozen base weights
            stay in bf16; the forward computes the adapters in its input's dtype.

    Returns:
        The adapters' parameters (``A`` then ``B`` of each layer), the only ones left trainable.
    """
    if rank < 1:
        raise ValueError(f"the LoRA rank must be >= 1, got {rank}")
    targets = lora_targets(model, skip)
    if not targets:
        raise ValueError("add_lora found no trainable nn.Linear module to adapt")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapters = []
    for module in targets:
        weight = module.weight
        module.lora_A = nn.Parameter(torch.randn(rank, module.in_features, device=weight.device, dtype=dtype) / rank)
        module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=weight.device, dtype=dtype))
        module.register_buffer("lora_scaling", torch.tensor(alpha / rank, device=weight.device, dtype=dtype))
        module.forward = types.MethodType(_lora_forward, module)
        adapters += [module.lora_A, module.lora_B]
    return adapters


def lora_targets(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[nn.Linear]:
    """The linear modules :func:`add_lora` adapts: trainable, without an adapter yet, not named in ``skip``."""
    skip = set(skip)
    return [module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
            and module.weight.requires_grad and not hasattr(module, "lora_A")]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters of a model :func:`add_lora` adapted (empty for a model without adapters)."""
    return [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in _SUFFIXES[:2]]


def merge_lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its weight (``W + scaling * B @ A``, computed in fp32, stored
    in ``W``'s dtype) and the adapter entries dropped; a state dict without adapters comes back as it is."""
    prefixes = [key[: -len(".lora_A")] for key in state if key.endswith(".lora_A")]
    if not prefixes:
        return state
    merged = {key: value for key, value in state.items() if key.rsplit(".", 1)[-1] not in _SUFFIXES}
    for prefix in prefixes:
        weight = state[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = _merged_weight(weight, state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"],
                                                    state[f"{prefix}.lora_scaling"])
    return merged


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scaling: torch.Tensor) -> torch.Tensor:
    """``W + scaling * B @ A``, computed in fp32 and rounded once to ``W``'s dtype."""
    delta = lora_b.float().to(weight.device) @ lora_a.float().to(weight.device)
    return (weight.float() + scaling.float().to(weight.device) * delta).to(weight.dtype)


def adapters_active(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer that computes its adapter beside its weight (not merged into it)."""
    return "lora_A" in module._parameters and module.__dict__.get("forward") is not None


def check_adapters_apart(model: nn.Module) -> None:
    """Raises ``RuntimeError`` inside a :func:`merged_adapters` block: there each adapted weight already holds
    ``W + scaling * B @ A`` beside its adapters, so a state dict saved then would count the adapters twice."""
    if any("lora_A" in m._parameters and not adapters_active(m) for m in model.modules()):
        raise RuntimeError("the model's adapters are merged into its weights (inside merged_adapters): save it, or "
                           "take its state dict, after the block")


@contextlib.contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every adapted layer of ``model`` runs as a plain linear layer on ``W + scaling * B @ A``.

    For inference with adapters that do not change meanwhile (a rollout, a validation): each adapted layer then
    costs what the frozen layer costs, without the adapters' extra passes over its input and output: on an H200
    the 7B's rollout ran 1.13-1.15x faster merged than with the adapters beside the weights (two runs), and 1.01x
    the plain model's (one run; ``benchmarks/rollout_throughput.py``, ``pool_lora_merged``). The merged
    weight is what :func:`merge_lora_state` publishes, written in place, so CUDA graphs captured inside the block
    stay valid from one block to the next. On leaving the block (also on an error) the base weights are copied
    back from a host copy taken when the block starts: bit for bit, where subtracting ``B @ A`` again would leave
    each bf16 weight rounded twice. The copy is taken at every block, so whatever changed the base weights since
    the last one (a loaded checkpoint, a write through ``.data`` or ``load_state_dict(assign=True)``, which
    tensor version counters do not all see) is what comes back. It costs host memory the size of the adapted
    weights (13.5 GiB for the 7B in bf16, pinned, allocated at the first block) and a copy of them each way per
    block.

    The log-probs a rollout stores (the loss's old ones) then come from the merged weights, and the update's
    current ones from the adapters beside the base: at equal weights the two differ by the merged weight's one
    rounding, far less than the compute dtype's own rounding of them (``tests/test_lora.py`` holds the bf16 case
    to under 5 % of it).

    Layers whose weights are sharded (FSDP2's ``DTensor``) are left as they are: their adapters run beside them.
    Gradients must not flow through the block's forwards: the adapters' gradients would be lost.

    Args:
        model: a model with adapters from :func:`add_lora` (one without runs unchanged).

    Yields:
        ``model``.
    """
    layers = [m for m in model.modules()
              if adapters_active(m) and not isinstance(m.weight, DTensor) and not isinstance(m.lora_A, DTensor)]
    cuda = any(layer.weight.is_cuda for layer in layers)
    try:
        with torch.no_grad():
            for layer in layers:
                _keep_base_copy(layer)
                del layer.forward  # nn.Linear's own forward; from here on the block's end restores the weight
                layer.weight.copy_(_merged_weight(layer.weight, layer.lora_A, layer.lora_B, layer.lora_scaling))
        if cuda:  # the rollout's own CUDA stream must see merged weights
            torch.cuda.synchronize()
        yield model
    finally:
        with torch.no_grad():
            for layer in layers:
                if "forward" not in layer.__dict__:  # merged (an error may have come before the last layer)
                    layer.weight.copy_(layer._lora_base, non_blocking=True)
                    layer.forward = types.MethodType(_lora_forward, layer)
        if cuda:
            torch.cuda.synchronize()


def _keep_base_copy(layer: nn.Linear) -> None:
    """Copies ``layer.weight`` into its host buffer (pinned beside a GPU; allocated once, reused by later blocks).

    Queued on the current stream: the merge that follows writes the weight only after the copy has read it.
    """
    weight = layer.weight
    kept = layer.__dict__.get("_lora_base")
    if kept is None or kept.shape != weight.shape or kept.dtype != weight.dtype:
        kept = layer._lora_base = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=weight.is_cuda)
    kept.copy_(weight, non_blocking=True)
