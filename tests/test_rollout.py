"""The rollout slot scheduler on real LIBERO with a tiny OpenVLA-OFT: refilling, soft resets, ids, overlap.

One 2-slot libero_object env for the module (about 2 GB per slot). Episode lengths vary because chosen
rollouts are moved into their goal at a given step (``teleport_to_goal``): they succeed at the first
sub-step of that chunk. The env logs every round it runs, so the tests check the schedule itself.
At the end, on a one-slot Reacher env: group ids unique across ranks and rounds, and bad requests or overlap
modes refused with their names.
"""

import contextlib
import functools
import math
import multiprocessing
import os
import signal
import time

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType

from srpo_rl.envs import LiberoVecEnv
from srpo_rl.envs.gym_slots import GymSlotEnv
from srpo_rl.envs.workers import WORKER_NICENESS
from srpo_rl.examples.reacher_policy import make_reacher_env, reacher_success
from srpo_rl.models.openvla_oft import write_tiny_checkpoint
from srpo_rl.policy import LaunchedDecision, OpenVLAOFTPolicy
from srpo_rl.rollout import (POLICY_STREAM_PRIORITY, RolloutRequest, _ForwardClock, _PolicyThread, _Rollout,
                             _stack_trajectories, collect_rollouts, group_requests, single_cpu_thread)
from srpo_rl.token_policy import StateTokenPolicy

N = 2
CHUNK = 8
MAX_STEPS = 24  # 3 chunks


class ScheduledSuccessEnv(LiberoVecEnv):
    """A LiberoVecEnv that logs its rounds and ends chosen rollouts in success.

    ``success_chunk[rollout_id] = k`` moves that rollout's scene into its goal before its k-th chunk
    (1-based), so it succeeds at the first sub-step of that chunk: ``8 * (k - 1) + 1`` env steps.
    ``log`` holds ``("reset", {slot: (old_task, new_task, rollout_id)})`` and ``("step", slots)`` in
    call order (a ``step_send`` round logs its resets, then its steps).

    With ``hold_rebuilds``, a rebuild sent on its own (``reset_send`` to another task) is held back (its
    worker stopped) until the next step round has gone out: the order the tests check then does not rest on
    a rebuild taking longer than a chunk step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.success_chunk: dict[int, int] = {}
        self.log: list[tuple[str, object]] = []
        self.hold_rebuilds = False
        self._held = contextlib.ExitStack()  # the stopped workers, resumed when it closes

    def _log_resets(self, td) -> list[int]:
        """Logs the round's resets; returns the slots that load another task."""
        if td is None or "_reset" not in td.keys():
            return []
        slots = td["_reset"].reshape(-1).nonzero().flatten().tolist()
        if not slots:
            return []
        what = {s: (self.task_ids[s], int(td["task_id"][s]), int(td["rollout_id"][s])) for s in slots}
        self.log.append(("reset", what))
        return [s for s, (old, new, _) in what.items() if old != new]

    def _log_steps(self, td) -> None:
        mask = td["_step"] if "_step" in td.keys() else torch.ones(self.num_envs, dtype=torch.bool)
        slots = mask.reshape(-1).nonzero().flatten().tolist()
        if not slots:
            return
        self.log.append(("step", slots))
        due = []
        for s in slots:
            chunk = self.success_chunk.get(int(self._slots["rollout_id"][s]))
            if chunk is not None and int(self._slots["step_count"][s]) == CHUNK * (chunk - 1):
                due.append(s)
        if due:
            self.teleport_to_goal(due)

    def _reset(self, tensordict=None, **kwargs):
        self._log_resets(tensordict)
        return super()._reset(tensordict, **kwargs)

    def _step(self, tensordict):
        self._log_steps(tensordict)
        return super()._step(tensordict)

    def step_send(self, tensordict):
        self._log_resets(tensordict)
        self._log_steps(tensordict)
        try:
            super().step_send(tensordict)
        finally:  # a held rebuild goes on once the next step round is out (or failed)
            self.release_rebuilds()

    def reset_send(self, tensordict):
        rebuilds = self._log_resets(tensordict)
        for slot in rebuilds if self.hold_rebuilds else ():
            self._held.enter_context(stopped(self.worker_pids[slot]))
        super().reset_send(tensordict)

    def release_rebuilds(self) -> None:
        self._held.close()

    def discard_pending(self):
        # a rollout that raises collects the steps in flight first: a held rebuild would never answer
        self.release_rebuilds()
        return super().discard_pending()


