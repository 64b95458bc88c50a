"""LIBERO suites as gymnasium environments (one in-process simulation, no torch).

Importing :mod:`srpo_rl.envs` registers ``LIBERO/<suite>-v0`` for every suite and alias:

    >>> import gymnasium
    >>> import srpo_rl.envs
    >>> "LIBERO/libero_long-v0" in gymnasium.registry
    True
    >>> env = gymnasium.make("LIBERO/libero_long-v0", task_id=3, chunk_len=8)  # doctest: +SKIP
    >>> obs, info = env.reset(options={"init_state_id": 0})  # doctest: +SKIP
    >>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())  # doctest: +SKIP

An action is one chunk ``[chunk_len, 7]`` (``chunk_len=1`` gives plain per-step control); it runs
in order and stops inside the chunk at success (``terminated``) or at ``max_steps``
(``truncated``). The reward is 1.0 on success. Observations hold the 180-degree-rotated
``image`` ``[H, W, 3]``, the 8-D ``state`` and optionally ``wrist_image``; ``info`` holds the
instruction, ``chunk_steps``, ``step_count`` and the reward ``frames`` / ``frames_mask`` /
``frames_step`` (the episode step each frame shows).
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from .sim import ACTION_DIM, LiberoSim
from .suites import SUITE_ALIASES, SUITES, resolve_max_steps

__all__ = ["LiberoGymEnv", "register_envs"]


class LiberoGymEnv(gymnasium.Env):
    """One LIBERO task as a gymnasium env whose actions are action chunks.

    Args:
        suite: suite name (aliases accepted).
        task_id: task index in the suite.

    Keyword Args:
        chunk_len: env steps per action. Defaults to 1.
        max_steps: episode length in env steps; ``None`` = 512, ``"suite"`` = the OpenVLA-OFT
            evaluation length.
        num_steps_wait: uncounted no-op steps after reset. Defaults to 10.
        frame_stride: reward frame every ``frame_stride`` steps (``None``: one per action).
        image_size: square camera resolution. Defaults to 256.
        wrist_image: also observe the wrist camera.
        render_mode: ``None`` or ``"rgb_array"`` (the latest agentview frame).

    ``reset(options={"init_state_id": k})`` picks the fixed initial state (else one drawn from
    the env's seeded generator); ``options={"task_id": t}`` switches task (rebuilds).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        suite: str,
        task_id: int = 0,
        *,
        chunk_len: int = 1,
        max_steps: int | str | None = None,
        num_steps_wait: int = 10,
        frame_stride: int | None = None,
        image_size: int = 256,
        wrist_image: bool = False,
        render_mode: str | None = None,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unknown render_mode {render_mode!r}; choose None or 'rgb_array'")
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        max_steps = resolve_max_steps(max_steps, suite)
        self.sim = LiberoSim(
            suite,
            task_id,
            max_steps=int(max_steps),
            num_steps_wait=num_steps_wait,
            image_size=image_size,
            wrist_image=wrist_image,
        )
        self.chunk_len = int(chunk_len)
        self.frame_stride = frame_stride
        self.render_mode = render_mode
        image = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        observation = {"image": image, "state": spaces.Box(-np.inf, np.inf, (8,), np.float32)}
        if wrist_image:
            observation["wrist_image"] = image
        self.observation_space = spaces.Dict(observation)
        self.action_space = spaces.Box(-1.0, 1.0, (self.chunk_len, ACTION_DIM), np.float32)
        self._last_image = None

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Resets to ``options["task_id"]`` (default: the current task) and ``options["init_state_id"]`` (default:
        one drawn from the env's generator); returns ``(observation, info)``."""
        super().reset(seed=seed)
        options = dict(options or {})
        task_id = options.pop("task_id", self.sim.task_id)
        init_state_id = options.pop("init_state_id", None)
        if options:
            raise ValueError(f"unknown reset options {sorted(options)}; choose from ['init_state_id', 'task_id']")
        if task_id != self.sim.task_id:
            self.sim.set_task(task_id)
        if init_state_id is None:
            init_state_id = int(self.np_random.integers(self.sim.num_init_states))
        out = self.sim.reset(init_state_id)
        return self._observation(out), self._info(out)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Runs one chunk ``[chunk_len, 7]``; the reward is 1.0 on success, which terminates the episode."""
        action = np.asarray(action, dtype=np.float32).reshape(self.chunk_len, ACTION_DIM)
        out = self.sim.step_chunk(action, frame_stride=self.frame_stride)
        success = bool(out["success"])
        return self._observation(out), float(success), success, bool(out["truncated"]), self._info(out)

    def render(self) -> np.ndarray | None:
        """The last observation's agentview frame ``[H, W, 3]`` uint8 (``render_mode="rgb_array"``)."""
        return self._last_image

    def close(self) -> None:
        """Closes the simulation."""
        self.sim.close()

    def _observation(self, out: dict) -> dict:
        self._last_image = out["image"]
        obs = {"image": out["image"], "state": out["state"]}
        if "wrist_image" in out:
            obs["wrist_image"] = out["wrist_image"]
        return obs

    def _info(self, out: dict) -> dict:
        return {
            "instruction": self.sim.instruction,
            "task_id": self.sim.task_id,
            "init_state_id": self.sim.init_state_id,
            "success": bool(out["success"]),
            "step_count": int(out["step_count"]),
            "chunk_steps": int(out["chunk_steps"]),
            "frames": out["frames"],
            "frames_mask": out["frames_mask"],
            "frames_step": out["frames_step"],
        }


def register_envs() -> list[str]:
    """Registers ``LIBERO/<suite>-v0`` for every suite and alias; returns the ids."""
    ids = []
    for name in (*SUITES, *SUITE_ALIASES):
        env_id = f"LIBERO/{name}-v0"
        if env_id not in gymnasium.registry:
            gymnasium.register(env_id, entry_point=f"{__name__}:LiberoGymEnv", kwargs={"suite": name})
        ids.append(env_id)
    return ids
