"""SRPO world-model progress reward: successes score 1, failures score how close they came.

A failed trajectory's V-JEPA 2 video embedding is compared with the successful trajectories of the
same task in the batch; the closer it ends up, the higher its score in ``[0, 0.6)``. The score times
``reward_coef`` is the trajectory's reward, which the GRPO group advantage then normalises.

- :func:`srpo_progress_scores` is the score of the reference code, a pure function of embeddings,
  success flags and task ids (plus the paper's variant as an option);
- :class:`SRPOProgressReward` is a TorchRL :class:`~torchrl.envs.Transform` that embeds the trajectory
  batch of :func:`srpo_rl.rollout.collect_rollouts` and writes ``"reward"`` and ``"progress"``; use it
  as a collector ``postproc``, a replay-buffer transform or call it on a batch. ``binary=True`` turns
  it into the plain success reward (GRPO);
- :class:`BackgroundEmbedder` embeds each trajectory as soon as its episode ends, on a side CUDA stream
  while the other rollouts go on: the reward then costs no wall time of its own where the GPU would wait for
  the simulation. Where the policy's forward keeps the GPU busy it does not pay (the 7B on an H100 with 16
  envs: 0.77-1.33x the embedding's time after the rollout, 1.01x at 8 rollouts an env; ``benchmarks/rollout_throughput.py``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.special import expit
from sklearn.cluster import DBSCAN
from sklearn.preprocessing import StandardScaler
from tensordict import NestedKey, TensorDictBase
from torch import nn
from torchrl.envs.transforms import Transform

from srpo_rl.cuda_wait import wait_for_stream
from srpo_rl.keys import rename_keys
from srpo_rl.models.vjepa2 import sample_frame_indices

__all__ = ["BackgroundEmbedder", "SRPOProgressReward", "srpo_progress_scores", "trajectory_videos"]

FORMULAS = ("reference", "paper")
VIDEO_KEY_BY = ("rollout", "group")


def _success_centres(succ: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN cluster centres of the standardised success embeddings, mapped back to raw space."""
    scaler = StandardScaler()
    scaled = scaler.fit_transform(succ)
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(scaled).labels_
    centres = [
        scaler.inverse_transform(scaled[labels == label].mean(axis=0, keepdims=True)).flatten()
        for label in sorted(set(labels) - {-1})  # -1: noise points, ignored
    ]
    # no cluster (e.g. a single success or all far apart): the plain mean of the successes
    return np.array(centres) if centres else succ.mean(axis=0, keepdims=True)


def _failure_scores(dist: np.ndarray, formula: str, alpha: float) -> np.ndarray:
    if formula == "reference":
        # min-max over the task's failures, then 0.6 * sigmoid(10 * (0.5 - d_hat))
        span = dist.max() - dist.min()
        d_hat = np.full_like(dist, 0.5) if span < 1e-6 else (dist - dist.min()) / span
        return 0.6 * expit(10.0 * (0.5 - d_hat))
    # paper: alpha * sigmoid of the standardised distance, negated so that closer scores higher
    std = dist.std()
    z = np.zeros_like(dist) if std < 1e-6 else (dist - dist.mean()) / std
    return alpha * expit(-z)


