"""Env-slot rollout scheduling: run a list of rollout requests on a batched env, refilling slots at once.

torchrl's ``Collector`` steps every env of a batch and resets a finished env to whatever its own reset
logic picks; SRPO needs each rollout to start from a *given* (task, init state) with ids that identify its
GRPO group, and a finished slot to take the next pending request immediately. So this module is a thin
loop over :func:`srpo_rl.envs.make_libero_env`'s per-slot reset and partial step (``"_step"``):

- a slot runs one :class:`RolloutRequest`; the policy is queried only for active slots and only those
  slots are stepped (no padding steps, no queries for finished envs);
- a finished slot takes the next pending request at once, preferring one of the task it already has loaded
  so that its reset stays soft (a task change rebuilds the simulation);
- each finished episode becomes one row of the trajectory batch (layout in :func:`collect_rollouts`).

Example:
    >>> from srpo_rl.envs import make_libero_env
    >>> from srpo_rl.rollout import collect_rollouts, group_requests
    >>> env = make_libero_env("libero_object", num_envs=2, max_steps=16)
    >>> requests = group_requests([(0, 0), (1, 0)], rollouts_per_group=2)
    >>> trajs, stats = collect_rollouts(env, policy, requests)  # policy: e.g. srpo_rl.policy.OpenVLAOFTPolicy
    >>> trajs.batch_size, trajs["steps"].batch_size
    (torch.Size([4]), torch.Size([4, 2]))
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

__all__ = ["RolloutRequest", "RolloutStats", "collect_rollouts", "group_requests"]

# What a step record keeps from the policy output (training recomputes log-probs from these).
POLICY_KEYS = ("policy_image", "prompt_ids", "prompt_mask", "action_tokens", "action_log_prob", "action")
# What it keeps from the env's ("next", ...) output (the reward frames and how far the chunk got).
NEXT_KEYS = ("frames", "frames_mask", "chunk_steps")
OBS_KEYS = (("observation", "image"), ("observation", "wrist_image"), ("observation", "state"))


@dataclass(frozen=True)
class RolloutRequest:
    """One episode to run: LIBERO task, fixed init state, and globally unique rollout / group ids."""

    task_id: int
    init_state_id: int
    rollout_id: int
    group_id: int


def group_requests(
    prompts: Iterable[tuple[int, int]],
    rollouts_per_group: int,
    *,
    first_group_id: int = 0,
    group_id_stride: int = 1,
) -> list[RolloutRequest]:
    """Expands ``(task_id, init_state_id)`` prompts into ``rollouts_per_group`` requests each.

    The i-th prompt becomes group ``g = first_group_id + i * group_id_stride`` with rollout ids
    ``g * n .. g * n + n - 1``. Ranks keep ids unique with ``first_group_id = k * world_size + rank`` and
    ``group_id_stride = world_size``.
    """
    if rollouts_per_group < 1:
        raise ValueError(f"rollouts_per_group must be >= 1, got {rollouts_per_group}")
    requests = []
    for i, (task_id, init_state_id) in enumerate(prompts):
        group_id = first_group_id + i * group_id_stride
        for k in range(rollouts_per_group):
            requests.append(RolloutRequest(int(task_id), int(init_state_id), group_id * rollouts_per_group + k, group_id))
    return requests


@dataclass
class RolloutStats:
    """Counters and wall times of one :func:`collect_rollouts` call (seconds)."""

    trajectories: int = 0
    env_steps: int = 0
    decisions: int = 0
    wall_time: float = 0.0
    env_time: float = 0.0
    policy_time: float = 0.0
    reset_time: float = 0.0
    videos: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def env_steps_per_second(self) -> float:
        return self.env_steps / max(self.wall_time, 1e-9)

    def as_dict(self) -> dict[str, float]:
        return {
            "trajectories": self.trajectories,
            "env_steps": self.env_steps,
            "decisions": self.decisions,
            "env_steps_per_s": self.env_steps_per_second,
            "time_wall": self.wall_time,
            "time_env": self.env_time,
            "time_policy": self.policy_time,
            "time_reset": self.reset_time,
        }


class _Slot:
    """Book-keeping of one env slot: its request, its loaded task, its latest observation, its steps."""

    def __init__(self) -> None:
        self.request: RolloutRequest | None = None
        self.task_id: int | None = None
        self.obs: dict = {}
        self.steps: list[TensorDictBase] = []
        self.initial_frame: torch.Tensor | None = None
        self.video: list[torch.Tensor] | None = None


def _pick_request(pending: list[RolloutRequest], task_id: int | None) -> RolloutRequest:
    for i, request in enumerate(pending):
        if request.task_id == task_id:
            return pending.pop(i)
    return pending.pop(0)


def _instructions(td: TensorDictBase) -> list[str]:
    value = td.get("instruction")
    if isinstance(value, str):
        return [value] * td.batch_size[0]
    return list(value.tolist() if hasattr(value, "tolist") else value)


def _read_obs(td: TensorDictBase, slot_ids: Sequence[int], slots: list[_Slot]) -> None:
    instructions = _instructions(td)
    for s in slot_ids:
        obs = {key: td.get(key)[s] for key in OBS_KEYS if key in td.keys(True)}
        obs["instruction"] = instructions[s]
        slots[s].obs = obs


def _policy_input(slots: list[_Slot], active: list[int]) -> TensorDict:
    data = {key: torch.stack([slots[s].obs[key] for s in active]) for key in slots[active[0]].obs if key != "instruction"}
    td = TensorDict(data, batch_size=[len(active)])
    td.set_non_tensor("instruction", [slots[s].obs["instruction"] for s in active])
    return td


def collect_rollouts(
    env: EnvBase,
    policy: TensorDictModuleBase,
    requests: Sequence[RolloutRequest],
    *,
    exploration_type: ExplorationType = ExplorationType.RANDOM,
    keep_steps: bool = True,
    record_videos: int = 0,
    progress: bool | str = False,
) -> tuple[TensorDict, RolloutStats]:
    """Runs every request to the end of its episode and returns the trajectory batch.

    Args:
        env: a batched slot env (:func:`srpo_rl.envs.make_libero_env` or one with the same reset/step contract).
        policy: writes ``action`` (plus tokens and log-probs) from ``("observation", "image")`` and ``instruction``.
        requests: the episodes to run, any number (more than ``env.batch_size`` is the normal case).
        exploration_type: ``RANDOM`` samples (training), ``DETERMINISTIC`` takes the argmax (validation).
        keep_steps: keep the per-decision ``"steps"`` (needed for training; validation needs only outcomes).
        record_videos: keep the full frame sequence of the first ``record_videos`` requests in ``stats.videos``.
        progress: show a progress bar (``True`` or its description).

    Returns:
        ``(trajectories, stats)``: ``trajectories`` has batch size ``[len(requests)]`` in request order with
        ``rollout_id``, ``group_id``, ``task_id``, ``init_state_id``, ``success``, ``truncated``, ``failed``,
        ``num_steps``, ``num_chunks``, ``initial_frame`` and, with ``keep_steps``, ``"steps"`` of batch size
        ``[len(requests), T]`` (``T`` = the longest episode in chunks) with the policy outputs, ``"mask"`` and
        ``("next", "frames" | "frames_mask" | "chunk_steps")``.
    """
    if not requests:
        raise ValueError("collect_rollouts needs at least one request")
    num_slots = env.batch_size[0]
    slots = [_Slot() for _ in range(num_slots)]
    pending = list(requests)
    video_ids = {r.rollout_id for r in requests[:record_videos]}
    finished: dict[int, TensorDict] = {}
    stats = RolloutStats()
    device = next((p.device for p in policy.parameters()), torch.device("cpu"))
    start = time.perf_counter()
    bar = tqdm(total=len(requests), desc=progress if isinstance(progress, str) else "rollout", disable=not progress, leave=False)

    def start_episodes(slot_ids: list[int]) -> None:
        t0 = time.perf_counter()
        chosen = {s: _pick_request(pending, slots[s].task_id) for s in slot_ids}
        reset = torch.zeros(num_slots, 1, dtype=torch.bool)
        fields = {k: torch.zeros(num_slots, 1, dtype=torch.long) for k in ("task_id", "init_state_id", "rollout_id", "group_id")}
        for s, request in chosen.items():
            reset[s] = True
            for name, value in fields.items():
                value[s] = getattr(request, name)
        td = env.reset(TensorDict({"_reset": reset, **fields}, batch_size=[num_slots]))
        _read_obs(td, list(chosen), slots)
        for s, request in chosen.items():
            slot = slots[s]
            slot.request, slot.task_id, slot.steps = request, request.task_id, []
            slot.initial_frame = slot.obs[("observation", "image")].clone()
            slot.video = [slot.initial_frame] if request.rollout_id in video_ids else None
        stats.reset_time += time.perf_counter() - t0

    start_episodes(list(range(min(num_slots, len(pending)))))
    with set_exploration_type(exploration_type), torch.no_grad():
        while any(slot.request is not None for slot in slots):
            active = [s for s, slot in enumerate(slots) if slot.request is not None]
            t0 = time.perf_counter()
            decision = policy(_policy_input(slots, active).to(device)).to("cpu")
            t1 = time.perf_counter()
            action = torch.zeros(num_slots, *decision["action"].shape[1:], dtype=torch.float32)
            action[active] = decision["action"].float()
            step_mask = torch.zeros(num_slots, dtype=torch.bool)
            step_mask[active] = True
            out = env.step(TensorDict({"action": action, "_step": step_mask}, batch_size=[num_slots]))
            nxt = out.get("next")
            stats.env_time += time.perf_counter() - t1
            stats.policy_time += t1 - t0
            _read_obs(nxt, active, slots)
            done = nxt.get("done").view(-1)
            chunk_steps = nxt.get("chunk_steps").view(-1)
            stats.decisions += len(active)
            stats.env_steps += int(chunk_steps[active].sum())
            ended = []
            for i, s in enumerate(active):
                slot = slots[s]
                if keep_steps:
                    record = decision[i].select(*(k for k in POLICY_KEYS if k in decision.keys()))
                    env_out = nxt[s].select(*NEXT_KEYS)
                    env_out.set("chunk_steps", env_out.get("chunk_steps").reshape(()))  # env's [1] -> per step
                    record.set("next", env_out)
                    slot.steps.append(record)
                else:
                    slot.steps.append(None)
                if slot.video is not None:
                    frames, mask = nxt.get("frames")[s], nxt.get("frames_mask")[s]
                    slot.video.extend(frames[mask])
                if done[s]:
                    finished[slot.request.rollout_id] = _trajectory(slot, nxt, s, keep_steps)
                    if slot.video is not None:
                        stats.videos[slot.request.rollout_id] = torch.stack(slot.video)
                    slot.request = None
                    ended.append(s)
                    bar.update(1)
            if ended and pending:
                start_episodes(ended[: len(pending)])
    bar.close()
    stats.trajectories = len(finished)
    stats.wall_time = time.perf_counter() - start
    rows = [finished[r.rollout_id] for r in requests]
    return _stack_trajectories(rows, keep_steps), stats


def _trajectory(slot: _Slot, nxt: TensorDictBase, s: int, keep_steps: bool) -> TensorDict:
    request = slot.request
    flag = lambda key: bool(nxt.get(key)[s].item()) if key in nxt.keys() else False  # noqa: E731
    row = TensorDict(
        {
            "rollout_id": torch.tensor(request.rollout_id),
            "group_id": torch.tensor(request.group_id),
            "task_id": torch.tensor(request.task_id),
            "init_state_id": torch.tensor(request.init_state_id),
            "success": torch.tensor(flag("success")),
            "truncated": torch.tensor(flag("truncated") and not flag("success")),
            "failed": torch.tensor(flag("worker_failed")),
            "num_steps": nxt.get("step_count")[s].reshape(()).clone(),
            "num_chunks": torch.tensor(len(slot.steps)),
            "initial_frame": slot.initial_frame,
        },
        batch_size=[],
    )
    if keep_steps:
        steps = torch.stack(slot.steps)
        steps.set("mask", torch.ones(len(slot.steps), dtype=torch.bool))
        row.set("steps", steps)
    return row


def _pad_steps(steps: TensorDictBase, length: int) -> TensorDictBase:
    missing = length - steps.batch_size[0]
    if missing == 0:
        return steps
    padding = steps[:1].apply(lambda x: x.new_zeros((missing, *x.shape[1:])), batch_size=[missing])
    return torch.cat([steps, padding])


def _stack_trajectories(rows: list[TensorDict], keep_steps: bool) -> TensorDict:
    if keep_steps:
        longest = max(row["steps"].batch_size[0] for row in rows)
        for row in rows:
            row.set("steps", _pad_steps(row.get("steps"), longest))
    return torch.stack(rows)
