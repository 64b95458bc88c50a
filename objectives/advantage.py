"""GRPO outcome advantages over groups of trajectories, broadcast to every executed action token.

A group is the ``rollout.n`` trajectories started from one initial state. Each trajectory's
scalar reward ``r_i`` (the shaped reward, ``reward_coef * score``) is normalised within its
group::

    A_i = (r_i - mean_g) / (std_g + 1e-6)     # unbiased std; mean-only without std scaling

and copied to every action token of every env step the trajectory executed (zero elsewhere).

Why not torchrl's ``MCAdvantage``: it normalises and filters (``keep_return_bounds``) on the same
per-step return, while SRPO filters groups on their *success rate* (before the reward is even
computed, see :mod:`srpo_rl.objectives.sampling`) and normalises the *shaped* reward; its bounds
are exclusive where the recipe's are inclusive; it refuses groups of one trajectory, which the
reference scores with mean 0 and std 1; it works on per-step trajectories written to a replay
buffer one by one (and its oversampling keeps queued candidates between steps), while SRPO's
batch is already grouped, one row per trajectory. The formula itself is a few lines, so it is
computed here, vectorised over all groups of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from srpo_rl.keys import rename_keys

__all__ = ["GroupAdvantage", "group_advantages", "token_mask_from_chunk_steps"]


def group_advantages(
    reward: torch.Tensor,
    group_id: torch.Tensor,
    *,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantage of each trajectory within its group, as in the reference.

    ``(r - mean_g) / (std_g + epsilon)`` with the unbiased (N - 1) std, or ``r - mean_g`` when
    ``norm_by_std`` is ``False``. A group of one trajectory uses mean 0 and std 1 (the
    reference's convention), so its advantage is ``r / (1 + epsilon)``. A group whose rewards
    are all equal gets exactly 0 (the mean is not recomputed from a floating-point sum, whose
    rounding error divided by ``epsilon`` would otherwise leak a spurious advantage).

    Args:
        reward (Tensor): ``[N]`` scalar reward of each trajectory.
        group_id (Tensor): ``[N]`` integer group of each trajectory (any order).

    Returns:
        ``[N]`` float32 advantages.

    Examples:
        >>> group_advantages(torch.tensor([5.0, 0.0, 0.0, 0.0]), torch.tensor([3, 3, 3, 3]))
        tensor([ 1.5000, -0.5000, -0.5000, -0.5000])
    """
    if reward.shape != group_id.shape or reward.ndim != 1:
        raise ValueError(
            f"reward {tuple(reward.shape)} and group_id {tuple(group_id.shape)} must both be "
            "[N], one value per trajectory"
        )
    if epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0")
    r = reward.to(torch.float64)
    _, group = torch.unique(group_id, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.bincount(group, minlength=num_groups).to(torch.float64)
    mean = r.new_zeros(num_groups).index_add_(0, group, r) / count
    sq_dev = r.new_zeros(num_groups).index_add_(0, group, (r - mean[group]) ** 2)
    std = (sq_dev / (count - 1).clamp_min(1)).sqrt()
    lowest = r.new_full((num_groups,), torch.inf).scatter_reduce_(0, group, r, "amin")
    highest = r.new_full((num_groups,), -torch.inf).scatter_reduce_(0, group, r, "amax")
    single = count == 1
    mean = torch.where(single, 0.0, mean)
    std = torch.where(single, 1.0, std)
    centered = torch.where((~single & (lowest == highest))[group], 0.0, r - mean[group])
    if norm_by_std:
        centered = centered / (std[group] + epsilon)
    return centered.to(torch.float32)


def token_mask_from_chunk_steps(
    step_mask: torch.Tensor, chunk_steps: torch.Tensor, chunk_len: int, action_dim: int
) -> torch.Tensor:
    """Valid action tokens: sub-step ``j`` of an executed decision with ``j < chunk_steps``.

    Args:
        step_mask (Tensor): bool ``[*B]``, decision executed.
        chunk_steps (Tensor): int ``[*B]``, env sub-steps executed in that decision's chunk.

    Returns:
        bool ``[*B, chunk_len, action_dim]``.

    Examples:
        >>> token_mask_from_chunk_steps(
        ...     torch.tensor([True, False]), torch.tensor([2, 8]), chunk_len=3, action_dim=1
        ... ).squeeze(-1)
        tensor([[ True,  True, False],
                [False, False, False]])
    """
    if step_mask.shape != chunk_steps.shape:
        raise ValueError(
            f"step mask {tuple(step_mask.shape)} and chunk_steps {tuple(chunk_steps.shape)} "
            "must have the same shape"
        )
    sub_step = torch.arange(chunk_len, device=chunk_steps.device)
    valid = step_mask.bool().unsqueeze(-1) & (sub_step < chunk_steps.unsqueeze(-1))
    return valid.unsqueeze(-1).expand(*valid.shape, action_dim)


class GroupAdvantage(TensorDictModuleBase):
    """GRPO group advantage for a batch of trajectories (batch ``[N]``, steps ``[N, T]``).

    Reads the scalar reward and group id of each trajectory, the executed-decision mask and the
    executed sub-steps of each chunk; writes the trajectory advantage ``[N]``, the per-step
    advantage ``[N, T]`` (zero on unexecuted decisions) and the token mask ``[N, T, 8, 7]``
    (the tokens of executed env steps), in the trajectory layout of the rollout.

    Keyword Args:
        norm_adv_by_std_in_grpo (bool): divide by the group's std (+ ``epsilon``). Defaults to
            ``True``.
        epsilon (float): added to the std. Defaults to ``1e-6``.
        gamma (float): discount, accepted for config parity with the reference. A GRPO outcome
            advantage has no per-step bootstrapping, so it has no effect (the recipe sets 1).
        lam (float): GAE lambda; same as ``gamma``: no effect on GRPO.
        chunk_len (int): env steps per decision (8 for OpenVLA-OFT on LIBERO).
        action_dim (int): tokens per env step (7).

    Keys (``set_keys``): ``reward`` (``"reward"``, float ``[N]``), ``group_id`` (``"group_id"``),
    ``step_mask`` (``("steps", "mask")``), ``chunk_steps`` (``("steps", "next", "chunk_steps")``)
    in; ``advantage`` (``"advantage"``), ``step_advantage`` (``("steps", "advantage")``),
    ``token_mask`` (``("steps", "token_mask")``) out.

    Examples:
        >>> from tensordict import TensorDict
        >>> batch = TensorDict(
        ...     reward=torch.tensor([5.0, 0.0]),
        ...     group_id=torch.tensor([0, 0]),
        ...     steps=TensorDict(
        ...         mask=torch.tensor([[True, True], [True, False]]),
        ...         next=TensorDict(chunk_steps=torch.tensor([[8, 3], [8, 0]]), batch_size=[2, 2]),
        ...         batch_size=[2, 2],
        ...     ),
        ...     batch_size=[2],
        ... )
        >>> batch = GroupAdvantage()(batch)
        >>> batch["steps", "advantage"]
        tensor([[ 0.7071,  0.7071],
                [-0.7071,  0.0000]])
        >>> batch["steps", "token_mask"].sum((-1, -2))
        tensor([[56, 21],
                [56,  0]])
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys of :class:`GroupAdvantage`, renamed with ``set_keys(name=key)``."""

        reward: NestedKey = "reward"
        group_id: NestedKey = "group_id"
        step_mask: NestedKey = ("steps", "mask")
        chunk_steps: NestedKey = ("steps", "next", "chunk_steps")
        advantage: NestedKey = "advantage"
        step_advantage: NestedKey = ("steps", "advantage")
        token_mask: NestedKey = ("steps", "token_mask")

    def __init__(
        self,
        *,
        norm_adv_by_std_in_grpo: bool = True,
        epsilon: float = 1e-6,
        gamma: float = 1.0,
        lam: float = 1.0,
        chunk_len: int = 8,
        action_dim: int = 7,
    ):
        super().__init__()
        for name, value in (("gamma", gamma), ("lam", lam)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must lie in [0, 1] (it has no effect on GRPO)")
        for name, value in (("chunk_len", chunk_len), ("action_dim", action_dim)):
            if value < 1:
                raise ValueError(f"{name}={value!r} must be >= 1")
        if epsilon < 0:
            raise ValueError(f"epsilon={epsilon!r} must be >= 0")
        self.norm_adv_by_std_in_grpo = norm_adv_by_std_in_grpo
        self.epsilon = epsilon
        self.gamma = gamma
        self.lam = lam
        self.chunk_len = chunk_len
        self.action_dim = action_dim
        self.tensor_keys = self._AcceptedKeys()

    def set_keys(self, **kwargs: NestedKey) -> GroupAdvantage:
        """Renames tensordict keys, e.g. ``set_keys(reward="shaped_reward")``."""
        rename_keys(self.tensor_keys, **kwargs)
        return self

    @property
    def in_keys(self) -> list[NestedKey]:
        """The keys read: reward, group id, step mask and chunk steps (renamed by :meth:`set_keys`)."""
        keys = self.tensor_keys
        return [keys.reward, keys.group_id, keys.step_mask, keys.chunk_steps]

    @property
    def out_keys(self) -> list[NestedKey]:
        """The keys written: the trajectory advantage, the same on each of its valid steps, and the token mask."""
        keys = self.tensor_keys
        return [keys.advantage, keys.step_advantage, keys.token_mask]

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Writes the group-normalised advantages and the token mask into ``tensordict`` (in place) and returns it."""
        keys = self.tensor_keys
        for name in ("reward", "group_id", "step_mask", "chunk_steps"):
            if tensordict.get(getattr(keys, name), None) is None:
                raise KeyError(f"no {name} under {getattr(keys, name)!r}; rename the key with set_keys({name}=...)")
        reward = tensordict.get(keys.reward)
        group_id = tensordict.get(keys.group_id)
        for name, value in (("reward", reward), ("group_id", group_id)):
            if value.numel() != tensordict.numel():  # the rollout stores per-trajectory scalars as [N]; [N, 1] too
                raise ValueError(f"{name} has shape {tuple(value.shape)}: one value per trajectory, "
                                 f"{tuple(tensordict.batch_size)}, expected")
        reward = reward.reshape(tensordict.batch_size)
        group_id = group_id.reshape(tensordict.batch_size)
        advantage = group_advantages(
            reward, group_id, norm_by_std=self.norm_adv_by_std_in_grpo, epsilon=self.epsilon
        )
        step_mask = tensordict.get(keys.step_mask).bool()
        chunk_steps = tensordict.get(keys.chunk_steps)
        tensordict.set(keys.advantage, advantage)
        tensordict.set(keys.step_advantage, torch.where(step_mask, advantage.unsqueeze(-1), 0.0))
        tensordict.set(
            keys.token_mask,
            token_mask_from_chunk_steps(
                step_mask, chunk_steps, self.chunk_len, self.action_dim
            ).contiguous(),
        )
        return tensordict
