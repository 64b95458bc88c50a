"""Embodied dynamic sampling: keep informative groups, refill the batch across rollout rounds.

A group (the trajectories started from one initial state) whose rollouts all fail or all succeed
gives every trajectory the same GRPO advantage, zero: it teaches nothing. Right after the rollout,
and before the reward is computed, the reference therefore

- keeps a group only if its success rate lies in ``[accuracy_lower_bound, accuracy_upper_bound]``
  (``filter_accuracy``, inclusive bounds, 0.1 / 0.9 in the recipe);
- optionally drops a group if any of its rollouts ran to ``max_steps`` (``filter_truncated``; the
  reference's ``finish_step >= max_steps``, which also counts a success on the very last step);
- caches the surviving groups until there are ``train_batch_size`` of them, rolling out more
  rounds if needed, trains on the first ``train_batch_size`` and carries the surplus to the next
  step (the semantics of siiRL's ``feature/srpo-embodied`` branch).

Each rollout round is a whole batch, as in the reference (siiRL rolls out the next dataloader batch of
``train_batch_size`` prompts; SimpleVLA-RL's batch is ``train_batch_size * oversample_factor``):
``ceil(oversample_factor * train_batch_size)`` groups, ``oversample_factor`` being declared but unused in
siiRL and used as in SimpleVLA-RL. Asking only for the groups still missing would shrink the rounds
geometrically: at a keep rate k the reference needs about 1/k rounds, the shrinking requests many more,
each a round of few rollouts that leaves most env slots idle.
Everything here is deterministic: groups are served first in, first out, with no random choice.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import is_non_tensor, is_tensor_collection, pad, TensorDict, TensorDictBase
from tensordict.utils import NestedKey

from srpo_rl.keys import rename_keys

__all__ = ["EmbodiedSampler", "SampleResult", "filter_groups"]

_STAT_NAMES = (
    "rounds",
    "groups_requested",
    "groups_seen",
    "groups_kept",
    "groups_dropped",
    "dropped_accuracy_low",
    "dropped_accuracy_high",
    "dropped_truncated",
    "dropped_failed",
    "batches_served",
    "steps_skipped",
)


@dataclass
class _Keys:
    """Tensordict keys read by the sampler, renamed with ``set_keys(name=key)``."""

    group_id: NestedKey = "group_id"
    success: NestedKey = "success"
    truncated: NestedKey = "truncated"
    failed: NestedKey = "failed"
    num_steps: NestedKey = "num_steps"
    steps: NestedKey = "steps"


def filter_groups(
    batch: TensorDictBase,
    *,
    filter_accuracy: bool = True,
    accuracy_lower_bound: float = 0.1,
    accuracy_upper_bound: float = 0.9,
    filter_truncated: bool = False,
    max_steps: int | None = None,
    drop_failed: bool = True,
    keys: _Keys | None = None,
) -> tuple[list[torch.Tensor], Counter]:
    """Splits a trajectory batch ``[N]`` into groups and applies the group filters.

    A group's success rate is ``mean(success)`` over its trajectories; it passes ``filter_accuracy``
    if ``lower <= rate <= upper``. ``filter_truncated`` drops a group if any trajectory is
    ``truncated`` or, with ``max_steps``, ran ``num_steps >= max_steps`` env steps: the reference's
    rule, under which a success on the very last step counts as truncated too (the env's
    ``truncated`` flag, Gymnasium's, is set only without success). ``drop_failed`` drops a group if
    any trajectory's worker crashed (``failed``, when present): its success rate would be biased.
    Each filter is counted on its own, so a group can count under several.

    Returns:
        The row indices of each kept group, in order of first appearance, and a ``Counter`` with
        ``groups_seen``, ``groups_kept``, ``groups_dropped``, ``dropped_accuracy_low``,
        ``dropped_accuracy_high``, ``dropped_truncated``, ``dropped_failed``.

    Examples:
        >>> batch = TensorDict(
        ...     group_id=torch.tensor([0, 0, 1, 1]),
        ...     success=torch.tensor([True, False, False, False]),
        ...     batch_size=[4],
        ... )
        >>> kept, stats = filter_groups(batch)
        >>> kept, stats["dropped_accuracy_low"]
        ([tensor([0, 1])], 1)
    """
    _check_bounds(accuracy_lower_bound, accuracy_upper_bound)
    keys = _Keys() if keys is None else keys
    group_id = batch.get(keys.group_id).reshape(-1).tolist()
    success = batch.get(keys.success).reshape(-1).tolist()
    truncated = _flags(batch, keys.truncated, required=filter_truncated)
    if filter_truncated and max_steps is not None:
        num_steps = batch.get(keys.num_steps, None)
        if num_steps is None:
            raise KeyError(f"filter_truncated with max_steps needs {keys.num_steps!r} in the trajectory batch")
        truncated = [t or n >= max_steps for t, n in zip(truncated, num_steps.reshape(-1).tolist())]
    failed = _flags(batch, keys.failed, required=False)
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(group_id):
        rows.setdefault(group, []).append(row)
    kept, stats = [], Counter({name: 0 for name in _STAT_NAMES[2:9]})
    for members in rows.values():
        stats["groups_seen"] += 1
        # exact rational compare: k / n and a bound like 0.1 round to the same double when equal
        rate = sum(bool(success[i]) for i in members) / len(members)
        drops = {
            "dropped_accuracy_low": filter_accuracy and rate < accuracy_lower_bound,
            "dropped_accuracy_high": filter_accuracy and rate > accuracy_upper_bound,
            "dropped_truncated": filter_truncated and any(truncated[i] for i in members),
            "dropped_failed": drop_failed and any(failed[i] for i in members),
        }
        for name, dropped in drops.items():
            stats[name] += int(dropped)
        if any(drops.values()):
            stats["groups_dropped"] += 1
        else:
            stats["groups_kept"] += 1
            kept.append(torch.tensor(members, dtype=torch.long))
    return kept, stats


@dataclass
class SampleResult:
    """Outcome of :meth:`EmbodiedSampler.sample`.

    Attributes:
        batch: the training batch (``train_batch_size`` groups, fewer only with
            ``allow_partial``), or ``None`` when the step must be skipped.
        reason: why the batch is what it is, for the log.
        rounds: rollout rounds run by this call.
        stats: counters of this call (see :class:`EmbodiedSampler`) plus ``groups_carried``.
    """

    batch: TensorDictBase | None
    reason: str
    rounds: int
    stats: dict[str, int] = field(default_factory=dict)


class EmbodiedSampler:
    """Group filters, oversampling and refill of a training batch across rollout rounds.

    Args:
        train_batch_size (int): groups per training step (64 prompts in the recipe).

    Keyword Args:
        filter_accuracy (bool): keep groups whose success rate lies in the bounds. Default ``True``.
        accuracy_lower_bound (float): inclusive lower bound, in [0, 1]. Default ``0.1``.
        accuracy_upper_bound (float): inclusive upper bound, in [0, 1]. Default ``0.9``.
        filter_truncated (bool): drop a group if any rollout was truncated at ``max_steps``.
            Default ``False`` (the recipe).
        max_steps (int, optional): the episode length: with ``filter_truncated``, a rollout that ran
            ``num_steps >= max_steps`` counts as truncated even if its last step succeeded (the
            reference's rule). ``None`` (default): the ``truncated`` flag alone.
        drop_failed (bool): drop a group if any rollout's env worker crashed. Default ``True``.
        oversample_factor (float): each round requests ``ceil(factor * train_batch_size)`` groups
            (none once ``train_batch_size`` are cached). Default ``1.0``.
        max_rounds (int): rollout rounds :meth:`sample` may run for one step before giving up.
            Default ``8`` (the example's ``max_rollout_rounds``).
        allow_partial (bool): when ``max_rounds`` is reached, train on the groups there are
            instead of skipping the step. Default ``False``.

    Kept groups beyond ``train_batch_size`` stay cached for the next :meth:`pop`, after an update: their
    stored log-probs are then an older policy's. Stamp each round with the policy's version and
    refresh the older ones before the update (:func:`srpo_rl.trainer.recompute_log_probs`, as
    ``examples/srpo_libero.py`` does); the reference recomputes every trajectory's log-probs there.

    Keys (``set_keys``): ``group_id``, ``success``, ``truncated``, ``failed`` (optional),
    ``num_steps`` (read with ``filter_truncated`` and ``max_steps``), ``steps`` (the nested
    per-decision tensordict, padded along its time dim when groups from rounds of different lengths
    are served together).

    Counters (:meth:`stats`, cumulative, saved by :meth:`state_dict`): ``rounds`` (calls to
    :meth:`add`), ``groups_requested`` (by :meth:`sample`), ``groups_seen``, ``groups_kept``, ``groups_dropped``,
    ``dropped_accuracy_low``, ``dropped_accuracy_high``, ``dropped_truncated``,
    ``dropped_failed``, ``batches_served``, ``steps_skipped``, and ``groups_carried`` (cached now).

    Examples:
        >>> def collect(num_groups, n=4):  # stands in for the rollout
        ...     success = torch.arange(num_groups * n) % 3 == 0
        ...     return TensorDict(
        ...         group_id=torch.arange(num_groups).repeat_interleave(n),
        ...         success=success, truncated=torch.zeros_like(success),
        ...         batch_size=[num_groups * n],
        ...     )
        >>> sampler = EmbodiedSampler(train_batch_size=2, oversample_factor=1.5)
        >>> sampler.groups_to_request()
        3
        >>> result = sampler.sample(collect)
        >>> result.batch.batch_size, result.reason, sampler.num_groups
        (torch.Size([8]), 'full', 1)
    """

    def __init__(
        self,
        train_batch_size: int,
        *,
        filter_accuracy: bool = True,
        accuracy_lower_bound: float = 0.1,
        accuracy_upper_bound: float = 0.9,
        filter_truncated: bool = False,
        max_steps: int | None = None,
        drop_failed: bool = True,
        oversample_factor: float = 1.0,
        max_rounds: int = 8,
        allow_partial: bool = False,
    ):
        if int(train_batch_size) != train_batch_size or train_batch_size < 1:
            raise ValueError(f"train_batch_size={train_batch_size!r} must be an integer >= 1")
        _check_bounds(accuracy_lower_bound, accuracy_upper_bound)
        if not (math.isfinite(oversample_factor) and oversample_factor > 0):
            raise ValueError(
                f"oversample_factor={oversample_factor!r} must be a finite number > 0 "
                "(1 requests exactly the missing groups)"
            )
        if int(max_rounds) != max_rounds or max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds!r} must be an integer >= 1")
        if max_steps is not None and (int(max_steps) != max_steps or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r} must be an integer >= 1, or None")
        self.train_batch_size = int(train_batch_size)
        self.filter_accuracy = filter_accuracy
        self.accuracy_lower_bound = float(accuracy_lower_bound)
        self.accuracy_upper_bound = float(accuracy_upper_bound)
        self.filter_truncated = filter_truncated
        self.max_steps = None if max_steps is None else int(max_steps)
        self.drop_failed = drop_failed
        self.oversample_factor = float(oversample_factor)
        self.max_rounds = int(max_rounds)
        self.allow_partial = allow_partial
        self.tensor_keys = _Keys()
        self._cache: list[TensorDictBase] = []
        self._stats = Counter({name: 0 for name in _STAT_NAMES})

    def set_keys(self, **kwargs: NestedKey) -> EmbodiedSampler:
        """Renames tensordict keys, e.g. ``set_keys(group_id="prompt_id")``."""
        rename_keys(self.tensor_keys, **kwargs)
        return self

    # ---- cache --------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Groups cached now (carried from earlier rounds or steps)."""
        return len(self._cache)

    @property
    def ready(self) -> bool:
        """Whether ``train_batch_size`` groups are cached, i.e. :meth:`pop` can serve a batch.

        With several data-parallel ranks, reduce this flag across them (all ranks ready, or all
        skip) before popping, so every rank takes the same number of optimizer steps.
        """
        return self.num_groups >= self.train_batch_size

    def stats(self) -> dict[str, int]:
        """Cumulative counters, plus ``groups_carried``."""
        return {**self._stats, "groups_carried": self.num_groups}

    def groups_to_request(self) -> int:
        """Groups the next rollout round should produce: a whole batch, ``ceil(oversample_factor *
        train_batch_size)``, until ``train_batch_size`` groups are cached (then 0)."""
        if self.ready:
            return 0
        # round() first so 1.1 * 10 asks for 11 groups, not 12
        return math.ceil(round(self.oversample_factor * self.train_batch_size, 9))

    def keeps(self, group: TensorDictBase) -> bool:
        """Whether the trajectories of one whole group (batch ``[n]``) pass this sampler's filters.

        What :meth:`add` will decide for that group, known as soon as its rollouts end: e.g.
        :class:`~srpo_rl.rewards.BackgroundEmbedder` embeds only the groups the sampler keeps.
        """
        ids = group.get(self.tensor_keys.group_id).reshape(-1).unique().tolist()
        if len(ids) != 1:
            raise ValueError(f"keeps() takes the trajectories of one group; got group ids {ids}")
        kept, _ = self._filter(group)
        return bool(kept)

    def add(self, batch: TensorDictBase | None) -> Counter:
        """Filters a rollout round's trajectories and caches the groups that pass.

        Each call counts as one round (``None`` or an empty batch: a round that produced nothing).
        Returns the round's counters.
        """
        if batch is not None and batch.ndim != 1:
            raise ValueError(
                f"expected a trajectory batch with batch_size [N], got {tuple(batch.batch_size)}"
            )
        self._stats["rounds"] += 1
        if batch is None or batch.numel() == 0:
            return Counter()
        kept, stats = self._filter(batch)
        if kept:
            self._drop_stale_groups(batch)
        self._cache.extend(batch[rows] for rows in kept)
        self._stats.update(stats)
        return stats

    def _drop_stale_groups(self, batch: TensorDictBase) -> None:
        # Groups restored from a checkpoint written under another config (e.g. another frame_stride)
        # or library version cannot be batched with this round's; drop them now rather than fail at
        # pop(), after a whole rollout round.
        layout = _layout(batch, self.tensor_keys.steps)
        fitting = [group for group in self._cache if _layout(group, self.tensor_keys.steps) == layout]
        if len(fitting) < len(self._cache):
            warnings.warn(
                f"dropping {len(self._cache) - len(fitting)} carried groups whose entries differ from this "
                "rollout's (carried from a checkpoint written with another config or version)",
                stacklevel=3,
            )
            self._cache = fitting

    def _filter(self, batch: TensorDictBase) -> tuple[list[torch.Tensor], Counter]:
        return filter_groups(
            batch,
            filter_accuracy=self.filter_accuracy,
            accuracy_lower_bound=self.accuracy_lower_bound,
            accuracy_upper_bound=self.accuracy_upper_bound,
            filter_truncated=self.filter_truncated,
            max_steps=self.max_steps,
            drop_failed=self.drop_failed,
            keys=self.tensor_keys,
        )

    def pop(self, num_groups: int | None = None) -> TensorDictBase:
        """Removes the oldest ``num_groups`` cached groups (default ``train_batch_size``).

        Returns them as one batch, the trajectories of a group on consecutive rows, the nested
        ``steps`` zero-padded (mask ``False``) to the longest round.
        """
        num_groups = self.train_batch_size if num_groups is None else num_groups
        if not 1 <= num_groups <= self.num_groups:
            raise ValueError(
                f"cannot pop {num_groups} groups: {self.num_groups} are cached"
            )
        groups, self._cache = self._cache[:num_groups], self._cache[num_groups:]
        self._stats["batches_served"] += 1
        return _cat_groups(groups, self.tensor_keys.steps)

    def clear(self) -> None:
        """Drops the cached groups (the reference clears its cache at each epoch start)."""
        self._cache = []

    # ---- the refill loop ----------------------------------------------------------------------
    def sample(self, collect: Callable[[int], TensorDictBase | None]) -> SampleResult:
        """Rolls out rounds until ``train_batch_size`` groups passed, then serves them.

        ``collect(num_groups)`` runs one rollout round and returns its trajectory batch ``[N]``
        (or ``None`` for nothing). Surplus groups stay cached for the next call. After
        ``max_rounds`` rounds without enough groups, returns the cached groups if
        ``allow_partial`` (and there are any), else ``batch=None``: the caller logs ``reason`` and
        skips the step; the groups that passed stay cached.
        """
        before = Counter(self._stats)
        rounds = 0
        while not self.ready and rounds < self.max_rounds:
            request = self.groups_to_request()
            self.add(collect(request))
            rounds += 1
            self._stats["groups_requested"] += request
        if self.ready:
            batch = self.pop()
            reason = "full" if rounds else "full, from carried groups only"
        elif self.allow_partial and self.num_groups:
            reason = (
                f"partial: {self.num_groups} of {self.train_batch_size} groups passed the "
                f"filters in {rounds} rounds (max_rounds)"
            )
            batch = self.pop(self.num_groups)
        else:
            reason = (
                f"skipped: {self.num_groups} of {self.train_batch_size} groups passed the "
                f"filters in {rounds} rounds (max_rounds={self.max_rounds}); they stay carried"
            )
            batch = None
            self._stats["steps_skipped"] += 1
        delta = {name: self._stats[name] - before[name] for name in _STAT_NAMES}
        return SampleResult(batch, reason, rounds, {**delta, "groups_carried": self.num_groups})

    # ---- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The carried groups and the counters, as plain dicts, lists and tensors.

        Loadable with ``torch.load(..., weights_only=True)``.
        """
        return {"cache": [_td_to_state(group) for group in self._cache], "stats": dict(self._stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved."""
        unknown = set(state_dict["stats"]) - set(_STAT_NAMES)
        if unknown:
            raise ValueError(f"unknown sampler counters {sorted(unknown)}")
        self._cache = [_td_from_state(group) for group in state_dict["cache"]]
        self._stats = Counter({name: 0 for name in _STAT_NAMES})
        self._stats.update(state_dict["stats"])


def _check_bounds(low: float, high: float) -> None:
    for name, value in (("accuracy_lower_bound", low), ("accuracy_upper_bound", high)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} must lie in [0, 1] (a group success rate)")
    if low > high:
        raise ValueError(
            f"accuracy_lower_bound={low!r} is above accuracy_upper_bound={high!r}; "
            "the bounds are inclusive, lower <= upper"
        )


def _flags(batch: TensorDictBase, key: NestedKey, *, required: bool) -> list[bool]:
    value = batch.get(key, None)
    if value is None:
        if required:
            raise KeyError(f"filter_truncated needs {key!r} in the trajectory batch")
        return [False] * batch.numel()
    return value.reshape(-1).tolist()


def _cat_groups(groups: list[TensorDictBase], steps_key: NestedKey) -> TensorDictBase:
    # rounds pad their steps to their own longest trajectory; pad to the longest of all
    steps = [group.get(steps_key, None) for group in groups]
    if all(s is not None and s.batch_dims >= 2 for s in steps):
        horizon = max(s.batch_size[1] for s in steps)
        padded = []
        for group, s in zip(groups, steps):
            if s.batch_size[1] < horizon:
                group = group.clone(recurse=False)
                group.set(steps_key, pad(s, [0, 0, 0, horizon - s.batch_size[1]]))
            padded.append(group)
        groups = padded
    try:
        return torch.cat(groups, 0)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            "cannot batch the cached groups together: their entries differ in shape beyond the "
            f"steps time dim (e.g. prompts padded to different lengths): {err}"
        ) from err


def _layout(group: TensorDictBase, steps_key: NestedKey) -> dict:
    """Each tensor's key, dtype and shape beyond the rows (and, under ``steps``, the time dim): what
    must agree for :func:`_cat_groups` to batch two groups."""
    layout = {}
    steps = group.get(steps_key, None)
    for key, value in group.items(include_nested=True, leaves_only=True):
        if is_non_tensor(value):
            continue
        leading = 2 if steps is not None and _under(key, steps_key) else 1
        layout[key] = (value.dtype, tuple(value.shape[leading:]))
    return layout


def _under(key: NestedKey, prefix: NestedKey) -> bool:
    key, prefix = (key,) if isinstance(key, str) else key, (prefix,) if isinstance(prefix, str) else prefix
    return tuple(key[: len(prefix)]) == tuple(prefix)


def _td_to_state(td: TensorDictBase) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for key, value in td.items():
        if is_non_tensor(value):
            entries[key] = {"non_tensor": value.tolist()}
        elif is_tensor_collection(value):
            entries[key] = _td_to_state(value)
        else:
            entries[key] = value
    return {"batch_size": list(td.batch_size), "entries": entries}


def _td_from_state(state: dict[str, Any]) -> TensorDict:
    td = TensorDict(batch_size=state["batch_size"])
    for key, value in state["entries"].items():
        if isinstance(value, torch.Tensor):
            td.set(key, value)
        elif "non_tensor" in value:
            td.set(key, value["non_tensor"])
        else:
            td.set(key, _td_from_state(value))
    return td