def srpo_progress_scores(
    embeddings: np.ndarray | torch.Tensor,
    success: np.ndarray | torch.Tensor | Sequence[bool],
    task: Sequence[Hashable],
    *,
    valid: np.ndarray | torch.Tensor | None = None,
    formula: Literal["reference", "paper"] = "reference",
    alpha: float = 0.8,
    dbscan_eps: float = 0.5,
    dbscan_min_samples: int = 2,
) -> np.ndarray:
    """SRPO progress scores of a batch of trajectories, as the reference code computes them.

    1. Invalid samples (default: an all-zero embedding, i.e. no frames) score 0, success or not.
    2. Valid samples are grouped by ``task``; in each group successes score 1.
    3. A group with no success or no failure is left there: its failures score 0.
    4. Otherwise the success embeddings are standardised (``StandardScaler``) and clustered with
       ``DBSCAN(eps=0.5, min_samples=2)``; each cluster's centre is the inverse-transformed mean of
       its scaled points (noise ignored); with no cluster, the centre is the mean success embedding.
    5. ``d_i`` = euclidean distance of failure ``i`` to its nearest centre, in raw embedding space.
    6. ``formula="reference"``: ``d_hat = (d - min d) / (max d - min d)`` over the group's failures
       (``0.5`` for all when the range is below 1e-6) and ``score = 0.6 * sigmoid(10 * (0.5 - d_hat))``,
       in ``[0.004, 0.596]``.
       ``formula="paper"``: ``score = alpha * sigmoid(-(d - mean d) / std d)`` (population std over the
       group's failures; 0 inside the sigmoid when the std is below 1e-6). The paper's summary writes
       ``sigmoid((d - mean) / std)``, which would reward the farthest failure most; the sign here makes
       the closest failure score highest, as the paper intends.

    Args:
        embeddings: ``[N, D]`` video embeddings.
        success: ``[N]`` bools.
        task: ``N`` hashable task keys (e.g. ``(suite, task_id)``): references are per task, not per
            group of rollouts.
        valid: ``[N]`` bools; default: rows whose embedding is not all zeros.
        formula: ``"reference"`` (the code) or ``"paper"``.
        alpha: the paper's progress weight (``formula="paper"`` only).
        dbscan_eps, dbscan_min_samples: DBSCAN parameters (reference: 0.5, 2).

    Returns:
        ``[N]`` float64 scores in ``[0, 1]``.

    Examples:
        >>> emb = np.array([[0.0, 1.0], [0.0, 1.2], [3.0, 1.0], [1.0, 1.0]])
        >>> srpo_progress_scores(emb, [True, True, False, False], task=[0, 0, 0, 0]).round(4).tolist()
        [1.0, 1.0, 0.004, 0.596]
    """
    if formula not in FORMULAS:
        raise ValueError(f"unknown formula {formula!r}; choose one of {', '.join(FORMULAS)}")
    emb = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    succ = np.asarray(success.cpu() if isinstance(success, torch.Tensor) else success, dtype=bool).reshape(-1)
    if emb.ndim != 2 or len(emb) != len(succ) or len(task) != len(succ):
        raise ValueError(
            f"embeddings {emb.shape}, success ({len(succ)},) and task ({len(task)},) must describe the same "
            "N trajectories, embeddings as [N, D]"
        )
    if valid is None:
        valid = ~np.all(emb == 0, axis=1)
    valid = np.asarray(valid.cpu() if isinstance(valid, torch.Tensor) else valid, dtype=bool).reshape(-1)

    scores = np.zeros(len(succ), dtype=np.float64)
    groups: dict[Hashable, list[int]] = {}
    for i in np.flatnonzero(valid):
        groups.setdefault(task[i], []).append(int(i))
    for rows in groups.values():
        rows = np.array(rows)
        ok, failed = rows[succ[rows]], rows[~succ[rows]]
        scores[ok] = 1.0
        if len(ok) == 0 or len(failed) == 0:
            continue
        centres = _success_centres(emb[ok], dbscan_eps, dbscan_min_samples)
        dist = cdist(emb[failed], centres, "euclidean").min(axis=1)
        scores[failed] = _failure_scores(dist, formula, alpha)
    return scores


# ---------------------------------------------------------------------------------------------- videos
class _LazyVideos(Sequence):
    """Videos gathered on access (the embedder reads each once), so they never all sit in memory."""

    def __init__(self, frame_ids: list[torch.Tensor], gather: Callable[[torch.Tensor], torch.Tensor]):
        self.frame_ids, self.gather = frame_ids, gather

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.gather(self.frame_ids[i])


