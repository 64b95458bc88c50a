"""Any gymnasium env as a batched slot env: per-slot seeded resets, chunked steps, reward frames.

:class:`GymSlotEnv` gives a list of in-process gymnasium envs the reset / step contract of
:func:`srpo_rl.envs.make_libero_env`, so :func:`srpo_rl.rollout.collect_rollouts`, the SRPO
progress reward and the filters run on it unchanged:

- ``reset`` resets only the slots marked in ``"_reset"``, each to ``(task_id, init_state_id)``:
  ``init_state_id`` seeds the env's ``reset``, so every rollout of a group replays the same
  initial state (for MuJoCo tasks: the same target and start pose), and a multi-task env reads
  the task from ``reset(options={"task_id": ...})``;
- ``step`` executes one action chunk ``[N, chunk_len, action_dim]`` per slot marked in
  ``"_step"``, in order, and stops inside the chunk at success, at ``max_steps`` or when the
  gymnasium env itself ends the episode; it renders only the reward frames (every
  ``frame_stride`` sub-steps, and the last executed one, which is also the next observation;
  ``frames_step`` is the episode step each one shows).

Success is what the caller says it is: ``success_fn(env, obs, info) -> bool`` after every
sub-step. Actions are in ``[-1, 1]`` (what a token policy decodes) and are mapped affinely onto
the env's ``Box`` action space.

Examples:
    >>> import os
    >>> _ = os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering, before MuJoCo is imported
    >>> import gymnasium, numpy as np, torch
    >>> from tensordict import TensorDict
    >>> from srpo_rl.envs.gym_slots import GymSlotEnv
    >>> env = GymSlotEnv(
    ...     lambda: gymnasium.make("Reacher-v5", render_mode="rgb_array", width=32, height=32),
    ...     num_envs=2, instructions="reach the target", max_steps=16, chunk_len=4,
    ...     success_fn=lambda env, obs, info: float(np.linalg.norm(obs[-2:])) < 0.01,
    ... )
    >>> td = env.reset(TensorDict({
    ...     "_reset": torch.ones(2, 1, dtype=torch.bool), "init_state_id": torch.tensor([[3], [3]]),
    ...     "rollout_id": torch.tensor([[0], [1]]), "group_id": torch.tensor([[0], [0]])}, [2]))
    >>> bool((td["observation", "state"][0] == td["observation", "state"][1]).all())  # same init state
    True
    >>> td["action"] = torch.zeros(2, 4, 2)
    >>> out = env.step(td)["next"]
    >>> out["chunk_steps"].flatten().tolist(), out["frames"].shape, out["observation", "image"].dtype
    ([4, 4], torch.Size([2, 1, 3, 32, 32]), torch.uint8)
    >>> env.close()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium
import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, NonTensor, Unbounded
from torchrl.envs import EnvBase

from .chunk import action_batch, num_frames
from .slot_fields import slot_mask, slot_values

__all__ = ["GymSlotEnv", "init_state_seed"]

logger = logging.getLogger(__name__)

_ID_KEYS = ("task_id", "init_state_id", "rollout_id", "group_id")

SuccessFn = Callable[[gymnasium.Env, Any, dict], bool]


def init_state_seed(seed: int, task_id: int, init_state_id: int) -> int:
    """The ``reset`` seed of ``(task_id, init_state_id)``: a hash, so nearby ids give unrelated states.

    Examples:
        >>> init_state_seed(0, 0, 7) == init_state_seed(0, 0, 7) != init_state_seed(0, 0, 8)
        True
    """
    return int(np.random.SeedSequence([seed, task_id, init_state_id]).generate_state(1)[0])


class _Slot:
    """One gymnasium env, its task and the state of its running episode."""

    def __init__(self, env: gymnasium.Env) -> None:
        self.env, self.task_id = env, 0
        self.obs: Any = None
        self.image: np.ndarray | None = None
        self.step_count = 0
        self.success = self.terminated = self.truncated = self.failed = False
        self.done = True  # not started: must be reset
        self.init_state_id, self.rollout_id, self.group_id = 0, -1, -1


class GymSlotEnv(EnvBase):
    """A batch of gymnasium envs with the slot contract of the LIBERO env (in this process).

    Args:
        make_env: builds one env with ``render_mode="rgb_array"`` (its frames are the observation
            image and the reward frames) and a 1-D ``Box`` action space. With several tasks, the env
            takes the task from ``reset(seed=..., options={"task_id": task_id})``.
        num_envs: number of slots.

    Keyword Args:
        success_fn: ``success_fn(env, obs, info) -> bool``, checked after every sub-step; success
            ends the episode (``terminated``) and the chunk.
        instructions: the language instruction of each task (a single string for one task); the
            number of tasks is its length.
        max_steps: episode length in env steps; reaching it ends the episode (``truncated``).
        chunk_len: env steps per action chunk. Defaults to 8.
        frame_stride: keep a reward frame every ``frame_stride`` sub-steps (``None``: one per
            chunk, the last executed sub-step's). The last executed sub-step's frame is always kept.
        state_fn: maps a gymnasium observation to the float ``("observation", "state")`` vector;
            defaults to flattening a ``Box`` observation.
        seed: base of the per-``(task, init state)`` reset seeds (:func:`init_state_seed`).
        device: device of the returned tensors. Defaults to CPU.

    Reset: ``env.reset(td)`` resets the slots where ``td["_reset"]`` is true (all when absent) to
    ``td["task_id"]`` / ``td["init_state_id"]`` and stamps ``td["rollout_id"]`` /
    ``td["group_id"]`` (all int64 ``[N, 1]``); missing ids default to the slot's task, init
    state 0 and ids -1. A reset slot's ``frames[:, 0]`` is its first reward frame (its first image).

    Step: ``td["action"]`` float ``[N, chunk_len, action_dim]`` in ``[-1, 1]``; an optional
    ``td["_step"]`` bool ``[N]`` steps only those slots (the others report their last data with
    ``chunk_steps`` 0). A slot whose episode ended must be reset before it steps again. An
    exception raised by a slot's env ends that rollout with ``done`` and ``worker_failed`` set (the
    env is rebuilt at the next reset); the other slots step as usual.

    The slots run in this process, one after the other: cheap envs (MuJoCo control tasks at a
    small render size) fit; for expensive ones, use worker processes as the LIBERO env does.
    """

    def __init__(
        self,
        make_env: Callable[[], gymnasium.Env],
        num_envs: int,
        *,
        success_fn: SuccessFn,
        instructions: str | Sequence[str],
        max_steps: int,
        chunk_len: int = 8,
        frame_stride: int | None = None,
        state_fn: Callable[[Any], np.ndarray] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        if int(max_steps) < 1 or int(chunk_len) < 1:
            raise ValueError(f"max_steps and chunk_len must be >= 1, got {max_steps!r} and {chunk_len!r}")
        if frame_stride is not None and frame_stride < 1:
            raise ValueError(f"frame_stride must be None (one frame per chunk) or >= 1, got {frame_stride}")
        self.instructions = [instructions] if isinstance(instructions, str) else list(instructions)
        if not self.instructions:
            raise ValueError("instructions is empty; give one instruction per task")
        super().__init__(batch_size=torch.Size([num_envs]), device=device)
        self.make_env, self.success_fn = make_env, success_fn
        self.state_fn = state_fn if state_fn is not None else _flat_state
        self.num_envs, self.max_steps, self.chunk_len = num_envs, int(max_steps), int(chunk_len)
        self.frame_stride = self.chunk_len if frame_stride is None else int(frame_stride)
        self.num_frames = num_frames(self.chunk_len, self.frame_stride)
        self._seed = int(seed)
        self._slots = [_Slot(self._build()) for _ in range(num_envs)]
        first = self._slots[0].env
        space = first.action_space
        if not isinstance(space, gymnasium.spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"make_env must build envs with a 1-D Box action space, got {space}")
        self.action_dim = space.shape[0]
        self._action_low, self._action_high = space.low.astype(np.float64), space.high.astype(np.float64)
        obs, _ = first.reset(seed=self._seed)
        self.state_dim = len(self.state_fn(obs))
        self.image_shape = self._render(first).shape  # (3, H, W)
        for slot in self._slots:  # what a slot that was never reset reports
            slot.image = np.zeros(self.image_shape, dtype=np.uint8)
        self._make_specs()
        self.is_closed = False

    # -- specs ------------------------------------------------------------------------------------
    def _make_specs(self) -> None:
        n, k, image = self.num_envs, self.num_frames, self.image_shape
        flag = lambda *shape: Categorical(2, shape=(n, *shape), dtype=torch.bool)  # noqa: E731
        count = lambda: Unbounded(shape=(n, 1), dtype=torch.int64)  # noqa: E731
        self.observation_spec = Composite(
            observation=Composite(
                image=Unbounded(shape=(n, *image), dtype=torch.uint8),
                state=Unbounded(shape=(n, self.state_dim), dtype=torch.float32),
                shape=(n,),
            ),
            instruction=NonTensor(shape=(n,), example_data=self.instructions[0]),
            success=flag(1),
            step_count=count(),
            chunk_steps=count(),
            frames=Unbounded(shape=(n, k, *image), dtype=torch.uint8),
            frames_mask=flag(k),
            frames_step=Unbounded(shape=(n, k), dtype=torch.int64),
            worker_failed=flag(1),
            **{key: count() for key in _ID_KEYS},
            shape=(n,),
        )
        self.action_spec = Bounded(low=-1.0, high=1.0, shape=(n, self.chunk_len, self.action_dim), dtype=torch.float32)
        self.reward_spec = Bounded(low=0.0, high=1.0, shape=(n, 1), dtype=torch.float32)
        self.done_spec = Composite(done=flag(1), terminated=flag(1), truncated=flag(1), shape=(n,))

    # -- torchrl API ------------------------------------------------------------------------------
    def _set_seed(self, seed: int | None) -> None:
        # episodes are determined by (seed, task, init state, actions)
        if seed is not None:
            self._seed = int(seed)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        n, k, image = self.num_envs, self.num_frames, self.image_shape
        mask = slot_mask(tensordict, "_reset", n)
        ids = {key: slot_values(tensordict, key, n) for key in _ID_KEYS}
        frames = torch.zeros(n, k, *image, dtype=torch.uint8)
        frames_mask = torch.zeros(n, k, dtype=torch.bool)
        frames_step = torch.zeros(n, k, dtype=torch.int64)  # the reset frames show step 0
        for s in torch.nonzero(mask).flatten().tolist():
            slot = self._slots[s]
            task = int(ids["task_id"][s]) if ids["task_id"] is not None else slot.task_id
            if not 0 <= task < len(self.instructions):
                raise ValueError(f"task_id {task} of slot {s} is out of range; choose one of 0..{len(self.instructions) - 1}")
            if slot.failed:
                slot.env.close()
                slot.env = self._build()
            slot.task_id = task
            slot.init_state_id = int(ids["init_state_id"][s]) if ids["init_state_id"] is not None else 0
            slot.rollout_id = int(ids["rollout_id"][s]) if ids["rollout_id"] is not None else -1
            slot.group_id = int(ids["group_id"][s]) if ids["group_id"] is not None else -1
            options = {"task_id": task} if len(self.instructions) > 1 else None
            slot.obs, _ = slot.env.reset(seed=init_state_seed(self._seed, task, slot.init_state_id), options=options)
            slot.image = self._render(slot.env)
            slot.step_count = 0
            slot.success = slot.terminated = slot.truncated = slot.failed = slot.done = False
            frames[s, 0], frames_mask[s, 0] = torch.from_numpy(slot.image), True  # the first reward frame
        return self._output(torch.zeros(n, 1, dtype=torch.int64), frames, frames_mask, frames_step)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        n, k, image = self.num_envs, self.num_frames, self.image_shape
        actions = action_batch(tensordict.get("action", None), self.num_envs, self.chunk_len, self.action_dim)
        slots = torch.nonzero(slot_mask(tensordict, "_step", n)).flatten().tolist()
        over = [s for s in slots if self._slots[s].done]
        if over:
            raise RuntimeError(
                f"slots {over} have no running episode (it ended, or they were never reset); reset them "
                f"(td['_reset']) before stepping, or leave them out of td['_step']"
            )
        frames = torch.zeros(n, k, *image, dtype=torch.uint8)
        frames_mask = torch.zeros(n, k, dtype=torch.bool)
        frames_step = torch.zeros(n, k, dtype=torch.int64)
        chunk_steps = torch.zeros(n, 1, dtype=torch.int64)
        for s in slots:
            slot = self._slots[s]
            try:
                chunk_steps[s] = self._run_chunk(slot, actions[s], frames[s], frames_mask[s], frames_step[s])
            except Exception as err:  # a broken simulation ends its rollout, not the batch
                logger.error("rollout %d (slot %d) failed: %r", slot.rollout_id, s, err)
                slot.failed = slot.truncated = slot.done = True
                slot.success = slot.terminated = False
        out = self._output(chunk_steps, frames, frames_mask, frames_step)
        out["reward"] = out["success"].float()
        return out

    # -- one chunk --------------------------------------------------------------------------------
    def _run_chunk(self, slot: _Slot, actions: np.ndarray, frames: torch.Tensor, frames_mask: torch.Tensor,
                   frames_step: torch.Tensor) -> int:
        """Runs one chunk on a slot, writes its reward frames (and the episode step each shows) and returns
        the sub-steps executed.

        Frame ``j`` is the frame after sub-step ``min((j + 1) * frame_stride, n)``, valid when
        ``j * frame_stride < n`` (``n`` = sub-steps executed): the slots of the LIBERO env.
        """
        env_actions = self._action_low + (actions.astype(np.float64) + 1.0) * 0.5 * (self._action_high - self._action_low)
        planned = min(self.chunk_len, self.max_steps - slot.step_count)
        for i in range(planned):
            slot.obs, _, terminated, truncated, info = slot.env.step(env_actions[i].astype(np.float32))
            slot.step_count += 1
            slot.success = bool(self.success_fn(slot.env, slot.obs, info))
            slot.terminated = slot.success or bool(terminated)
            slot.truncated = not slot.terminated and (bool(truncated) or slot.step_count >= self.max_steps)
            slot.done = slot.terminated or slot.truncated
            last = slot.done or i == planned - 1
            if last or (i + 1) % self.frame_stride == 0:
                slot.image = self._render(slot.env)
                frames[i // self.frame_stride] = torch.from_numpy(slot.image)
                frames_mask[i // self.frame_stride] = True
                frames_step[i // self.frame_stride] = slot.step_count
            if last:
                return i + 1
        raise AssertionError("unreachable: the last planned sub-step returns")

    # -- helpers ----------------------------------------------------------------------------------
    def _build(self) -> gymnasium.Env:
        env = self.make_env()
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"make_env built an env with render_mode={env.render_mode!r}; pass render_mode='rgb_array' "
                "(its frames are the policy image and the reward frames)"
            )
        return env

    @staticmethod
    def _render(env: gymnasium.Env) -> np.ndarray:
        # Each gymnasium MuJoCo env renders with its own OpenGL (EGL) context, which gymnasium makes current
        # only when it creates it; with several envs in one process, the last one created (or none, once an
        # env is closed) would be current. So make the env's own context current before each frame.
        viewer = getattr(getattr(env.unwrapped, "mujoco_renderer", None), "viewer", None)
        if viewer is not None and hasattr(viewer, "make_context_current"):
            viewer.make_context_current()
        return np.ascontiguousarray(np.asarray(env.render(), dtype=np.uint8).transpose(2, 0, 1))

    def _output(self, chunk_steps: torch.Tensor, frames: torch.Tensor, frames_mask: torch.Tensor,
                frames_step: torch.Tensor) -> TensorDict:
        slots = self._slots
        column = lambda name, dtype: torch.tensor([[getattr(s, name)] for s in slots], dtype=dtype)  # noqa: E731
        out = TensorDict(
            {
                "observation": {
                    "image": torch.from_numpy(np.stack([s.image for s in slots])),
                    "state": torch.from_numpy(np.stack([self._state(s) for s in slots])),
                },
                "instruction": NonTensorStack.from_list([self.instructions[s.task_id] for s in slots]),
                "chunk_steps": chunk_steps,
                "frames": frames,
                "frames_mask": frames_mask,
                "frames_step": frames_step,
                "worker_failed": column("failed", torch.bool),
                **{name: column(name, torch.bool) for name in ("success", "terminated", "truncated", "done")},
                **{name: column(name, torch.int64) for name in ("step_count", *_ID_KEYS)},
            },
            batch_size=[self.num_envs],
        )
        return out.to(self.device) if self.device is not None and self.device != out.device else out

    def _state(self, slot: _Slot) -> np.ndarray:
        if slot.obs is None:  # never reset
            return np.zeros(self.state_dim, dtype=np.float32)
        return np.asarray(self.state_fn(slot.obs), dtype=np.float32).reshape(self.state_dim)

    @property
    def envs(self) -> list[gymnasium.Env]:
        """The gymnasium env of each slot."""
        return [slot.env for slot in self._slots]

    def close(self, *, raise_if_closed: bool = True) -> None:
        """Closes the gymnasium envs (and their renderers)."""
        for slot in getattr(self, "_slots", []):
            slot.env.close()
        self._slots = []
        super().close(raise_if_closed=raise_if_closed)


def _flat_state(obs: Any) -> np.ndarray:
    return np.asarray(obs, dtype=np.float32).reshape(-1)
