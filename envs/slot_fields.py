"""Per-slot fields of a batched env's input: the ``"_reset"`` / ``"_step"`` masks and integer ids.

Shared by :class:`~srpo_rl.envs.LiberoVecEnv` and :class:`~srpo_rl.envs.gym_slots.GymSlotEnv`: both accept a
mask or an id per slot as ``[N]`` or ``[N, 1]`` and fail with the expected shape otherwise.

Example:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> td = TensorDict({"_reset": torch.tensor([[True], [False]]), "task_id": torch.tensor([[3], [0]])}, [2])
    >>> slot_mask(td, "_reset", 2).tolist(), slot_values(td, "task_id", 2).tolist()
    ([True, False], [3, 0])
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

__all__ = ["slot_mask", "slot_values"]


def slot_mask(tensordict: TensorDictBase | None, key: str, n: int) -> torch.Tensor:
    """Bool ``[n]`` mask under ``key``; every slot when the key (or the tensordict) is absent."""
    if tensordict is None or key not in tensordict.keys():
        return torch.ones(n, dtype=torch.bool)
    mask = tensordict.get(key)
    if mask.numel() != n:
        raise ValueError(f"{key!r} has shape {list(mask.shape)}; expected [{n}] or [{n}, 1]")
    return mask.reshape(n).to("cpu", torch.bool)


def slot_values(tensordict: TensorDictBase | None, key: str, n: int) -> torch.Tensor | None:
    """Int64 ``[n]`` values under ``key``, or ``None`` when the key (or the tensordict) is absent."""
    if tensordict is None or key not in tensordict.keys():
        return None
    value = tensordict.get(key)
    if value.numel() != n or value.is_floating_point():
        raise ValueError(f"{key!r} must be an integer tensor of shape [{n}, 1], got {value.dtype} {list(value.shape)}")
    return value.reshape(n).to("cpu", torch.int64)
