"""Chunked execution: one decision executes an action chunk, stopping inside it (numpy only).

A chunk ``[chunk_len, action_dim]`` is executed in order, one env step per row, and stops early at
success or when the episode reaches ``max_steps``. The reward needs frames at ``frame_stride``:
frame ``j`` of a chunk is the frame after sub-step ``min((j + 1) * frame_stride, n)``, where ``n``
is the number of sub-steps executed, and it is valid when ``j * frame_stride < n``. So there are
``K = ceil(chunk_len / frame_stride)`` frame slots, ``frame_stride=1`` records every env step and
``frame_stride=chunk_len`` one frame per chunk; the last valid frame is always the frame after
the last executed step, which is also the policy's next image. Only these frames are rendered.
``frames_step[j]`` is that sub-step, counted from 1 (0 where the frame slot is not valid), so the
reward can place each frame in time.

Examples:
    >>> num_frames(8, 1), num_frames(8, 8), num_frames(8, 3)
    (8, 1, 3)
    >>> frame_slots(8, 3, executed=5)  # (slot, sub-step) pairs rendered when 5 sub-steps run
    [(0, 2), (1, 4)]

    A toy env whose position moves by each action's first entry and succeeds past 2.5, its frame the position
    painted into one pixel: a chunk of 8 steps of 0.5 stops at success, inside the chunk, and the success
    step's frame (not planned at ``frame_stride=4``) is rendered then.

    >>> position = [0.0]
    >>> def step(action, want_frame, last):
    ...     position[0] += float(action[0])
    ...     return position[0] > 2.5, {"position": position[0]}, render() if want_frame else None
    >>> def render():
    ...     return np.full((1, 1, 3), int(position[0] * 10), np.uint8)
    >>> chunk = np.full((8, 7), 0.5, np.float32)
    >>> result = run_chunk(step, render, chunk, frame_stride=4, steps_left=100, frame_shape=(1, 1, 3))
    >>> result.steps, result.success, result.truncated, result.frames_step.tolist()
    (6, True, False, [4, 6])
    >>> result.frames[:, 0, 0, 0].tolist()  # the positions 2.0 and 3.0
    [20, 30]
    >>> position[0] = 0.0
    >>> result = run_chunk(step, render, chunk, frame_stride=4, steps_left=3, frame_shape=(1, 1, 3))
    >>> result.steps, result.truncated, result.frames_mask.tolist()  # max_steps reached inside the chunk
    (3, True, [True, False])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the simulation workers import this module: no torch there
    import torch

__all__ = ["ChunkResult", "action_batch", "frame_slots", "num_frames", "run_chunk", "validate_chunk"]


def num_frames(chunk_len: int, frame_stride: int) -> int:
    """Number of frame slots ``K`` of a chunk: ``ceil(chunk_len / frame_stride)``."""
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    return math.ceil(chunk_len / frame_stride)


def frame_slots(chunk_len: int, frame_stride: int, executed: int) -> list[tuple[int, int]]:
    """The ``(slot, sub_step)`` pairs whose frame is kept when ``executed`` sub-steps ran."""
    return [
        (j, min((j + 1) * frame_stride, executed) - 1)
        for j in range(num_frames(chunk_len, frame_stride))
        if j * frame_stride < executed
    ]


def validate_chunk(actions: np.ndarray, chunk_len: int, action_dim: int, *, batch: bool = False) -> None:
    """Raises a ValueError naming the problem when ``actions`` is not a valid chunk (or batch of them).

    A valid chunk has shape ``[chunk_len, action_dim]`` (``[N, chunk_len, action_dim]`` with
    ``batch=True``), a floating dtype, finite entries, all within ``[-1, 1]``.
    """
    expected = ("N", chunk_len, action_dim) if batch else (chunk_len, action_dim)
    shape = tuple(actions.shape)
    if len(shape) != len(expected) or shape[-2:] != expected[-2:]:
        raise ValueError(f"action has shape {list(shape)}; expected [{', '.join(map(str, expected))}]")
    if not np.issubdtype(actions.dtype, np.floating):
        raise ValueError(f"action has dtype {actions.dtype}; expected a floating dtype (float32)")
    bad = ~np.isfinite(actions)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        where = _where(index, batch)
        raise ValueError(f"action is not finite at {where}: {actions[index]}; actions must be finite in [-1, 1]")
    out = np.abs(actions) > 1.0
    if out.any():
        index = tuple(int(i) for i in np.argwhere(out)[0])
        where = _where(index, batch)
        raise ValueError(f"action {float(actions[index]):.6g} at {where} is outside the valid range [-1, 1]")


def action_batch(action: torch.Tensor | None, num_envs: int, chunk_len: int, action_dim: int) -> np.ndarray:
    """A step tensordict's ``"action"`` as a float32 array ``[num_envs, chunk_len, action_dim]``, validated.

    Raises ``KeyError`` for a missing action and ``ValueError`` naming the dtype, shape or entry that is wrong
    (:func:`validate_chunk` for the entries).
    """
    expected = [num_envs, chunk_len, action_dim]
    if action is None:
        raise KeyError(f"the step tensordict has no 'action'; expected float32 {expected}")
    if not action.is_floating_point():
        raise ValueError(f"action has dtype {action.dtype}; expected a floating dtype (float32) of shape {expected}")
    array = action.detach().cpu().float().numpy()
    if list(array.shape) != expected:
        raise ValueError(f"action has shape {list(array.shape)}; expected {expected} (num_envs, chunk, dims)")
    validate_chunk(array, chunk_len, action_dim, batch=True)
    return array


def _where(index: tuple[int, ...], batch: bool) -> str:
    slot = f"slot {index[0]} " if batch else ""
    return f"{slot}sub-step {index[-2]} dim {index[-1]}"


@dataclass
class ChunkResult:
    """What one chunk produced.

    Attributes:
        steps: sub-steps executed (``1..chunk_len``; fewer at success or ``max_steps``).
        success: the task succeeded at the last executed sub-step.
        truncated: the episode reached ``max_steps`` without success.
        frames: ``uint8 [K, H, W, 3]`` frames (zeros where not valid), camera orientation.
        frames_mask: ``bool [K]`` valid frames.
        frames_step: ``int64 [K]``: the sub-step (from 1) after which each valid frame was taken, 0 elsewhere.
        obs: the simulator's observation after the last executed sub-step.
    """

    steps: int
    success: bool
    truncated: bool
    frames: np.ndarray
    frames_mask: np.ndarray
    frames_step: np.ndarray
    obs: dict


def run_chunk(
    step: Callable[[np.ndarray, bool, bool], tuple[bool, dict, np.ndarray | None]],
    render: Callable[[], np.ndarray],
    actions: np.ndarray,
    *,
    frame_stride: int,
    steps_left: int,
    frame_shape: tuple[int, int, int],
) -> ChunkResult:
    """Executes ``actions`` in order through ``step`` and keeps the frames of :func:`frame_slots`.

    Args:
        step: ``step(action, want_frame, last) -> (success, obs, frame)``: one env step; it
            renders the frame (returned, else ``None``) only when ``want_frame`` is true; ``last``
            marks the last step planned (the policy's next observation). Whether a step is the
            last is known in advance except at success, so ``render`` covers that case.
        render: renders the current state's frame (used when success lands on a step whose
            frame was not planned).
        actions: ``[chunk_len, action_dim]``.
        frame_stride: keep a frame every ``frame_stride`` sub-steps (and the last one).
        steps_left: env steps left before ``max_steps`` (>= 1).
        frame_shape: ``(H, W, 3)`` of a frame.
    """
    if steps_left < 1:
        raise ValueError(f"the episode has no steps left (steps_left={steps_left}); reset it first")
    chunk_len = len(actions)
    frames = np.zeros((num_frames(chunk_len, frame_stride), *frame_shape), dtype=np.uint8)
    frames_mask = np.zeros(len(frames), dtype=bool)
    frames_step = np.zeros(len(frames), dtype=np.int64)
    planned = min(chunk_len, steps_left)
    success, obs = False, {}
    for i in range(planned):
        last = i == planned - 1
        success, obs, frame = step(actions[i], last or (i + 1) % frame_stride == 0, last)
        if success and frame is None:
            frame = render()
        if frame is not None:
            frames[i // frame_stride] = frame
            frames_mask[i // frame_stride] = True
            frames_step[i // frame_stride] = i + 1
        if success:
            break
    steps = i + 1
    return ChunkResult(
        steps=steps,
        success=success,
        truncated=not success and steps == steps_left,
        frames=frames,
        frames_mask=frames_mask,
        frames_step=frames_step,
        obs=obs,
    )
