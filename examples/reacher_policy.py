"""Reacher for examples/srpo_reacher.py: the tasks, their success test, a scripted expert, behaviour cloning.

gymnasium's MuJoCo ``Reacher-v5``: a two-link planar arm (links 0.1 m and 0.11 m, torque control)
must bring its fingertip to a target. As in a LIBERO suite, there are a few tasks, each with many
initial states: task ``k`` puts the target at ``TASK_TARGETS[k]`` (8 directions, 15 cm from the base),
and the init state (the reset seed) draws the arm's start pose and velocity (Reacher's own reset
noise) and a jitter of the target of up to 2 cm per axis. An episode succeeds when the fingertip
centre comes within ``SUCCESS_DISTANCE`` (1 cm) of the target centre. Frames are rendered top-down
so that the arm and the target are in view.

The expert solves the arm's inverse kinematics for the target and tracks the joint angles with a
PD controller on the state; it succeeds in every episode of every task, within 7 to 16 steps (median
per task) of the 24 the experiment allows.
:func:`behaviour_cloning` fits a :class:`~srpo_rl.token_policy.StateTokenPolicy` to its action
chunks by cross-entropy on the action tokens.

Examples:
    >>> env = make_reacher_env()
    >>> obs, _ = env.reset(seed=0, options={"task_id": 3})
    >>> expert = ReacherExpert()
    >>> for _ in range(24):
    ...     obs, *_ = env.step(expert(obs))
    >>> bool(fingertip_distance(env) < SUCCESS_DISTANCE)
    True
    >>> env.close()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium
import numpy as np
import torch

from srpo_rl.envs.gym_slots import init_state_seed
from srpo_rl.token_policy import StateTokenPolicy

__all__ = [
    "INSTRUCTIONS",
    "SUCCESS_DISTANCE",
    "TASK_TARGETS",
    "ReacherExpert",
    "ReacherTasks",
    "behaviour_cloning",
    "expert_demonstrations",
    "fingertip_distance",
    "make_reacher_env",
    "reacher_success",
    "replay_distances",
]

_DIRECTIONS = ("east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east")
#: Target of each task: 15 cm from the base, every 45 degrees.
TASK_TARGETS = np.array([[0.15 * math.cos(k * math.pi / 4), 0.15 * math.sin(k * math.pi / 4)] for k in range(8)])
INSTRUCTIONS = [f"touch the target to the {d} with the fingertip" for d in _DIRECTIONS]
#: An init state moves its task's target by up to this much (m) along each axis.
TARGET_JITTER = 0.02
#: Success: fingertip centre within 1 cm of the target centre.
SUCCESS_DISTANCE = 0.01
LINK_LENGTHS = (0.1, 0.11)  # shoulder -> elbow, elbow -> fingertip (reacher.xml)
# Looking straight down at the arena, close enough that the reachable disc (0.21 m) fills the frame.
TOP_DOWN_CAMERA = {"distance": 0.6, "elevation": -90.0, "azimuth": 90.0, "lookat": np.zeros(3), "trackbodyid": -1}


class ReacherTasks(gymnasium.Wrapper):
    """``reset(seed, options={"task_id": k})`` moves the target to task ``k``'s place plus a seeded jitter."""

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Resets the arm and puts the target at ``options["task_id"]``'s place (default 0) plus a seeded jitter."""
        options = dict(options or {})
        task_id = options.pop("task_id", 0)
        if not 0 <= task_id < len(TASK_TARGETS):
            raise ValueError(f"unknown task_id {task_id}; choose one of 0..{len(TASK_TARGETS) - 1}")
        _, info = self.env.reset(seed=seed, options=options or None)
        sim = self.env.unwrapped
        qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
        qpos[2:4] = TASK_TARGETS[task_id] + sim.np_random.uniform(-TARGET_JITTER, TARGET_JITTER, size=2)
        sim.set_state(qpos, qvel)
        return sim._get_obs(), info


def make_reacher_env(image_size: int | None = 64) -> gymnasium.Env:
    """The Reacher tasks, rendering ``image_size`` square frames from the top-down camera (``None``: no rendering)."""
    if image_size is None:
        return ReacherTasks(gymnasium.make("Reacher-v5"))
    env = gymnasium.make(
        "Reacher-v5", render_mode="rgb_array", width=image_size, height=image_size, default_camera_config=TOP_DOWN_CAMERA
    )
    return ReacherTasks(env)


def fingertip_distance(env: gymnasium.Env) -> float:
    """Distance (m) in the arm's plane between the fingertip and the target centres."""
    sim = env.unwrapped
    return float(np.linalg.norm((sim.get_body_com("fingertip") - sim.get_body_com("target"))[:2]))


