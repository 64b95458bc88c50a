"""Reacher for examples/srpo_reacher.py: the env, its success test, a scripted expert, behaviour cloning.

gymnasium's MuJoCo ``Reacher-v5``: a two-link planar arm (links 0.1 m and 0.11 m, torque control)
must bring its fingertip to a target placed at random within 0.2 m of the base. Here an episode
succeeds when the fingertip centre comes within ``SUCCESS_DISTANCE`` (1 cm) of the target centre,
i.e. the 1 cm fingertip covers the target's centre; the reset seed (the init state) draws the
target and the arm's start pose. Frames are rendered top-down so the arm and the target are in view.

The expert solves the arm's inverse kinematics for the target and tracks the joint angles with a
PD controller on the state; it succeeds in every episode, in about 8 of the 48 steps.
:func:`behaviour_cloning` fits a :class:`~srpo_rl.token_policy.StateTokenPolicy` to its action
chunks by cross-entropy on the action tokens.

Examples:
    >>> env = make_reacher_env()
    >>> obs, _ = env.reset(seed=0)
    >>> expert = ReacherExpert()
    >>> for _ in range(48):
    ...     obs, *_ = env.step(expert(obs))
    >>> bool(fingertip_distance(env) < SUCCESS_DISTANCE)
    True
    >>> env.close()
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium
import numpy as np
import torch

from srpo_rl.envs.gym_slots import init_state_seed
from srpo_rl.token_policy import StateTokenPolicy

__all__ = [
    "INSTRUCTION",
    "SUCCESS_DISTANCE",
    "ReacherExpert",
    "behaviour_cloning",
    "expert_demonstrations",
    "fingertip_distance",
    "make_reacher_env",
    "reacher_success",
]

INSTRUCTION = "touch the target with the fingertip"
#: Success: fingertip centre within 1 cm of the target centre.
SUCCESS_DISTANCE = 0.01
LINK_LENGTHS = (0.1, 0.11)  # shoulder -> elbow, elbow -> fingertip (reacher.xml)
# Looking straight down at the arena, close enough that the reachable disc (0.21 m) fills the frame.
TOP_DOWN_CAMERA = {"distance": 0.6, "elevation": -90.0, "azimuth": 90.0, "lookat": np.zeros(3), "trackbodyid": -1}


def make_reacher_env(task_id: int = 0, image_size: int = 64) -> gymnasium.Env:
    """``Reacher-v5`` rendering ``image_size`` square frames from the top-down camera (one task: ``task_id`` 0)."""
    if task_id != 0:
        raise ValueError(f"Reacher has one task; got task_id {task_id}, choose 0")
    return gymnasium.make(
        "Reacher-v5", render_mode="rgb_array", width=image_size, height=image_size, default_camera_config=TOP_DOWN_CAMERA
    )


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

    def __init__(self, kp: float = 2.0, kd: float = 0.1) -> None:
        self.kp, self.kd = kp, kd

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        q = np.arctan2(obs[2:4], obs[0:2])
        target, velocity = obs[4:6], obs[6:8]
        l1, l2 = LINK_LENGTHS
        cos_elbow = np.clip((target @ target - l1**2 - l2**2) / (2 * l1 * l2), -1.0, 1.0)
        errors = []
        for sign in (1.0, -1.0):
            elbow = sign * np.arccos(cos_elbow)
            shoulder = np.arctan2(target[1], target[0]) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
            errors.append(_wrap(np.array([shoulder, elbow]) - q))
        error = min(errors, key=lambda e: np.abs(e).sum())
        return np.clip(self.kp * error - self.kd * velocity, -1.0, 1.0).astype(np.float32)


def expert_demonstrations(
    init_state_ids: Sequence[int], *, seed: int, max_steps: int, chunk_len: int, expert: ReacherExpert | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert episodes from the given init states, as ``(states [M, 10], action chunks [M, chunk_len, 2])``.

    Every env step of an episode is a sample: the state and the expert's next ``chunk_len`` actions
    (the episode runs ``chunk_len`` steps past ``max_steps`` so that every chunk is complete). The env
    is reset with the same seeds as the slot env's (:func:`~srpo_rl.envs.gym_slots.init_state_seed`).
    """
    expert = expert or ReacherExpert()
    env = make_reacher_env()
    states, chunks = [], []
    try:
        for init_state_id in init_state_ids:
            obs, _ = env.reset(seed=init_state_seed(seed, 0, init_state_id))
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