@contextlib.contextmanager
def stopped(pid: int):
    """Stops process ``pid`` (SIGSTOP) for the block: what its worker was sent waits until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile (a restart): the test's own error stands
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def env():
    env = ScheduledSuccessEnv("libero_object", N, max_steps=MAX_STEPS, task_ids=[0, 1], step_timeout=120)
    yield env
    env.close()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_openvla_oft")
    write_tiny_checkpoint(path)
    # float64: the argmax must not depend on the batch a step ran in (1 or 2 slots)
    return OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_object", dtype=torch.float64)


def _requests() -> list[RolloutRequest]:
    # 3 groups x 2 rollouts: ids 20, 21 (task 1), 22, 23 (task 0), 24, 25 (task 1)
    return group_requests([(1, 4), (0, 7), (1, 2)], rollouts_per_group=2, first_group_id=10)


SCHEDULE = {20: 1, 21: 2, 23: 3, 24: 1, 25: 2}  # rollout id -> chunk of success; 22 runs to max_steps


def _expected_steps(rollout_id: int) -> int:
    chunk = SCHEDULE.get(rollout_id)
    return MAX_STEPS if chunk is None else CHUNK * (chunk - 1) + 1


@pytest.fixture(scope="module")
def runs(env, policy):
    """Every mode on the same requests, greedy: ``{overlap: (trajectories, stats, env log, finished rows)}``.

    ``finished`` holds what ``on_finished`` received: ``(rounds logged so far, trajectory row)``.
    """
    out = {}
    for overlap in (False, True, "halves"):
        env.success_chunk, env.log, finished = dict(SCHEDULE), [], []
        trajs, stats = collect_rollouts(
            env, policy, _requests(), overlap=overlap, exploration_type=ExplorationType.DETERMINISTIC,
            on_finished=lambda row: finished.append((len(env.log), row)),
        )
        out[overlap] = (trajs, stats, env.log, finished)
    return out


def _check_schedule(log, requests, trajs) -> None:
    """No idle stepping, refills at once, same-task preference, ids as requested."""
    by_id = {r.rollout_id: r for r in requests}
    running: dict[int, int] = {}  # slot -> rollout id
    chunks_left = {r.rollout_id: math.ceil(_expected_steps(r.rollout_id) / CHUNK) for r in requests}
    started: list[int] = []
    for kind, what in log:
        if kind == "reset":
            for slot, (old_task, new_task, rollout_id) in what.items():
                assert slot not in running, f"slot {slot} reset while rollout {running.get(slot)} was running"
                request = by_id[rollout_id]
                assert new_task == request.task_id
                pending = [r for r in requests if r.rollout_id not in started and r.rollout_id != rollout_id]
                if new_task != old_task:  # a rebuild only when no request of the loaded task was pending
                    assert all(r.task_id != old_task for r in pending), (slot, old_task, rollout_id)
                running[slot] = rollout_id
                started.append(rollout_id)
        else:
            assert set(what) <= set(running), f"stepped slots {what} without a running rollout"
            for slot in what:
                chunks_left[running[slot]] -= 1
                if chunks_left[running[slot]] == 0:
                    del running[slot]
    assert not running and all(v == 0 for v in chunks_left.values())
    assert sorted(started) == sorted(by_id)  # every request ran exactly once
    # every env step executed belongs to a rollout: the steps stepped = the chunks recorded
    stepped = sum(len(what) for kind, what in log if kind == "step")
    assert stepped == int(trajs["num_chunks"].sum())

    # the batch is in request order with the requested ids and the scheduled outcomes
    assert trajs["rollout_id"].tolist() == [r.rollout_id for r in requests]
    assert trajs["group_id"].tolist() == [r.group_id for r in requests]
    assert trajs["task_id"].tolist() == [r.task_id for r in requests]
    assert trajs["init_state_id"].tolist() == [r.init_state_id for r in requests]
    assert trajs["num_steps"].tolist() == [_expected_steps(r.rollout_id) for r in requests]
    assert trajs["success"].tolist() == [r.rollout_id in SCHEDULE for r in requests]
    assert trajs["truncated"].tolist() == [r.rollout_id not in SCHEDULE for r in requests]
    assert not trajs["failed"].any()
    num_chunks = [math.ceil(_expected_steps(r.rollout_id) / CHUNK) for r in requests]
    assert trajs["num_chunks"].tolist() == num_chunks
    assert trajs["steps", "mask"].sum(-1).tolist() == num_chunks
    executed = (trajs["steps", "next", "chunk_steps"] * trajs["steps", "mask"]).sum(-1)
    assert executed.tolist() == trajs["num_steps"].tolist()


def _last_chunk_entries(log) -> dict[int, int]:
    """Rollout id -> how many log entries there were once its last chunk was sent."""
    running, chunks_left, ended_at = {}, {}, {}
    for position, (kind, what) in enumerate(log, start=1):
        if kind == "reset":
            for slot, (_, _, rollout_id) in what.items():
                running[slot] = rollout_id
                chunks_left[rollout_id] = math.ceil(_expected_steps(rollout_id) / CHUNK)
            continue
        for slot in what:
            rollout_id = running[slot]
            chunks_left[rollout_id] -= 1
            if chunks_left[rollout_id] == 0:
                ended_at[rollout_id] = position
    return ended_at


def _rebuilds(log) -> int:
    return sum(old != new for kind, what in log if kind == "reset" for old, new, _ in what.values())


def test_slots_refill_at_once_and_keep_their_task(runs):
    trajs, stats, log, _ = runs[False]
    _check_schedule(log, _requests(), trajs)
    # by hand: slot 0 has task 0 loaded and slot 1 task 1, so each starts on the oldest request of its
    # task (22 and 20); a finished slot takes the oldest pending request of its task in the very next
    # round, resetting while the other slot steps (a reset holds up no other slot)
    assert log == [
        ("reset", {0: (0, 0, 22), 1: (1, 1, 20)}),
        ("step", [0, 1]),  # 20 succeeds in its first chunk
        ("reset", {1: (1, 1, 21)}), ("step", [0]),
        ("step", [0, 1]),  # 22 truncated after 3 chunks
        ("reset", {0: (0, 0, 23)}), ("step", [1]),  # 21 succeeds in its second chunk
        ("reset", {1: (1, 1, 24)}), ("step", [0]),
        ("step", [0, 1]),  # 24 succeeds in its first chunk
        ("reset", {1: (1, 1, 25)}), ("step", [0]),  # 23 succeeds in its third chunk; nothing left for slot 0
        ("step", [1]),
        ("step", [1]),  # 25 succeeds in its second chunk
    ]
    assert _rebuilds(log) == 0  # every reset was soft
    assert stats.trajectories == 6 and stats.env_steps == int(trajs["num_steps"].sum())
    assert stats.decisions == int(trajs["num_chunks"].sum())


@pytest.mark.parametrize("overlap", [True, "halves"])
def test_overlap_keeps_the_schedule_rules(runs, overlap):
    trajs, stats, log, _ = runs[overlap]
    _check_schedule(log, _requests(), trajs)
    assert _rebuilds(log) == 0
    steps = [what for kind, what in log if kind == "step"]
    if overlap == "halves":  # the halves alternate: each round steps one slot (the other half is in flight)
        assert all(len(what) == 1 for what in steps)
    assert stats.env_steps == int(trajs["num_steps"].sum())


@pytest.mark.parametrize("overlap", [False, True, "halves"])
def test_the_cpu_time_of_loop_and_policy_is_counted_apart(runs, overlap):
    _, stats, _, _ = runs[overlap]
    # a thread's CPU time cannot exceed the wall time it ran for; both threads did some work
    assert 0 < stats.policy_cpu_time <= stats.policy_time + 1e-3
    same_thread = overlap is not True  # only the pool runs the policy on a thread of its own
    assert 0 < stats.loop_cpu_time <= stats.wall_time - stats.policy_cpu_time * same_thread + 1e-3


@pytest.mark.parametrize("overlap", [False, True])
def test_the_forwards_gpu_time_adds_up_what_each_decision_reports(env, policy, monkeypatch, runs, overlap):
    assert runs[overlap][1].policy_gpu_time == 0.0  # on the CPU a decision has no CUDA events: nothing reported
    # what a decision's CUDA events would say (the GPU test below reads real ones): 5 ms each
    monkeypatch.setattr(LaunchedDecision, "gpu_ms", lambda self: 5.0)
    env.success_chunk, env.log = dict(SCHEDULE), []
    _, stats = collect_rollouts(env, policy, _requests(), overlap=overlap, exploration_type=ExplorationType.DETERMINISTIC)
    assert stats.policy_calls > 0
    assert stats.policy_gpu_time == pytest.approx(0.005 * stats.policy_calls)
    assert stats.as_dict()["time_policy_gpu"] == stats.policy_gpu_time


@pytest.mark.parametrize("overlap", [True, "halves"])
def test_overlap_gives_the_same_trajectories(runs, overlap):
    plain, overlapped = runs[False][0], runs[overlap][0]
    assert plain.batch_size == overlapped.batch_size
    for key in ("rollout_id", "group_id", "task_id", "init_state_id", "success", "num_steps", "num_chunks"):
        assert torch.equal(plain[key], overlapped[key]), key
    assert torch.equal(plain["initial_frame"], overlapped["initial_frame"])
    mask = plain["steps", "mask"]
    assert torch.equal(mask, overlapped["steps", "mask"])
    for key in ("action_tokens", "action", "policy_image", ("next", "frames"), ("next", "chunk_steps")):
        assert torch.equal(plain["steps", key][mask], overlapped["steps", key][mask]), key


def test_jpeg_in_the_workers_gives_the_same_rollouts(runs, policy, monkeypatch):
    env = ScheduledSuccessEnv("libero_object", N, max_steps=MAX_STEPS, task_ids=[0, 1], step_timeout=120,
                              jpeg_quality=95)
    try:
        env.success_chunk, env.log = dict(SCHEDULE), []
        monkeypatch.setattr(policy, "jpeg_quality", None)  # the workers did the round trip
        trajs, _ = collect_rollouts(env, policy, _requests(), exploration_type=ExplorationType.DETERMINISTIC)
    finally:
        env.close()
    plain = runs[False][0]
    mask = plain["steps", "mask"]
    assert torch.equal(mask, trajs["steps", "mask"])
    for key in ("policy_image", "action_tokens", "action", ("next", "frames")):
        assert torch.equal(plain["steps", key][mask], trajs["steps", key][mask]), key
    assert torch.equal(plain["success"], trajs["success"])
    # the reward video's first frame is the render, not the policy's JPEG-decoded first observation
    assert torch.equal(trajs["initial_frame"], plain["initial_frame"])


@pytest.mark.parametrize("overlap", [False, True, "halves"])
def test_each_trajectory_is_handed_over_when_it_ends(runs, overlap):
    trajs, _, log, finished = runs[overlap]
    assert sorted(int(row["rollout_id"]) for _, row in finished) == sorted(trajs["rollout_id"].tolist())
    index = {rid: i for i, rid in enumerate(trajs["rollout_id"].tolist())}
    ended_at = _last_chunk_entries(log)
    for rounds, row in finished:
        rollout_id = int(row["rollout_id"])
        expected = trajs[index[rollout_id]]
        assert int(row["num_steps"]) == int(expected["num_steps"])
        assert torch.equal(row["steps", "action_tokens"], expected["steps", "action_tokens"][: int(row["num_chunks"])])
        # handed over once its last chunk ran, at once: at most one other group's round (a reset entry and a
        # step entry) and one rebuild sent in between
        assert ended_at[rollout_id] <= rounds <= ended_at[rollout_id] + 3, (rollout_id, rounds, ended_at)
    first_rounds = finished[0][0]
    assert first_rounds < len(log)  # the first trajectory came out while others still had rounds to run


def test_a_rollout_whose_worker_is_killed_starts_over_and_none_is_lost(env, policy, caplog):
    # when the first trajectory ends, the other slot's simulation process is killed mid-episode: its rollout
    # starts over on the restarted worker and ends as scheduled; the batch is whole, nothing marked failed
    killed = []

    def kill_the_other_running_slot(row):
        if killed:
            return
        ids = env._slots["rollout_id"].reshape(-1).tolist()
        other = 1 - ids.index(int(row["rollout_id"]))
        if not bool(env._slots["done"][other]):
            killed.append(ids[other])
            os.kill(env.worker_pids[other], signal.SIGKILL)

    env.success_chunk, env.log = dict(SCHEDULE), []
    trajs, stats = collect_rollouts(env, policy, _requests(), overlap=True,
                                    exploration_type=ExplorationType.DETERMINISTIC,
                                    on_finished=kill_the_other_running_slot)
    assert len(killed) == 1 and stats.restarts == 1
    assert f"rollout {killed[0]} crashed its env; it starts over" in caplog.text
    requests = _requests()
    assert trajs["rollout_id"].tolist() == [r.rollout_id for r in requests]
    assert not trajs["failed"].any()
    assert trajs["num_steps"].tolist() == [_expected_steps(r.rollout_id) for r in requests]
    assert trajs["success"].tolist() == [r.rollout_id in SCHEDULE for r in requests]
    executed = (trajs["steps", "next", "chunk_steps"] * trajs["steps", "mask"]).sum(-1)
    assert executed.tolist() == trajs["num_steps"].tolist()  # the restarted rollout holds its new episode only


@pytest.mark.parametrize("overlap", [False, True])
def test_a_task_change_rebuilds_while_the_other_slots_step(env, policy, overlap):
    n = env.num_envs
    ids = {k: torch.tensor([[-1], [-1]]) for k in ("rollout_id", "group_id")}
    env.reset(TensorDict({"_reset": torch.ones(n, 1, dtype=torch.bool), "task_id": torch.tensor([[0], [1]]),
                          "init_state_id": torch.tensor([[0], [0]]), **ids}, [n]))
    # slot 0 (task 0) runs a one-chunk episode, then must load task 2; slot 1 (task 1) runs 3 chunks
    requests = group_requests([(0, 3), (1, 5), (2, 6)], rollouts_per_group=1, first_group_id=40)
    ids = [r.rollout_id for r in requests]
    env.success_chunk, env.log, env.hold_rebuilds = {ids[0]: 1, ids[2]: 1}, [], True
    try:
        trajs, stats = collect_rollouts(env, policy, requests, overlap=overlap,
                                        exploration_type=ExplorationType.DETERMINISTIC)
    finally:
        env.hold_rebuilds = False
        env.release_rebuilds()
    log = env.log
    rebuild = next(i for i, (kind, what) in enumerate(log)
                   if kind == "reset" and any(old != new for old, new, _ in what.values()))
    assert log[rebuild] == ("reset", {0: (0, 2, ids[2])})
    # the rebuild went out on its own: slot 1 stepped before slot 0 was back, and slot 0 then ran its episode
    assert log[rebuild + 1] == ("step", [1])
    assert ("step", [0]) in log[rebuild + 1:] or ("step", [0, 1]) in log[rebuild + 1:]
    assert trajs["rollout_id"].tolist() == ids and trajs["task_id"].tolist() == [0, 1, 2]
    assert trajs["num_steps"].tolist() == [1, MAX_STEPS, 1]
    assert trajs["success"].tolist() == [True, False, True]
    assert env.task_ids == [2, 1] and env.pending_resets == []
    assert stats.trajectories == 3 and stats.env_steps == MAX_STEPS + 2


@pytest.mark.parametrize("overlap", [False, True])
def test_a_task_above_its_share_of_slots_gives_one_away_at_once(env, policy, overlap):
    n = env.num_envs
    ids = {k: torch.tensor([[-1], [-1]]) for k in ("rollout_id", "group_id")}
    env.reset(TensorDict({"_reset": torch.ones(n, 1, dtype=torch.bool), "task_id": torch.tensor([[0], [0]]),
                          "init_state_id": torch.tensor([[0], [1]]), **ids}, [n]))
    # both slots hold task 0; two rollouts of task 0 and two of task 2 are pending: a share of one slot each.
    # Taking the oldest requests of the loaded task would run both task-0 rollouts first, then rebuild
    # both slots for task 2; one slot moving to task 2 at the start needs one rebuild.
    requests = group_requests([(0, 3), (2, 6)], rollouts_per_group=2, first_group_id=60)
    ids = [r.rollout_id for r in requests]  # 120, 121 of task 0; 122, 123 of task 2
    env.success_chunk, env.log = dict.fromkeys(ids, 1), []
    trajs, _ = collect_rollouts(env, policy, requests, overlap=overlap,
                                exploration_type=ExplorationType.DETERMINISTIC)
    resets = [what for kind, what in env.log if kind == "reset"]
    assert resets[0] == {0: (0, 2, 122)}  # the move went out first, on its own, while task 0 had requests
    # slot 1 kept task 0 for both of its rollouts (123 then ran on whichever slot was free first: slot 1
    # when its two short episodes end before slot 0's rebuild does, as on a slow CPU)
    assert [r for what in resets for s, (_, _, r) in what.items() if s == 1][:2] == [120, 121]
    assert resets[1] == {1: (0, 0, 120)}
    assert trajs["rollout_id"].tolist() == ids and trajs["task_id"].tolist() == [0, 0, 2, 2]
    assert trajs["success"].all() and env.task_ids[0] == 2 and env.pending_resets == []


def test_async_steps_come_back_in_send_order(env):
    n = env.num_envs
    ids = {k: torch.tensor([[5], [6]]) for k in ("rollout_id", "group_id")}
    reset = TensorDict({"_reset": torch.ones(n, 1, dtype=torch.bool), "task_id": torch.tensor([[1], [1]]),
                        "init_state_id": torch.tensor([[0], [1]]), **ids}, [n])
    env.reset(reset)
    first, second = torch.tensor([True, False]), torch.tensor([False, True])
    action = torch.zeros(n, CHUNK, 7)
    env.step_send(TensorDict({"action": action, "_step": first}, [n]))
    with pytest.raises(RuntimeError, match=r"slots \[0\] have a step in flight"):
        env.step_send(TensorDict({"action": action, "_step": first}, [n]))
    env.step_send(TensorDict({"action": action, "_step": second}, [n]))
    assert env.pending_steps == 2
    out = env.step_recv()
    assert out["chunk_steps"].flatten().tolist() == [CHUNK, 0]
    assert out["step_count"][0].item() == CHUNK and out["frames_mask"].flatten().tolist() == [True, False]
    # slot 0 resets in the next round while slot 1 is still in flight
    again = reset.clone()
    again["_reset"] = first.unsqueeze(-1)
    again["init_state_id"] = torch.tensor([[9], [1]])
    again["rollout_id"] = torch.tensor([[7], [6]])
    env.step_send(TensorDict({**again, "_step": torch.zeros(n, dtype=torch.bool)}, [n]))
    out = env.step_recv()
    assert out["chunk_steps"].flatten().tolist() == [0, CHUNK] and out["step_count"][1].item() == CHUNK
    out = env.step_recv()
    assert out["rollout_id"].flatten().tolist() == [7, 6] and out["init_state_id"][0].item() == 9
    assert out["step_count"].flatten().tolist() == [0, CHUNK] and not out["done"].any()
    with pytest.raises(RuntimeError, match="without a pending step_send"):
        env.step_recv()
    both = again.clone()
    both["action"], both["_step"] = action, first
    with pytest.raises(ValueError, match=r"slots \[0\] are in both '_step' and '_reset'"):
        env.step_send(both)
    assert env.worker_time["step_chunk"] > 0 and env.worker_time["reset"] > 0


def test_ready_slots_come_back_without_waiting_for_a_slower_one(env):
    n = env.num_envs
    ids = {k: torch.tensor([[5], [6]]) for k in ("rollout_id", "group_id")}
    env.reset(TensorDict({"_reset": torch.ones(n, 1, dtype=torch.bool), "task_id": torch.tensor([[1], [1]]),
                          "init_state_id": torch.tensor([[0], [1]]), **ids}, [n]))
    action = torch.zeros(n, CHUNK, 7)
    # one round: slot 0 loads another task (a rebuild, seconds), slot 1 steps one chunk; slot 0's worker is
    # held stopped until slot 1 is back, so the rebuild is still running whatever the machine's speed
    with stopped(env.worker_pids[0]):
        env.step_send(TensorDict({"action": action, "_step": torch.tensor([False, True]),
                                  "_reset": torch.tensor([[True], [False]]), "task_id": torch.tensor([[4], [1]]),
                                  "init_state_id": torch.tensor([[2], [1]]), **ids}, [n]))
        out = env.step_recv_ready(timeout=None)
        assert out["_ready"].flatten().tolist() == [False, True]  # slot 1 is back; slot 0 is still rebuilding
        assert out["chunk_steps"].flatten().tolist() == [0, CHUNK] and out["step_count"][1].item() == CHUNK
        assert env.step_recv_ready(timeout=0.0) is None
        # another thread's signal ends the wait (no timeout) with slot 0 still rebuilding
        woken, waker = multiprocessing.Pipe(duplex=False)
        waker.send_bytes(b"")
        assert env.step_recv_ready(timeout=None, wake=(woken,)) is None and env.pending_steps == 1
        woken.recv_bytes()
    # slot 1 goes on at once, in a round of its own
    env.step_send(TensorDict({"action": action, "_step": torch.tensor([False, True])}, [n]))
    got = {}
    while len(got) < 2:  # both slots, in whatever order they finish
        out = env.step_recv_ready(timeout=None)
        for s in out["_ready"].flatten().nonzero().flatten().tolist():
            got[s] = (int(out["step_count"][s]), int(out["task_id"][s]), int(out["init_state_id"][s]))
    assert got == {0: (0, 4, 2), 1: (2 * CHUNK, 1, 1)} and env.task_ids == [4, 1]
    assert env.pending_steps == 0
    with pytest.raises(RuntimeError, match="without a pending step_send"):
        env.step_recv_ready()


def test_a_reset_sent_on_its_own_is_collected_later(env):
    n = env.num_envs
    ids = {k: torch.tensor([[5], [6]]) for k in ("rollout_id", "group_id")}
    env.reset(TensorDict({"_reset": torch.ones(n, 1, dtype=torch.bool), "task_id": torch.tensor([[1], [1]]),
                          "init_state_id": torch.tensor([[0], [1]]), **ids}, [n]))
    # slot 0 loads another task (its worker held stopped meanwhile); slot 1 steps meanwhile
    with stopped(env.worker_pids[0]):
        env.reset_send(TensorDict({"_reset": torch.tensor([[True], [False]]), "task_id": torch.tensor([[3], [1]]),
                                   "init_state_id": torch.tensor([[4], [1]]), **ids}, [n]))
        assert env.pending_resets == [0]
        assert env.reset_recv(timeout=0.0) is None
        action = torch.zeros(n, CHUNK, 7)
        with pytest.raises(RuntimeError, match=r"slots \[0\] have a reset in flight"):
            env.step_send(TensorDict({"action": action, "_step": torch.tensor([True, False])}, [n]))
        env.step_send(TensorDict({"action": action, "_step": torch.tensor([False, True])}, [n]))
        assert env.step_recv()["chunk_steps"].flatten().tolist() == [0, CHUNK]
    out = env.reset_recv(timeout=None)
    assert out["_reset"].flatten().tolist() == [True, False]
    assert out["task_id"].flatten().tolist() == [3, 1] and out["init_state_id"][0].item() == 4
    assert out["step_count"].flatten().tolist() == [0, CHUNK] and env.task_ids == [3, 1]
    assert env.pending_resets == []
    with pytest.raises(RuntimeError, match="without a pending reset_send"):
        env.reset_recv()


@pytest.mark.parametrize("method", ["launch", "finish", "forward"])
def test_a_policy_error_in_the_pool_reaches_the_caller(policy, monkeypatch, method):
    # the pool's policy runs on a thread that signals the loop through a pipe: its error must come out, not
    # leave the loop asleep, whether it is raised launching a decision, finishing one, or in a policy called
    # whole (one without launch / finish)
    calls = []
    inner = getattr(policy, method)

    def failing_second_call(arg):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("policy failed on call 2")
        return inner(arg)

    monkeypatch.setattr(policy, method, failing_second_call)
    if method == "forward":
        monkeypatch.setattr(policy, "launch", None)
    env = LiberoVecEnv("libero_object", 2, max_steps=4 * CHUNK, task_ids=[1, 1])
    try:
        with pytest.raises(RuntimeError, match="policy failed on call 2"):
            collect_rollouts(env, policy, group_requests([(1, 0)], rollouts_per_group=2), overlap=True)
        assert calls == [0, 1]
        # the steps and resets the failed rollout left in flight are collected: the env takes the next rollout
        assert env.pending_steps == 0 and env.pending_resets == []
        monkeypatch.undo()
        trajectories, _ = collect_rollouts(env, policy, group_requests([(1, 0)], rollouts_per_group=2), overlap=True)
        assert trajectories["num_steps"].tolist() == [4 * CHUNK] * 2
    finally:
        env.close()


def test_overlap_needs_an_async_env(policy):
    class NoAsync:
        batch_size = torch.Size([1])

    with pytest.raises(ValueError, match="overlap=True needs an env with step_send/step_recv.*NoAsync"):
        collect_rollouts(NoAsync(), policy, _requests(), overlap=True)


def test_simulation_workers_yield_the_cpu_to_the_policy_process(env):
    # the process that drives the policy must win the cores the simulations fill (see WORKER_NICENESS)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    expected = min(19, mine + WORKER_NICENESS)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in env.worker_pids] == [expected] * N


def test_one_cpu_thread_inside_single_cpu_thread_and_restored_after():
    # why collect_rollouts keeps torch to one thread when the policy is on an accelerator: after each op the idle
    # OpenMP threads spin, so ops a few ms apart keep them busy on the simulation's cores (what that costs:
    # benchmarks/openmp_spin.py)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_cpu_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        with pytest.raises(RuntimeError), single_cpu_thread():
            raise RuntimeError("an error inside")
        assert torch.get_num_threads() == 2  # restored on an error too
        with single_cpu_thread(enabled=False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _Timed:
    """A launched decision that reports its GPU time, as srpo_rl.policy.LaunchedDecision does."""

    def __init__(self, ms: float):
        self.ms = ms

    def gpu_ms(self) -> float:
        return self.ms


class _FakeTime:
    """A clock for _ForwardClock: ``sleep`` records each sleep and moves the time on by it."""

    def __init__(self, start: float = 100.0):
        self.t, self.sleeps = start, []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def test_the_forward_clock_predicts_when_a_batch_is_due():
    fake = _FakeTime()
    clock = _ForwardClock(now=fake.now, sleep=fake.sleep)
    assert clock.due(8, launched_at=fake.t) is None  # nothing measured yet: launch at once
    clock.finished(_Timed(5000.0), rows=8)  # a size's first forward (compiling, capturing a graph): not trusted
    assert clock.due(8, launched_at=fake.t) is None
    clock.finished(_Timed(80.0), rows=8)  # done now, at t = 100: the GPU is free from here
    later = fake.t + 1.0
    # a batch launched after the GPU was free starts at its launch; one launched before starts when it frees
    assert clock.due(8, launched_at=later) == pytest.approx(later + 0.080, abs=1e-9)
    assert clock.due(8, launched_at=0.0) == pytest.approx(100.0 + 0.080, abs=1e-9)
    assert clock.due(4, launched_at=later) == pytest.approx(later + 4 * 0.010, abs=1e-9)  # 10 ms a row
    clock.finished(_Timed(100.0), rows=8)  # running averages, the newest weighted 0.2
    assert clock.due(8, launched_at=later) == pytest.approx(later + 0.080 + 0.2 * (0.100 - 0.080), abs=1e-9)
    assert clock.due(2, launched_at=later) == pytest.approx(later + 2 * (0.010 + 0.2 * (0.0125 - 0.010)), abs=1e-9)
    # it wakes the launch thread this long before the batch in flight is due: the launch's time + 1 ms
    clock.launched(0.004)
    clock.sleep_until_launch(fake.t + 0.060)
    assert fake.sleeps == [pytest.approx(0.060 - 0.004 - 0.001, abs=1e-9)]
    clock.sleep_until_launch(fake.t - 1.0)  # due already: no sleep
    assert len(fake.sleeps) == 1
    clock.finished(object(), rows=8)  # a decision that reports no GPU time changes no estimate
    assert clock.due(8, launched_at=later) == pytest.approx(later + 0.084, abs=1e-9)


def test_the_forward_clock_counts_a_slow_measurement_at_most_twice_the_estimate():
    # the events around a forward also count the host's time: a CUDA graph captured for a new prompt width
    # reads 900 ms where the forward takes 50
    clock = _ForwardClock()
    clock.finished(_Timed(20_000.0), rows=1)  # the first batch: compiled
    clock.finished(_Timed(6_000.0), rows=5)  # the first of 5 rows: recompiled with dynamic shapes
    assert clock.due(5, launched_at=1.0) is None and clock.due(1, launched_at=1.0) is None
    clock.finished(_Timed(50.0), rows=5)
    assert clock.due(5, launched_at=1e6) == pytest.approx(1e6 + 0.050, abs=1e-6)
    clock.finished(_Timed(900.0), rows=5)  # counted as 100 ms
    assert clock.due(5, launched_at=1e6) == pytest.approx(1e6 + 0.050 + 0.2 * (0.100 - 0.050), abs=1e-6)
    assert clock.due(1, launched_at=1e6) == pytest.approx(1e6 + 0.010 + 0.2 * (0.020 - 0.010), abs=1e-6)


def test_the_launch_thread_wakes_once_the_decision_in_flight_is_done():
    fake = _FakeTime()
    clock = _ForwardClock(now=fake.now, sleep=fake.sleep)

    class DoneAt:  # a decision in flight whose GPU work is done at ``at`` on the fake clock
        def __init__(self, at: float):
            self.at = at

        def is_done(self) -> bool:
            return fake.t >= self.at

    start = fake.t
    clock.sleep_until_launch(start + 5.0, DoneAt(start + 0.05))  # the estimate says 5 s, the GPU takes 50 ms
    assert 0.05 <= fake.t - start < 0.05 + clock._POLL_S  # polled every 2 ms, woke at the first poll after
    assert max(fake.sleeps) == pytest.approx(clock._POLL_S)
    fake.sleeps.clear()
    clock.sleep_until_launch(fake.t + 0.05)  # nothing to check: it sleeps to the estimate, less the margin
    assert fake.sleeps == [pytest.approx(0.05 - clock._MARGIN_S)]


def test_slow_first_forwards_do_not_stall_the_policy_thread():
    # A fake GPU runs the decisions one after another, 10 ms each; the first decision of each batch size
    # reports 3 s of GPU time, as a compiled model's first forward of a shape does (its events span the
    # compilation). Trusting those figures, the thread slept about 3 s behind the next batch of that size.
    gpu = {"free_at": 0.0, "sizes": set()}

    class Decision:
        def __init__(self, rows: int):
            self.rows = rows
            self.done_at = gpu["free_at"] = max(gpu["free_at"], time.perf_counter()) + 0.010
            self.first = rows not in gpu["sizes"]
            gpu["sizes"].add(rows)

        def is_done(self) -> bool:
            return time.perf_counter() >= self.done_at

        def wait(self) -> None:
            time.sleep(max(0.0, self.done_at - time.perf_counter()))

        def gpu_ms(self) -> float:
            return 3000.0 if self.first else 10.0

    observation = {"observation": torch.zeros(2), "instruction": "pick"}
    clock = _ForwardClock()
    with _PolicyThread(lambda td: Decision(td.batch_size[0]), lambda decision: decision.rows, clock) as thread:
        for _ in range(15):
            for slot in range(3):
                thread.submit(slot, observation)
            answered = 0
            while answered < 3:
                thread.wait()
                slots, _ = thread.pop()
                answered += len(slots)
    # every batch size's first 3 s reading was dropped: each estimate is the 10 ms a decision takes (one trusted
    # 3 s figure would have left 0.6 s or more in the running average, and the thread asleep behind it)
    assert clock._by_rows and all(v == pytest.approx(0.010) for v in clock._by_rows.values()), clock._by_rows
    assert clock._seen_rows == gpu["sizes"]


@pytest.mark.parametrize("overlap", [False, True])
def test_step_records_hold_only_their_own_slot(env, policy, monkeypatch, overlap):
    # a step record that viewed one row of the env's [num_slots, ...] result would keep every slot's frames
    # of that result alive until its episode ended (gigabytes at 32 slots over a rollout)
    held = []
    record = _Rollout.record

    def checked_record(self, active, nxt):
        ended = record(self, active, nxt)
        for s in active:
            tensors = [self.slots[s].steps[-1]["next", key] for key in ("frames", "frames_mask")]
            tensors += [value for value in self.slots[s].obs.values() if isinstance(value, torch.Tensor)]
            held.extend((t.untyped_storage().nbytes(), t.numel() * t.element_size()) for t in tensors)
        return ended

    monkeypatch.setattr(_Rollout, "record", checked_record)
    collect_rollouts(env, policy, _requests(), overlap=overlap, exploration_type=ExplorationType.DETERMINISTIC)
    assert held and all(storage == own for storage, own in held), held[:4]


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_the_policy_runs_on_a_stream_above_the_default_priority(env, tmp_path, monkeypatch, overlap):
    # so that the reward's background embedder, on an ordinary stream, fills the GPU around the forwards
    write_tiny_checkpoint(tmp_path)
    policy = OpenVLAOFTPolicy.from_pretrained(tmp_path, unnorm_key="libero_object", dtype=torch.float32,
                                              device="cuda")
    seen, launch = [], policy.launch

    def recording_launch(td):
        seen.append(torch.cuda.current_stream())
        return launch(td)

    monkeypatch.setattr(policy, "launch", recording_launch)
    env.success_chunk, env.log = dict(SCHEDULE), []
    trajs, stats = collect_rollouts(env, policy, _requests(), overlap=overlap)
    assert len(seen) == stats.policy_calls > 0 and len(set(seen)) == 1  # one stream for every call
    assert seen[0].priority < torch.cuda.default_stream().priority == torch.cuda.Stream().priority
    assert 0 < stats.policy_gpu_time < stats.wall_time  # the forwards' CUDA events, inside the rollout's time
    assert [int(n) for n in trajs["num_steps"]] == [_expected_steps(r) for r in trajs["rollout_id"].tolist()]
    assert POLICY_STREAM_PRIORITY < 0


def _row(rollout_id: int, length: int) -> TensorDict:
    g = torch.Generator().manual_seed(rollout_id)
    steps = TensorDict({
        "policy_image": torch.randint(1, 256, (length, 3, 8, 8), dtype=torch.uint8, generator=g),
        "action_log_prob": torch.rand(length, 8, 7, generator=g) - 2,
        "next": TensorDict({"chunk_steps": torch.full((length,), 8), "done": torch.ones(length, 1, dtype=torch.bool)},
                           batch_size=[length]),
        "mask": torch.ones(length, dtype=torch.bool),
    }, batch_size=[length])
    return TensorDict({"rollout_id": torch.tensor(rollout_id), "num_chunks": torch.tensor(length), "steps": steps},
                      batch_size=[])


def test_trajectories_stack_zero_padded_to_the_longest():
    rows = [_row(0, 3), _row(1, 5), _row(2, 1)]
    before = [row.clone() for row in rows]
    stacked = _stack_trajectories(rows, keep_steps=True)
    assert stacked.batch_size == (3,) and stacked["steps"].batch_size == (3, 5)
    assert stacked["rollout_id"].tolist() == [0, 1, 2] and stacked["num_chunks"].tolist() == [3, 5, 1]
    for i, row in enumerate(rows):
        n = row["num_chunks"].item()
        for key in row["steps"].keys(include_nested=True, leaves_only=True):
            value, out = row["steps", key], stacked["steps", key][i]
            assert torch.equal(out[:n], value)  # the executed steps as recorded
            assert not out[n:].any()  # zeros beyond them: mask False, nothing executed
        assert (row == before[i]).all()  # the rows handed to on_finished are left as they were
    assert stacked["steps", "mask"].sum(-1).tolist() == [3, 5, 1]


def test_evaluate_counts_each_tasks_successes_over_the_ranks_shares(env, policy):
    from srpo_rl.evaluation import evaluate

    names = {0: "task zero", 1: "task one"}
    rows = [{"suite": "libero_object", "task_id": t, "trial_id": i, "task_name": names[t]}
            for t, i in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]]
    succeed_at = {(0, 1): 1, (1, 0): 2, (1, 2): 1}  # (task, init state) -> chunk of success; the others time out
    results = []
    for rank, world_size in [(0, 1), (0, 2), (1, 2)]:
        mine = rows[rank::world_size]  # evaluate's rollout ids are the positions in this rank's share
        env.success_chunk = {i: succeed_at[r["task_id"], r["trial_id"]] for i, r in enumerate(mine)
                             if (r["task_id"], r["trial_id"]) in succeed_at}
        results.append(evaluate(env, policy, rows, rank=rank, world_size=world_size, num_videos=2, progress=False))
    whole, first, second = results
    assert whole.successes == {("libero_object", 0): 1, ("libero_object", 1): 2}
    assert whole.trials == {("libero_object", 0): 2, ("libero_object", 1): 3}
    for key in whole.trials:  # without a process group each rank counts its own share: the shares add up
        assert first.successes[key] + second.successes[key] == whole.successes[key]
        assert first.trials[key] + second.trials[key] == whole.trials[key]
    assert whole.metrics() == {"val/success_rate": 3 / 5, "val/failed_rollouts": 0,
                               "val/libero_object/success_rate": 3 / 5,
                               "val/libero_object/task_0/success_rate": 1 / 2,
                               "val/libero_object/task_1/success_rate": 2 / 3}
    # videos of the first two rows: the initial frame, then one frame a chunk until the episode ended
    assert sorted(whole.videos) == [0, 1]
    assert whole.videos[0].shape[0] == 1 + MAX_STEPS // CHUNK and whole.videos[1].shape[0] == 1 + 1
    assert whole.videos[0].dtype == torch.uint8 and whole.videos[0].shape[1] == 3
    assert not torch.equal(whole.videos[1][0], whole.videos[1][1])  # the scene moved into its goal between them
    with pytest.raises(ValueError, match="rows of libero_goal cannot run on this env of libero_object"):
        evaluate(env, policy, rows + [dict(rows[0], suite="libero_goal")], progress=False)
    with pytest.raises(ValueError, match="evaluate needs at least one manifest row; got none"):
        evaluate(env, policy, [], progress=False)


# ---- group ids over ranks; bad requests and overlaps refused (a 1-slot Reacher env) ------------


def test_group_ids_are_unique_across_ranks_and_rounds():
    # the example's scheme: first_group_id = next_group * world_size + rank, stride world_size, where next_group
    # counts the prompts each rank has taken so far (the same on every rank)
    world_size, n = 2, 4
    requests = {0: [], 1: []}
    next_group = 0
    for prompts_per_rank in (3, 2):  # two refill rounds
        for rank in (0, 1):
            prompts = [(rank, 10 * next_group + i) for i in range(prompts_per_rank)]
            requests[rank] += group_requests(prompts, n, first_group_id=next_group * world_size + rank,
                                             group_id_stride=world_size)
        next_group += prompts_per_rank
    groups = {rank: [r.group_id for r in reqs] for rank, reqs in requests.items()}
    rollouts = {rank: [r.rollout_id for r in reqs] for rank, reqs in requests.items()}
    # rank 0 gets the even groups, rank 1 the odd ones, in order; together they count up without a gap
    assert sorted(set(groups[0])) == [0, 2, 4, 6, 8] and sorted(set(groups[1])) == [1, 3, 5, 7, 9]
    assert not set(rollouts[0]) & set(rollouts[1])
    assert sorted(rollouts[0] + rollouts[1]) == list(range(10 * n))
    # rollout ids g * n .. g * n + n - 1 of group g
    for r in requests[0] + requests[1]:
        assert r.rollout_id // n == r.group_id
    assert [r.rollout_id for r in requests[1][:n]] == [4, 5, 6, 7]  # rank 1's first group is group 1


def test_group_requests_refuses_empty_groups_and_a_stride_that_repeats_ids():
    with pytest.raises(ValueError, match="rollouts_per_group must be >= 1, got 0"):
        group_requests([(0, 0)], 0)
    with pytest.raises(ValueError, match=r"group_id_stride must be >= 1 \(the number of ranks\), got 0"):
        group_requests([(0, 0), (0, 1)], 2, group_id_stride=0)


@pytest.fixture(scope="module")
def reacher():
    """One Reacher slot and a small token policy: a real env that is never reset or stepped here."""
    env = GymSlotEnv(functools.partial(make_reacher_env, image_size=32), 1, success_fn=reacher_success,
                     instructions="reach", max_steps=16, chunk_len=CHUNK)
    policy = StateTokenPolicy(env.state_dim, env.action_dim, CHUNK, hidden_sizes=(8,))
    yield env, policy
    env.close()


@pytest.mark.parametrize("overlap", ["pool", None, "true", 1, 0.0])  # 1 == True, but no mode
def test_collect_rollouts_names_an_invalid_overlap(reacher, overlap):
    env, policy = reacher
    with pytest.raises(ValueError, match=rf"overlap must be False, True \(asynchronous pool\) or 'halves'; "
                                         rf"got {overlap!r}"):
        collect_rollouts(env, policy, group_requests([(0, 0)], 1), overlap=overlap)


@pytest.mark.parametrize("overlap", [True, "halves"])
def test_collect_rollouts_refuses_overlap_on_an_env_without_send_and_receive(reacher, overlap):
    env, policy = reacher
    with pytest.raises(ValueError, match=rf"overlap={overlap!r} needs an env with step_send/step_recv_ready .* "
                                         "GymSlotEnv has none: pass overlap=False"):
        collect_rollouts(env, policy, group_requests([(0, 0)], 1), overlap=overlap)


def test_collect_rollouts_refuses_no_requests(reacher):
    # an empty prompt list expands to no requests, which the rollout refuses rather than returning an empty batch
    env, policy = reacher
    assert group_requests([], 8) == []
    with pytest.raises(ValueError, match="collect_rollouts needs at least one request"):
        collect_rollouts(env, policy, group_requests([], 8))