def reacher_success(env: gymnasium.Env, obs: np.ndarray, info: dict, distance: float = SUCCESS_DISTANCE) -> bool:
    """The ``success_fn`` of :class:`~srpo_rl.envs.gym_slots.GymSlotEnv`: fingertip within ``distance`` of the target."""
    return fingertip_distance(env) < distance


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class ReacherExpert:
    """Inverse kinematics to the target, then PD control of the two joints (torques clipped to [-1, 1]).

    Reads the ``Reacher-v5`` observation ``[cos q, sin q, target xy, q velocity, fingertip - target]``
    and picks the elbow-up or elbow-down solution nearer to the current joint angles.
    """

    def __init__(self, kp: float = 2.0, kd: float = 0.1, link_lengths: tuple[float, float] = LINK_LENGTHS) -> None:
        self.kp, self.kd, self.link_lengths = kp, kd, link_lengths

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        q = np.arctan2(obs[2:4], obs[0:2])
        target, velocity = obs[4:6], obs[6:8]
        l1, l2 = self.link_lengths
        cos_elbow = np.clip((target @ target - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
        errors = []
        for sign in (1.0, -1.0):
            elbow = sign * np.arccos(cos_elbow)
            shoulder = np.arctan2(target[1], target[0]) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
            errors.append(_wrap(np.array([shoulder, elbow]) - q))
        error = min(errors, key=lambda e: np.abs(e).sum())
        return np.clip(self.kp * error - self.kd * velocity, -1.0, 1.0).astype(np.float32)


def expert_demonstrations(
    prompts: Sequence[tuple[int, int]], *, seed: int, max_steps: int, chunk_len: int, expert: ReacherExpert | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert episodes from ``(task_id, init_state_id)`` prompts, as ``(states [M, 10], action chunks [M, chunk_len, 2])``.

    Every env step of an episode is a sample: the state and the expert's next ``chunk_len`` actions
    (the episode runs ``chunk_len`` steps past ``max_steps`` so that every chunk is complete). The env
    is reset with the same seeds as the slot env's (:func:`~srpo_rl.envs.gym_slots.init_state_seed`).
    """
    expert = expert or ReacherExpert()
    env = make_reacher_env(image_size=None)
    states, chunks = [], []
    try:
        for task_id, init_state_id in prompts:
            obs, _ = env.reset(seed=init_state_seed(seed, task_id, init_state_id), options={"task_id": task_id})
            episode_states, episode_actions = [], []
            for _ in range(max_steps + chunk_len):
                action = expert(obs)
                episode_states.append(obs.astype(np.float32))
                episode_actions.append(action)
                obs, *_ = env.unwrapped.step(action)  # past the TimeLimit: the last chunks need the expert's actions
            actions = np.stack(episode_actions)
            states.append(np.stack(episode_states[:max_steps]))
            chunks.append(np.stack([actions[t : t + chunk_len] for t in range(max_steps)]))
    finally:
        env.close()
    return torch.from_numpy(np.concatenate(states)), torch.from_numpy(np.concatenate(chunks))


def replay_distances(episodes: Sequence[tuple[int, int, np.ndarray]], *, seed: int) -> list[np.ndarray]:
    """Fingertip-target distance after each step of ``(task_id, init_state_id, actions [T, 2])`` episodes.

    The episodes are replayed without rendering from their init states; the physics is deterministic, so
    these are the distances the slot env's episodes had.
    """
    env = make_reacher_env(image_size=None)
    out = []
    try:
        for task_id, init_state_id, actions in episodes:
            env.reset(seed=init_state_seed(seed, task_id, init_state_id), options={"task_id": task_id})
            distances = []
            for action in actions:
                env.unwrapped.step(np.asarray(action, dtype=np.float32))
                distances.append(fingertip_distance(env))
            out.append(np.array(distances))
    finally:
        env.close()
    return out


def behaviour_cloning(
    policy: StateTokenPolicy,
    states: torch.Tensor,
    chunks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Fits the policy's tokens (temperature 1) to the expert's chunks by cross-entropy; returns the losses.

    The input normalisation is set to the demonstrations' mean and std first.
    """
    policy.set_state_normalization(states.mean(0), states.std(0))
    targets = policy.action_tokenizer.encode(chunks)
    optimizer = torch.optim.Adam(policy.net.parameters(), lr=lr)
    losses = []
    policy.train()
    for _ in range(steps):
        idx = torch.randint(len(states), (batch_size,), generator=generator)
        logits = policy.token_logits(states[idx])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets[idx].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    policy.eval()
    return losses