def _frame_ids(
    valid: torch.Tensor, has_initial: bool, members: torch.Tensor, timing: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A video's frames: their ids in ``[initial frames (N, or none) ; steps frames flattened (N*T*K)]``, their
    positions in the video the reference would record (a frame after every env step), and its length.

    ``members`` are the rows whose frames form the video, in order: one row for a rollout's own video;
    for the reference's merged group video, all rows of the group: their initial frames first, then
    chunk step by chunk step, each row's frames of that step in turn (its lockstep append order).
    ``timing`` is ``(frames_step [N, T, K], executed env steps per decision [N, T])``; without it the
    frames are taken as one per env step.
    """
    n, t, k = valid.shape
    m0 = len(members) if has_initial else 0
    offset = n if has_initial else 0
    pos = valid[members].transpose(0, 1).nonzero()  # (step, member j, sub-frame), step-major
    ids = torch.cat([members[:m0], offset + members[pos[:, 1]] * (t * k) + pos[:, 0] * k + pos[:, 2]])
    if timing is None:
        return ids, torch.arange(len(ids)), len(ids)
    frames_step, executed = timing[0][members], timing[1][members]  # [M, T, K], [M, T]
    start = executed.cumsum(1) - executed  # each member's episode step when its decision began
    per_decision = executed.sum(0)
    before = m0 + per_decision.cumsum(0) - per_decision  # the merged video's frames before decision d ...
    before = before + executed.cumsum(0) - executed  # ... and before member m's frames of it
    # the frame after episode step e of decision d: the (e - start)-th of that member's frames of d
    positions = (before - start).unsqueeze(-1) + frames_step - 1
    positions = torch.cat([torch.arange(m0), positions[pos[:, 1], pos[:, 0], pos[:, 2]]])
    return ids, positions, m0 + int(executed.sum())


def _nearest(positions: torch.Tensor, targets: np.ndarray) -> torch.Tensor:
    """Index into ascending ``positions`` of the one nearest each target (the earlier at a tie)."""
    targets = torch.as_tensor(targets, dtype=positions.dtype)
    right = torch.searchsorted(positions, targets).clamp(max=len(positions) - 1)
    left = (right - 1).clamp(min=0)
    take_right = (positions[right] - targets).abs() < (targets - positions[left]).abs()
    return torch.where(take_right, right, left)


def trajectory_videos(
    tensordict: TensorDictBase,
    rows: Sequence[Sequence[int]],
    *,
    initial_frame_key: NestedKey = "initial_frame",
    frames_key: NestedKey = ("steps", "next", "frames"),
    frames_mask_key: NestedKey = ("steps", "next", "frames_mask"),
    step_mask_key: NestedKey = ("steps", "mask"),
    frames_step_key: NestedKey = ("steps", "next", "frames_step"),
    chunk_steps_key: NestedKey = ("steps", "next", "chunk_steps"),
    num_frames: int | None = None,
) -> Sequence[torch.Tensor]:
    """The videos of a trajectory batch: for each entry of ``rows``, uint8 ``[F, 3, H, W]`` frames.

    A trajectory's video is its ``initial_frame`` followed by the valid frames (``frames_mask``) of its
    executed decisions (``step_mask``) in order. An entry of several rows merges them as the reference
    does for the rollouts of one prompt (initial frames, then step by step, row by row).

    With ``num_frames``, each video is returned sampled to ``num_frames`` frames as the reference samples
    the video it records, a frame after every env step: at the positions of
    :func:`~srpo_rl.models.vjepa2.sample_frame_indices` in that video (``linspace``, or looped when it is
    shorter), each filled with the recorded frame nearest in time (the earlier at a tie), which
    :class:`~srpo_rl.models.vjepa2.VideoEmbedder` then keeps as they are. The time of a frame is its
    ``frames_step`` (the episode step it shows, from the env) and, for a merged video, the decisions'
    ``chunk_steps``. With a frame every step this is the reference's sampling exactly; with one frame a
    chunk (the env's default), each sampled position gets the frame at most half a chunk away, where
    sampling the recorded frames themselves would loop a video of fewer than ``num_frames`` frames back
    to its start (a success at step 200 has 26 frames). A batch without ``frames_step`` counts its frames
    as consecutive env steps. Videos are gathered lazily, on indexing.

    Examples:
        >>> from tensordict import TensorDict
        >>> frames = torch.arange(1, 9, dtype=torch.uint8).view(2, 2, 2, 1, 1, 1).expand(2, 2, 2, 3, 1, 1)
        >>> frames_mask = torch.tensor([[[True, True], [True, False]], [[True, True], [True, True]]])
        >>> td = TensorDict(
        ...     initial_frame=torch.zeros(2, 3, 1, 1, dtype=torch.uint8),
        ...     steps=TensorDict(
        ...         mask=torch.tensor([[True, True], [True, False]]),
        ...         next=TensorDict(frames=frames, frames_mask=frames_mask, batch_size=[2, 2]),
        ...         batch_size=[2, 2]),
        ...     batch_size=[2])
        >>> [v[:, 0, 0, 0].tolist() for v in trajectory_videos(td, [[0], [1], [0, 1]])]
        [[0, 1, 2, 3], [0, 5, 6], [0, 0, 1, 2, 5, 6, 3]]

        One frame every 4 env steps (chunks of 8: the frames after steps 4, 8, 12, 16), sampled to 8 frames
        of the reference's 17-frame video (steps 0, 2, 4, 6, 9, 11, 13, 16):

        >>> steps = TensorDict(
        ...     mask=torch.tensor([[True, True]]),
        ...     next=TensorDict(frames=torch.tensor([4, 8, 12, 16], dtype=torch.uint8).view(1, 2, 2, 1, 1, 1),
        ...                     frames_mask=torch.ones(1, 2, 2, dtype=torch.bool),
        ...                     frames_step=torch.tensor([[[4, 8], [12, 16]]]),
        ...                     chunk_steps=torch.tensor([[8, 8]]), batch_size=[1, 2]),
        ...     batch_size=[1, 2])
        >>> td = TensorDict(initial_frame=torch.zeros(1, 1, 1, 1, dtype=torch.uint8), steps=steps, batch_size=[1])
        >>> trajectory_videos(td, [[0]], num_frames=8)[0].flatten().tolist()
        [0, 0, 4, 4, 8, 12, 12, 16]
    """
    frames = tensordict.get(frames_key)
    n, t, k = frames.shape[:3]
    flat = frames.reshape(n * t * k, *frames.shape[3:])
    step_mask = tensordict.get(step_mask_key).bool()
    valid = tensordict.get(frames_mask_key).bool() & step_mask.unsqueeze(-1)
    initial = tensordict.get(initial_frame_key, None)
    if initial is None:
        initial = flat[:0]
    elif initial.shape[1:] != flat.shape[1:]:
        raise ValueError(
            f"initial frames {tuple(initial.shape[1:])} and step frames {tuple(flat.shape[1:])} differ in shape"
        )
    timing = _frame_timing(tensordict, frames_step_key, chunk_steps_key, step_mask) if num_frames else None
    valid, frame_ids = valid.cpu(), []
    for members in rows:
        ids, positions, length = _frame_ids(
            valid, len(initial) > 0, torch.as_tensor(list(members), dtype=torch.long), timing
        )
        if num_frames is not None and len(ids):
            ids = ids[_nearest(positions, sample_frame_indices(length, num_frames))]
        frame_ids.append(ids)

    def gather(ids: torch.Tensor) -> torch.Tensor:
        from_initial = ids < len(initial)
        out = flat.new_empty((len(ids), *flat.shape[1:]))
        out[from_initial] = initial[ids[from_initial].to(initial.device)]
        out[~from_initial] = flat[(ids[~from_initial] - len(initial)).to(flat.device)]
        return out

    return _LazyVideos(frame_ids, gather)


def _frame_timing(
    tensordict: TensorDictBase, frames_step_key: NestedKey, chunk_steps_key: NestedKey, step_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(frames_step [N, T, K], env steps executed per decision [N, T])`` on the CPU, or None without
    ``frames_step``."""
    frames_step = tensordict.get(frames_step_key, None)
    if frames_step is None:
        return None
    chunk_steps = tensordict.get(chunk_steps_key, None)
    if chunk_steps is None:
        raise KeyError(f"the batch has frames_step but no {chunk_steps_key!r}: the frames cannot be placed in time")
    executed = chunk_steps.reshape(step_mask.shape).long() * step_mask
    return frames_step.long().cpu(), executed.cpu()


# ---------------------------------------------------------------------------------------------- transform
class SRPOProgressReward(Transform):
    """SRPO progress reward on a trajectory batch (batch ``[N]``, one row per trajectory).

    Writes ``"progress"`` (the score, float32 ``[N]``: 1 for a success, in ``[0, 0.6)`` for a failure)
    and ``"reward"`` (``reward_coef * progress``). Works on any batch holding success flags, task ids
    and frames in the layout of :func:`srpo_rl.rollout.collect_rollouts` (any env that yields frames and
    ``success``): call it on a batch, pass it as a collector ``postproc``, or append it to a replay
    buffer.

    Args:
        embedder: a :class:`~srpo_rl.models.vjepa2.VideoEmbedder` (or any callable mapping a sequence of
            uint8 ``[F, 3, H, W]`` videos to ``[len, D]`` embeddings, with a ``num_frames`` attribute).
            Not needed with ``binary=True``.

    Keyword Args:
        reward_coef (float): reward = ``reward_coef * score`` (recipe: 5.0).
        binary (bool): the plain success reward ``reward_coef * success``, no embedding (GRPO).
        video_key_by (str): ``"rollout"`` (default): each trajectory is embedded from its own frames.
            ``"group"``: the reference's behaviour, where the rollouts of one prompt run in lockstep and
            append their frames to one shared video (initial frames, then chunk step by chunk step, row
            by row in rollout-id order); every rollout of the group gets that merged video's embedding.
            All failures of a group then score the same, and the shaping cancels in the GRPO advantage.
        formula (str): ``"reference"`` or ``"paper"``, see :func:`srpo_progress_scores`.
        alpha (float): the paper formula's weight.

    With ``video_key_by="rollout"``, a batch that already holds each trajectory's embedding under
    ``embedding`` (e.g. from :class:`BackgroundEmbedder`) is scored with it and not embedded again.

    Only trajectories marked by ``keep`` (the key, or the ``keep`` argument of ``forward``; default: all
    rows) are embedded and scored, and only kept successes serve as references. Rows not kept get the
    binary score (``success``). Trajectories are grouped by task: ``task_id``, with ``suite`` when the
    batch has it.

    Keys (``set_keys``): ``success``, ``task_id``, ``suite`` (optional), ``group_id``, ``rollout_id``
    (group mode), ``initial_frame``, ``frames`` (``("steps", "next", "frames")``), ``frames_mask``
    (``("steps", "next", "frames_mask")``), ``step_mask`` (``("steps", "mask")``), ``frames_step`` and
    ``chunk_steps`` (``("steps", "next", ...)``: when and how far, to sample the frames in time as
    :func:`trajectory_videos` does), ``keep`` and ``embedding`` (``"video_embedding"``; ``frames_step``,
    ``keep`` and ``embedding`` optional) in; ``reward``, ``progress`` out.

    Examples:
        >>> from tensordict import TensorDict
        >>> batch = TensorDict(success=torch.tensor([True, False]), task_id=torch.tensor([0, 0]), batch_size=[2])
        >>> SRPOProgressReward(binary=True)(batch)["reward"]
        tensor([5., 0.])
    """

    @dataclass
    class _AcceptedKeys:
        """Tensordict keys of :class:`SRPOProgressReward`, renamed with ``set_keys(name=key)``."""

        success: NestedKey = "success"
        task_id: NestedKey = "task_id"
        suite: NestedKey = "suite"
        group_id: NestedKey = "group_id"
        rollout_id: NestedKey = "rollout_id"
        initial_frame: NestedKey = "initial_frame"
        frames: NestedKey = ("steps", "next", "frames")
        frames_mask: NestedKey = ("steps", "next", "frames_mask")
        step_mask: NestedKey = ("steps", "mask")
        frames_step: NestedKey = ("steps", "next", "frames_step")
        chunk_steps: NestedKey = ("steps", "next", "chunk_steps")
        keep: NestedKey = "keep"
        embedding: NestedKey = "video_embedding"
        reward: NestedKey = "reward"
        progress: NestedKey = "progress"

    def __init__(
        self,
        embedder: nn.Module | Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None,
        *,
        reward_coef: float = 5.0,
        binary: bool = False,
        video_key_by: Literal["rollout", "group"] = "rollout",
        formula: Literal["reference", "paper"] = "reference",
        alpha: float = 0.8,
    ) -> None:
        if video_key_by not in VIDEO_KEY_BY:
            raise ValueError(f"unknown video_key_by {video_key_by!r}; choose one of {', '.join(VIDEO_KEY_BY)}")
        if formula not in FORMULAS:
            raise ValueError(f"unknown formula {formula!r}; choose one of {', '.join(FORMULAS)}")
        if embedder is None and not binary:
            raise ValueError("the SRPO progress reward needs an embedder (a VideoEmbedder); pass one or binary=True")
        self.tensor_keys = self._AcceptedKeys()
        super().__init__(in_keys=self._keys_read(), out_keys=[self.tensor_keys.reward, self.tensor_keys.progress])
        self.embedder = embedder
        self.reward_coef, self.binary = reward_coef, binary
        self.video_key_by, self.formula, self.alpha = video_key_by, formula, alpha

    def _keys_read(self) -> list[NestedKey]:
        k = self.tensor_keys
        return [k.success, k.task_id, k.group_id, k.initial_frame, k.frames, k.frames_mask, k.step_mask]

    def set_keys(self, **kwargs: NestedKey) -> SRPOProgressReward:
        """Renames tensordict keys, e.g. ``set_keys(success=("next", "success"))``."""
        rename_keys(self.tensor_keys, **kwargs)
        self.in_keys = self._keys_read()
        self.out_keys = [self.tensor_keys.reward, self.tensor_keys.progress]
        return self

    def _get(self, tensordict: TensorDictBase, name: str) -> torch.Tensor:
        key = getattr(self.tensor_keys, name)
        value = tensordict.get(key, None)
        if value is None:
            raise KeyError(f"{name} key {key!r} not found in the batch; rename it with set_keys({name}=...)")
        return value

    def _task_keys(self, tensordict: TensorDictBase) -> list[Hashable]:
        task_id = self._get(tensordict, "task_id").reshape(-1).tolist()
        suite = tensordict.get(self.tensor_keys.suite, None)
        if suite is None:
            return task_id
        # a tensor of suite ids, or strings (NonTensorData / NonTensorStack)
        suite = suite.reshape(-1).tolist() if isinstance(suite, torch.Tensor) else suite.tolist()
        return list(zip(suite, task_id, strict=True))

    def _embed(self, tensordict: TensorDictBase, kept: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[len(kept), D]`` of the kept rows (one video per rollout, or per group)."""
        given = tensordict.get(self.tensor_keys.embedding, None)
        if given is not None and self.video_key_by == "rollout":
            return given[kept.to(given.device)].to("cpu", torch.float32)
        if self.video_key_by == "rollout":
            videos_rows = [[int(i)] for i in kept]
        else:
            group = self._get(tensordict, "group_id").reshape(-1)[kept].cpu()
            order = self._get(tensordict, "rollout_id").reshape(-1)[kept].cpu().argsort(stable=True)
            videos_rows = [kept[order[group[order] == g]].tolist() for g in group.unique()]
        for name in ("frames", "frames_mask", "step_mask"):
            self._get(tensordict, name)  # fail with the key's name before any work
        k = self.tensor_keys
        videos = trajectory_videos(
            tensordict, videos_rows, initial_frame_key=k.initial_frame, frames_key=k.frames,
            frames_mask_key=k.frames_mask, step_mask_key=k.step_mask, frames_step_key=k.frames_step,
            chunk_steps_key=k.chunk_steps, num_frames=getattr(self.embedder, "num_frames", None),
        )
        video_emb = torch.as_tensor(self.embedder(videos), dtype=torch.float32).cpu()
        # every row gets the embedding of the video it belongs to
        row_of = {int(r): i for i, rows in enumerate(videos_rows) for r in rows}
        return video_emb[[row_of[int(r)] for r in kept]]

    def forward(self, tensordict: TensorDictBase, keep: torch.Tensor | None = None) -> TensorDictBase:
        """Writes the progress score and ``reward_coef`` times it into ``tensordict`` (in place) and returns it.

        ``keep`` (or the tensordict's ``keep`` key) marks the trajectories to embed; the others keep their
        0/1 success as the score. Successes always score 1.
        """
        success = self._get(tensordict, "success").reshape(-1).bool()
        score = success.to(torch.float64).cpu()
        if not self.binary:
            if keep is None:
                keep = tensordict.get(self.tensor_keys.keep, None)
            keep = torch.ones_like(success) if keep is None else keep.reshape(-1).bool()
            kept = keep.cpu().nonzero().squeeze(-1)
            if len(kept):
                tasks = self._task_keys(tensordict)
                score[kept] = torch.from_numpy(srpo_progress_scores(
                    self._embed(tensordict, kept), success[kept].cpu(), [tasks[i] for i in kept.tolist()],
                    formula=self.formula, alpha=self.alpha,
                ))
        score = score.to(torch.float32).to(success.device)
        tensordict.set(self.tensor_keys.progress, score)
        tensordict.set(self.tensor_keys.reward, self.reward_coef * score)
        return tensordict

    def _call(self, tensordict: TensorDictBase) -> TensorDictBase:
        return self.forward(tensordict)

    def extra_repr(self) -> str:
        """The reward's settings, shown in the module's repr."""
        mode = "binary" if self.binary else f"video_key_by={self.video_key_by!r}, formula={self.formula!r}"
        return f"reward_coef={self.reward_coef}, {mode}"


# ---------------------------------------------------------------------------------------------- background
class BackgroundEmbedder:
    """Embeds each finished trajectory's video in a thread, on a side CUDA stream, while the rollout goes on.

    During rollout the GPU waits for the simulation between policy calls; embedding each trajectory as
    soon as its episode ends fills that time, so the reward's V-JEPA 2 pass costs (almost) no wall time.
    Pass the instance as ``collect_rollouts(on_finished=...)``; then :meth:`pop` the embeddings of the
    batch (it waits for the ones still being computed) and store them under the reward's ``embedding``
    key: :class:`SRPOProgressReward` uses them instead of embedding again. Trajectories that end together
    are embedded as one batch of up to ``batch_size`` videos. Each video is the trajectory's own
    (``video_key_by="rollout"``). The rollout's policy runs on a stream of higher priority
    (:data:`srpo_rl.rollout.POLICY_STREAM_PRIORITY`), so this stream's work fills the GPU around its forwards.

    The reward is computed on the groups the sampler keeps (as in the reference, after the accuracy filter),
    so with ``keep_group`` and ``group_size`` a trajectory is held back until its group (``group_id``) has
    ``group_size`` of them, and the group is embedded only if ``keep_group`` passes it: a group the filter
    drops costs no V-JEPA time (with an SFT policy that succeeds at a rate p, a share p^8 + (1 - p)^8 of the
    groups of 8: 17 % at p = 0.8, 43 % at p = 0.9). :meth:`pop` gives NaN rows for such a group's
    trajectories, which :meth:`EmbodiedSampler.add <srpo_rl.objectives.EmbodiedSampler.add>` drops.

    Args:
        embedder: a :class:`~srpo_rl.models.vjepa2.VideoEmbedder` (or any callable mapping a sequence of
            uint8 ``[F, 3, H, W]`` videos to ``[len, D]`` embeddings; its ``num_frames``, ``batch_size``
            and ``embedding_dim`` attributes are used when present).
        device: where the embedder runs; a CUDA device gets a side stream of its own.
        keep_group: whether a finished group (its trajectories stacked, without their ``steps`` and
            ``initial_frame``) is trained on: :meth:`EmbodiedSampler.keeps
            <srpo_rl.objectives.EmbodiedSampler.keeps>`. None: every trajectory is embedded at once.
        group_size: the trajectories of a group (``rollout.n``); needed with ``keep_group``.

    Examples:
        >>> from tensordict import TensorDict
        >>> def mean_colour(videos):  # a stand-in embedder: each video's mean pixel
        ...     return torch.stack([v.float().mean().reshape(1) for v in videos])
        >>> def trajectory(rollout_id, success):
        ...     return TensorDict(
        ...         rollout_id=torch.tensor(rollout_id), group_id=torch.tensor(rollout_id // 2),
        ...         success=torch.tensor(success), initial_frame=torch.full((3, 2, 2), 10, dtype=torch.uint8),
        ...         steps=TensorDict(mask=torch.tensor([True]), next=TensorDict(
        ...             frames=torch.full((1, 1, 3, 2, 2), 20, dtype=torch.uint8),
        ...             frames_mask=torch.tensor([[True]]), batch_size=[1]), batch_size=[1]),
        ...         batch_size=[])
        >>> background = BackgroundEmbedder(mean_colour)
        >>> background(trajectory(7, True))  # what collect_rollouts does when the episode ends
        >>> background.pop(torch.tensor([7]))
        tensor([[15.]])
        >>> background.close()
        >>> mixed = lambda group: 0 < int(group["success"].sum()) < len(group)  # groups of 2, one success
        >>> background = BackgroundEmbedder(mean_colour, keep_group=mixed, group_size=2)
        >>> for rollout_id, success in [(0, True), (1, False), (2, True), (3, True)]:
        ...     background(trajectory(rollout_id, success))
        >>> background.pop([0, 1, 2, 3])  # group 1 (rollouts 2, 3) all succeeded: dropped, not embedded
        tensor([[15.],
                [15.],
                [nan],
                [nan]])
        >>> background.close()
    """

    def __init__(self, embedder: nn.Module | Callable[[Sequence[torch.Tensor]], torch.Tensor],
                 device: torch.device | str | None = None, *,
                 keep_group: Callable[[TensorDictBase], bool] | None = None, group_size: int | None = None) -> None:
        if keep_group is not None and (group_size is None or group_size < 1):
            raise ValueError(f"keep_group needs group_size (the trajectories of a group, >= 1); got {group_size!r}")
        self.embedder = embedder
        self.num_frames = getattr(embedder, "num_frames", None)
        self.batch_size = int(getattr(embedder, "batch_size", 8))
        self.keep_group, self.group_size = keep_group, group_size
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue()
        self._results: dict[int, torch.Tensor | BaseException | None] = {}  # None: its group was dropped
        self._held: dict[int, list[TensorDictBase]] = {}  # group id -> its finished trajectories so far
        self._dim: int | None = getattr(embedder, "embedding_dim", None)
        self._ready = threading.Condition()
        self.busy_time = 0.0  # seconds spent embedding
        self.wait_time = 0.0  # seconds pop() waited for embeddings still being computed
        self.dropped = 0  # trajectories not embedded: their group did not pass keep_group
        self._thread = threading.Thread(target=self._run, name="srpo-background-embedder", daemon=True)
        self._thread.start()

    def __call__(self, trajectory: TensorDictBase) -> None:
        """Takes one finished trajectory (a row of :func:`~srpo_rl.rollout.collect_rollouts`' batch): queues it,
        or holds it until its group is complete when there is a ``keep_group``."""
        if not self._thread.is_alive():
            raise RuntimeError("the BackgroundEmbedder is closed")
        missing = [key for key in ("rollout_id", "group_id") if key not in trajectory.keys()]
        if missing:  # here, not in the thread: pop() must never wait for a row the thread cannot file
            raise KeyError(f"the trajectory has no {missing}; hand over the rows collect_rollouts gives on_finished")
        if self.keep_group is None:
            self._queue.put(trajectory)
            return
        members = self._held.setdefault(int(trajectory["group_id"]), [])
        members.append(trajectory)
        if len(members) == self.group_size:
            self._judge(self._held.pop(int(trajectory["group_id"])))

    def _judge(self, members: list[TensorDictBase]) -> None:
        """Queues a complete group if ``keep_group`` passes it, else marks its trajectories dropped."""
        outcomes = torch.stack([row.exclude("steps", "initial_frame") for row in members])
        if self.keep_group(outcomes):
            for row in members:
                self._queue.put(row)
            return
        with self._ready:
            self._results.update(dict.fromkeys((int(row["rollout_id"]) for row in members), None))
        self.dropped += len(members)

    def pop(self, rollout_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Float32 ``[len(rollout_ids), D]`` embeddings of these rollouts, waiting for any still queued.

        A rollout whose group ``keep_group`` dropped gets a NaN row. A group still incomplete (a batch that
        ends inside a group) is embedded now, unjudged. Each embedding is handed out once. Raises
        ``KeyError`` for a rollout that was never handed over.
        """
        ids = [int(i) for i in (rollout_ids.reshape(-1).tolist() if isinstance(rollout_ids, torch.Tensor) else rollout_ids)]
        wanted = set(ids)
        for group in [g for g, members in self._held.items() if any(int(r["rollout_id"]) in wanted for r in members)]:
            for row in self._held.pop(group):
                self._queue.put(row)
        t0 = time.perf_counter()
        with self._ready:
            self._ready.wait_for(lambda: self._queue.unfinished_tasks == 0 or all(i in self._results for i in ids))
            missing = [i for i in ids if i not in self._results]
            if missing:
                raise KeyError(f"rollouts {missing[:10]} were never queued (pass the embedder as on_finished)")
            results = [self._results.pop(i) for i in ids]
        self.wait_time += time.perf_counter() - t0
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError("embedding a finished trajectory failed in the background thread") from errors[0]
        dim = self._dim if self._dim is not None else 0  # 0 only if nothing was ever embedded
        nan = torch.full((dim,), float("nan"))
        return torch.stack([nan if r is None else r for r in results])

    def close(self) -> None:
        """Stops the thread once the queued trajectories are embedded."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            rows = [first]
            while len(rows) < self.batch_size and not self._queue.empty():
                row = self._queue.get()
                if row is None:  # close() after this batch
                    self._queue.put(None)
                    self._queue.task_done()
                    break
                rows.append(row)
            results = self._embed(rows)
            with self._ready:
                self._results.update(results)
                for _ in rows:
                    self._queue.task_done()
                self._ready.notify_all()
        self._queue.task_done()

    def _embed(self, rows: list[TensorDictBase]) -> dict[int, torch.Tensor | BaseException]:
        ids = [int(row["rollout_id"]) for row in rows]
        t0 = time.perf_counter()
        try:
            videos = [trajectory_videos(row.unsqueeze(0), [[0]], num_frames=self.num_frames)[0] for row in rows]
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                embeddings = torch.as_tensor(self.embedder(videos))
                wait_for_stream(self._stream)  # asleep: the simulation workers need the cores
                embeddings = embeddings.to("cpu", torch.float32)
            results = dict(zip(ids, embeddings, strict=True))
            self._dim = embeddings.shape[-1]
        except BaseException as error:  # handed to pop(), which raises it in the caller (the thread lives on)
            results = dict.fromkeys(ids, error)
        self.busy_time += time.perf_counter() - t0
        return results
