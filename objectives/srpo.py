"""SRPOLoss: the token-level, asymmetrically clipped policy loss of the SRPO recipe.

One decision step of an OpenVLA-OFT policy emits a chunk of ``8 x 7`` action tokens. The loss
recomputes the log-probability of every executed token under the current policy and clips the
per-token importance ratio PPO-style, with DAPO's "clip-higher" bounds::

    ratio  = exp(clamp(logp - logp_old, -20, 20))
    loss_t = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    loss_t = min(loss_t, -A * clip_ratio_c)          # dual clip, only where A < 0

There is no critic and no KL term (the reference computes reference log-probs but never uses
them); an entropy bonus exists but its coefficient is 0 in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase, dispatch
from tensordict.utils import NestedKey
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.utils import _validate_clip_epsilon

__all__ = ["SRPOLoss", "AGGREGATIONS", "clipped_token_loss"]

#: Supported ways to reduce the per-token losses to one scalar.
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")

# The keys SRPOLoss reads; ClipPPOLoss's value, reward and done keys have no use without a critic.
_KEYS_READ = ("action", "sample_log_prob", "advantage", "token_mask", "rollout_id", "token_weight")

# The reference clamps the log-ratio before exponentiating so a stale or broken token cannot
# overflow the ratio.
_LOG_RATIO_BOUND = 20.0


class SRPOLoss(ClipPPOLoss):
    """SRPO's clipped token-level policy loss, on :class:`~torchrl.objectives.ClipPPOLoss`.

    The input is a tensordict of decision steps (batch ``[M]``, or any batch shape) holding the
    executed action tokens ``[M, 8, 7]``, their log-probs at rollout time ``[M, 8, 7]``, the
    advantage of the step's trajectory ``[M]``, the token mask ``[M, 8, 7]`` (tokens of env steps
    that were actually executed) and the trajectory identifier ``[M]``, plus whatever the actor
    reads. The actor must expose ``get_dist(td)`` returning a distribution over the action
    vocabulary with batch shape ``[M, 8, 7]`` (e.g. a ``torch.distributions.Categorical`` over 256
    tokens at the rollout temperature).

    Args:
        actor_network (TensorDictModuleBase): the policy; only its ``get_dist`` is called.

    Keyword Args:
        clip_epsilon (float or (float, float)): clip bounds ``(eps_low, eps_high)``, the ratio is
            clipped to ``[1 - eps_low, 1 + eps_high]``; a float is symmetric. Defaults to
            ``(0.2, 0.28)``.
        clip_ratio_c (float, optional): dual-clip constant (> 1): for negative advantages the loss
            of a token is capped at ``-A * clip_ratio_c``. ``None`` disables it; the recipe's
            ``10000`` is effectively off. Defaults to ``None``.
        entropy_coeff (float): weight of the entropy bonus. ``0`` (default, the recipe) computes
            the entropy for logging and adds nothing to the loss.
        entropy_bonus (bool, optional): whether to output ``loss_entropy``. Defaults to
            ``entropy_coeff != 0``.
        aggregation (str): ``"seq-mean-token-mean"`` (default, the recipe: mean over trajectories
            of each trajectory's mean over its valid tokens) or ``"token-mean"`` (mean over all
            valid tokens of the batch).
        functional (bool): TorchRL's functional-parameter mode. Defaults to ``False``: the loss
            needs no target copy of the actor, and calling the actor directly keeps sharded
            (FSDP) parameters under their wrapper's control.
        device (torch.device, optional): where :class:`~torchrl.objectives.LossModule` keeps the
            loss's coefficient buffers (clip bounds, entropy coefficient). Defaults to the device of
            the actor's first parameter.

    **Gradient accumulation.** The aggregation is a weighted sum of per-token losses with one
    weight per step: ``1 / (G * n_traj)`` for ``"seq-mean-token-mean"`` (``G`` trajectories in the
    mini-batch, ``n_traj`` valid tokens of the step's trajectory in the mini-batch) and
    ``1 / n_tokens`` for ``"token-mean"``. Without a ``token_weight`` entry the weights are
    computed from the input itself. To split one mini-batch into micro-batches (of whole
    trajectories or of slices of trajectories), call :meth:`add_token_weights` on the whole
    mini-batch first, then split it and **sum** the micro-batch losses (do not divide by the
    number of micro-batches): the accumulated gradient equals the mini-batch gradient exactly.
    The diagnostics (clip fractions, ratio statistics, KL, entropy) are plain means over the
    valid tokens of each call. Data-parallel training averages the ranks' gradients, which equals
    the global mean over trajectories when every rank holds the same number of trajectories; with
    ``"token-mean"`` it is the mean over ranks of each rank's token mean, not the mean over every
    token of the global mini-batch (the ranks' token counts differ).

    Reads (configurable with :meth:`set_keys`): ``action`` (``"action_tokens"``),
    ``sample_log_prob`` (``"action_log_prob"``), ``advantage`` (``"advantage"``),
    ``token_mask`` (``"token_mask"``; absent means every token is valid), ``rollout_id``
    (``"rollout_id"``; needed by ``"seq-mean-token-mean"`` unless ``token_weight`` is given),
    ``token_weight`` (``"token_weight"``, optional), plus the actor's inputs.

    Writes: ``loss_objective``, ``loss_entropy`` (with ``entropy_bonus``), ``entropy``,
    ``clip_fraction`` (= low + high), ``clip_fraction_low`` (``A < 0`` and
    ``ratio < 1 - eps_low``), ``clip_fraction_high`` (``A > 0`` and ``ratio > 1 + eps_high``),
    ``dual_clip_fraction`` (with ``clip_ratio_c``), ``approx_kl`` (the low-variance k3 estimator
    ``mean((ratio - 1) - log ratio)`` of KL(old || new)), ``ratio_mean``, ``ratio_min``,
    ``ratio_max``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import TensorDictModuleBase
        >>> class TokenHead(TensorDictModuleBase):
        ...     in_keys, out_keys = ["obs"], []
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = torch.nn.Linear(4, 8 * 7 * 256)
        ...     def get_dist(self, td):
        ...         logits = self.linear(td["obs"]).unflatten(-1, (8, 7, 256))
        ...         return torch.distributions.Categorical(logits=logits)
        >>> actor = TokenHead()
        >>> steps = TensorDict(obs=torch.randn(6, 4), batch_size=[6])
        >>> with torch.no_grad():
        ...     dist = actor.get_dist(steps)
        ...     steps["action_tokens"] = dist.sample()
        ...     steps["action_log_prob"] = dist.log_prob(steps["action_tokens"])
        >>> steps["advantage"] = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
        >>> steps["rollout_id"] = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> steps["token_mask"] = torch.ones(6, 8, 7, dtype=torch.bool)
        >>> loss = SRPOLoss(actor, clip_epsilon=(0.2, 0.28))
        >>> out = loss(steps)
        >>> out["loss_objective"].backward()
        >>> float(out["ratio_mean"])
        1.0
    """

    @dataclass
    class _AcceptedKeys(ClipPPOLoss._AcceptedKeys):
        """Tensordict keys of :class:`SRPOLoss`, renamed with ``set_keys(name=key)``.

        Attributes:
            action (NestedKey): executed action tokens, int64 ``[M, 8, 7]``.
                Defaults to ``"action_tokens"``.
            sample_log_prob (NestedKey): their log-probs at rollout time, ``[M, 8, 7]``.
                Defaults to ``"action_log_prob"``.
            advantage (NestedKey): advantage of the step's trajectory, ``[M]`` (``[M, 1]`` and
                per-token ``[M, 8, 7]`` are accepted too). Defaults to ``"advantage"``.
            token_mask (NestedKey): bool ``[M, 8, 7]``, the tokens of executed env steps.
                Defaults to ``"token_mask"``.
            rollout_id (NestedKey): int ``[M]``, the trajectory each step belongs to.
                Defaults to ``"rollout_id"``.
            token_weight (NestedKey): optional float ``[M]``, the aggregation weight of each valid
                token of the step (see :meth:`SRPOLoss.add_token_weights`).
                Defaults to ``"token_weight"``.
        """

        action: NestedKey = "action_tokens"
        sample_log_prob: NestedKey = "action_log_prob"
        token_mask: NestedKey = "token_mask"
        rollout_id: NestedKey = "rollout_id"
        token_weight: NestedKey = "token_weight"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(
        self,
        actor_network: TensorDictModuleBase,
        *,
        clip_epsilon: float | tuple[float, float] = (0.2, 0.28),
        clip_ratio_c: float | None = None,
        entropy_coeff: float = 0.0,
        entropy_bonus: bool | None = None,
        aggregation: str = "seq-mean-token-mean",
        functional: bool = False,
        device: torch.device | None = None,
    ):
        if not (hasattr(actor_network, "get_dist") and hasattr(actor_network, "in_keys")):
            raise TypeError(
                f"actor_network must be a tensordict module with in_keys and get_dist(tensordict) (e.g. "
                f"srpo_rl.policy.OpenVLAOFTPolicy), got {type(actor_network).__name__}"
            )
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        if isinstance(clip_epsilon, (int, float)):
            clip_epsilon = (float(clip_epsilon), float(clip_epsilon))
        clip_epsilon = _validate_clip_epsilon(tuple(clip_epsilon))
        if clip_ratio_c is not None and not clip_ratio_c > 1.0:
            raise ValueError(
                f"clip_ratio_c={clip_ratio_c!r} must be > 1 (dual clip), or None to disable it"
            )
        if entropy_coeff < 0:
            raise ValueError(f"entropy_coeff={entropy_coeff!r} must be >= 0")
        if entropy_bonus is None:
            entropy_bonus = entropy_coeff != 0
        super().__init__(
            actor_network,
            None,
            clip_epsilon=clip_epsilon,
            entropy_bonus=entropy_bonus,
            entropy_coeff=float(entropy_coeff),
            critic_coeff=None,
            functional=functional,
            device=device,
        )
        self.aggregation = aggregation
        self.clip_ratio_c = clip_ratio_c

    # ---- keys ---------------------------------------------------------------------------------
    def set_keys(self, **kwargs: NestedKey) -> None:
        """Renames the keys this loss reads, e.g. ``set_keys(advantage="adv")``.

        Only the keys of :class:`SRPOLoss._AcceptedKeys` that it reads are accepted; the PPO keys it
        inherits and never reads (value, value_target, reward, done, ...) are refused rather than
        silently ignored.
        """
        unused = sorted(set(kwargs) - set(_KEYS_READ))
        if unused:
            raise ValueError(
                f"SRPOLoss reads no {', '.join(map(repr, unused))} key (it has no critic); "
                f"the keys it reads are {', '.join(_KEYS_READ)}"
            )
        super().set_keys(**kwargs)

    def _set_in_keys(self):
        keys = list(self.actor_network.in_keys)
        keys += [
            self.tensor_keys.action,
            self.tensor_keys.sample_log_prob,
            self.tensor_keys.advantage,
            self.tensor_keys.token_mask,
            self.tensor_keys.rollout_id,
        ]
        self._in_keys = list(dict.fromkeys(keys))

    @property
    def out_keys(self) -> list[str]:
        """The loss terms and diagnostics :meth:`forward` returns (the entropy term only with ``entropy_bonus``)."""
        if self._out_keys is None:
            keys = ["loss_objective"]
            if self.entropy_bonus:
                keys.append("loss_entropy")
            keys += ["entropy", "clip_fraction", "clip_fraction_low", "clip_fraction_high"]
            if self.clip_ratio_c is not None:
                keys.append("dual_clip_fraction")
            keys += ["approx_kl", "ratio_mean", "ratio_min", "ratio_max"]
            self._out_keys = keys
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values: list[str]) -> None:
        self._out_keys = values

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        # no value estimator: the advantage is always given
        self._set_in_keys()

    def make_value_estimator(self, value_type: Any = None, **hyperparams: Any) -> NoReturn:
        """Refused: the loss has no critic; the GRPO advantage comes from :class:`GroupAdvantage`."""
        raise NotImplementedError(
            "SRPOLoss has no critic and no value estimator: compute the advantage beforehand "
            "(srpo_rl.objectives.GroupAdvantage) and pass it under the 'advantage' key"
        )

    # ---- aggregation weights ------------------------------------------------------------------
    def token_weights(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Aggregation weight of each valid token of each step, shape ``tensordict.batch_size``.

        ``"token-mean"``: ``1 / n_tokens``; ``"seq-mean-token-mean"``: ``1 / (G * n_traj)`` with
        ``G`` the number of trajectories (``rollout_id`` values) that have valid tokens and
        ``n_traj`` the number of valid tokens of the step's trajectory in ``tensordict``.
        """
        token_mask = self._token_mask(tensordict, None)
        return _token_weights(
            token_mask, self._rollout_id(tensordict), self.aggregation, tensordict.batch_size
        )

    def add_token_weights(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Writes :meth:`token_weights` of the whole mini-batch under the ``token_weight`` key.

        Call it on a mini-batch before splitting it into micro-batches; the sum of the micro-batch
        losses then equals the mini-batch loss, and so do the gradients.
        """
        tensordict.set(self.tensor_keys.token_weight, self.token_weights(tensordict))
        return tensordict

    def _rollout_id(self, tensordict: TensorDictBase) -> torch.Tensor | None:
        if self.aggregation != "seq-mean-token-mean":
            return None
        rollout_id = tensordict.get(self.tensor_keys.rollout_id, None)
        if rollout_id is None:
            raise KeyError(
                f"aggregation 'seq-mean-token-mean' needs the trajectory id under "
                f"{self.tensor_keys.rollout_id!r} (or precomputed weights under "
                f"{self.tensor_keys.token_weight!r}); rename it with set_keys(rollout_id=...)"
            )
        return rollout_id

    def _token_mask(self, tensordict: TensorDictBase, like: torch.Tensor | None) -> torch.Tensor:
        token_mask = tensordict.get(self.tensor_keys.token_mask, None)
        if token_mask is None:
            like = tensordict.get(self.tensor_keys.action) if like is None else like
            return torch.ones(like.shape, dtype=torch.bool, device=like.device)
        if like is not None and token_mask.shape != like.shape:
            raise ValueError(
                f"token mask {self.tensor_keys.token_mask!r} has shape {tuple(token_mask.shape)}, "
                f"the log-probs have shape {tuple(like.shape)}"
            )
        return token_mask.bool()

    def log_prob(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The current policy's log-probs of the stored action tokens, ``[M, 8, 7]``.

        The update's own forward; call it under ``torch.no_grad()`` to refresh the stored
        ``sample_log_prob`` of trajectories sampled before the latest optimizer steps
        (:func:`srpo_rl.trainer.recompute_log_probs`).
        """
        return self._get_cur_log_prob(tensordict)[0]

    # ---- forward ------------------------------------------------------------------------------
    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """The clipped token-level policy loss of a batch of trajectories.

        Returns the entries the class docstring lists: ``loss_objective`` (and ``loss_entropy`` with
        ``entropy_bonus``), the terms to sum and minimise, and detached diagnostics.
        """
        advantage = tensordict.get(self.tensor_keys.advantage, None)
        if advantage is None:
            raise KeyError(
                f"no advantage under {self.tensor_keys.advantage!r}: SRPOLoss has no critic; "
                "compute group advantages first or rename the key with set_keys(advantage=...)"
            )
        for name in ("sample_log_prob", "action"):
            key = getattr(self.tensor_keys, name)
            if tensordict.get(key, None) is None:
                raise KeyError(f"no {name} under {key!r}: the rollout stores it; rename the key with "
                               f"set_keys({name}=...)")
        old_log_prob = tensordict.get(self.tensor_keys.sample_log_prob)
        if old_log_prob.requires_grad:
            raise RuntimeError(
                f"the stored log-probs {self.tensor_keys.sample_log_prob!r} require grad"
            )
        log_prob, dist, _ = self._get_cur_log_prob(tensordict)
        if log_prob.shape != old_log_prob.shape:
            raise ValueError(
                f"current log-probs have shape {tuple(log_prob.shape)} but the stored "
                f"{self.tensor_keys.sample_log_prob!r} have {tuple(old_log_prob.shape)}"
            )
        # compute in at least float32: the weights 1 / (G * n_traj) do not survive bfloat16
        dtype = torch.promote_types(log_prob.dtype, torch.float32)
        log_prob, old_log_prob = log_prob.to(dtype), old_log_prob.to(dtype)
        token_mask = self._token_mask(tensordict, log_prob)
        advantage = _expand_advantage(advantage, log_prob)
        weight = tensordict.get(self.tensor_keys.token_weight, None)
        if weight is None:
            weight = _token_weights(
                token_mask, self._rollout_id(tensordict), self.aggregation, tensordict.batch_size
            )
        weight = _expand_step_value(weight.to(dtype), log_prob, "token_weight")
        low, high = 1.0 - self.clip_epsilon_low, 1.0 + self.clip_epsilon_high

        log_ratio = (log_prob - old_log_prob).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
        ratio = log_ratio.exp()
        token_loss = clipped_token_loss(ratio, advantage, low, high, self.clip_ratio_c)
        # where() rather than a product with the mask: a non-finite value on an invalid token
        # must not reach the sum
        out = TensorDict({"loss_objective": torch.where(token_mask, token_loss * weight, 0).sum()})

        if self.entropy_bonus:
            entropy = dist.entropy().to(dtype)
            out.set(
                "loss_entropy",
                -self.entropy_coeff * torch.where(token_mask, entropy * weight, 0).sum(),
            )
            entropy = entropy.detach()
        else:
            with torch.no_grad():
                entropy = dist.entropy().to(dtype)
        with torch.no_grad():
            out.update(
                _diagnostics(
                    ratio, log_ratio, advantage, entropy, token_mask, low, high, self.clip_ratio_c
                )
            )
        return out


def clipped_token_loss(
    ratio: torch.Tensor,
    advantage: torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    clip_ratio_c: float | None = None,
) -> torch.Tensor:
    """Per-token clipped surrogate loss (to minimise), as in the reference.

    ``max(-A * ratio, -A * clip(ratio, low, high))``, then, with dual clip, ``min(., -A * c)``
    where ``A < 0``.

    Examples:
        >>> ratio = torch.tensor([1.5, 1.5, 0.5, 0.5])
        >>> adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
        >>> clipped_token_loss(ratio, adv, 0.8, 1.28)
        tensor([-1.2800,  1.5000, -0.5000,  0.8000])
    """
    loss_unclipped = -advantage * ratio
    loss_clipped = -advantage * ratio.clamp(low, high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    if clip_ratio_c is not None:
        dual = torch.minimum(loss, -advantage * clip_ratio_c)
        loss = torch.where(advantage < 0, dual, loss)
    return loss


def _token_weights(
    token_mask: torch.Tensor,
    rollout_id: torch.Tensor | None,
    aggregation: str,
    batch_size: torch.Size,
) -> torch.Tensor:
    steps = batch_size.numel()
    per_step = token_mask.reshape(steps, -1).sum(-1).to(torch.float64)
    if aggregation == "token-mean":
        weight = (1.0 / per_step.sum().clamp_min(1.0)).expand(steps)
        return weight.to(torch.float32).reshape(batch_size)
    if rollout_id.numel() != steps:
        raise ValueError(
            f"rollout id has shape {tuple(rollout_id.shape)}, expected the batch shape "
            f"{tuple(batch_size)}"
        )
    ids, traj = torch.unique(rollout_id.reshape(steps), return_inverse=True)
    per_traj = per_step.new_zeros(ids.numel()).index_add_(0, traj, per_step)
    num_traj = (per_traj > 0).sum().clamp_min(1)
    # a trajectory without valid tokens has no weight to give; clamp_min avoids its 0 / 0
    weight = 1.0 / (num_traj * per_traj.clamp_min(1.0))[traj]
    return weight.to(torch.float32).reshape(batch_size)


def _expand_step_value(value: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    # one value per step ([*B] or [*B, 1]) or per token ([*B, 8, 7]) -> like's shape
    if value.shape == like.shape:
        return value
    batch = like.shape[:-2]
    if value.shape == (*batch, 1):
        value = value.squeeze(-1)
    if value.shape != batch:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}; expected one value per step "
            f"{tuple(batch)} or per token {tuple(like.shape)}"
        )
    return value.reshape(*batch, 1, 1).expand_as(like)


def _expand_advantage(advantage: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantage.requires_grad:
        raise RuntimeError("the advantage requires grad; it must be a constant of the loss")
    return _expand_step_value(advantage.to(like.dtype), like, "advantage")


def _diagnostics(
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    advantage: torch.Tensor,
    entropy: torch.Tensor,
    token_mask: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    clip_ratio_c: float | None,
) -> dict[str, torch.Tensor]:
    count = token_mask.sum()

    def mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(token_mask, x.to(ratio.dtype), 0).sum() / count.clamp_min(1)

    def extremum(fill: float, reduce) -> torch.Tensor:
        value = reduce(torch.where(token_mask, ratio, fill))
        return torch.where(count > 0, value, torch.nan)

    # a clip "binds" where it zeroes the token's gradient: above the upper bound for A > 0,
    # below the lower bound for A < 0
    clip_high = (advantage > 0) & (ratio > high)
    clip_low = (advantage < 0) & (ratio < low)
    out = {
        "entropy": mean(entropy),
        "clip_fraction": mean(clip_high | clip_low),
        "clip_fraction_low": mean(clip_low),
        "clip_fraction_high": mean(clip_high),
        "approx_kl": mean((ratio - 1) - log_ratio),
        "ratio_mean": mean(ratio),
        "ratio_min": extremum(torch.inf, torch.amin),
        "ratio_max": extremum(-torch.inf, torch.amax),
    }
    if clip_ratio_c is not None:
        out["dual_clip_fraction"] = mean((advantage < 0) & (ratio > clip_ratio_c))
    return out
