"""GymSlotEnv on real gymnasium MuJoCo envs, checked against plain gymnasium envs replayed in the test."""

from __future__ import annotations

import functools
import math
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from srpo_rl.envs.gym_slots import GymSlotEnv, init_state_seed
from srpo_rl.examples.reacher_policy import (
    INSTRUCTIONS,
    TARGET_JITTER,
    TASK_TARGETS,
    ReacherExpert,
    fingertip_distance,
    make_reacher_env,
    reacher_success,
)
from srpo_rl.rollout import collect_rollouts, group_requests
from srpo_rl.token_policy import StateTokenPolicy

# the tests' own partial resets leave out the other slots' done flags, which torchrl warns about
pytestmark = pytest.mark.filterwarnings("ignore:A partial `'_reset'` key")

SEED = 3
CHUNK = 8
SIZE = 32
DISTANCE = 0.01


def make_env() -> gymnasium.Env:
    return make_reacher_env(image_size=SIZE)


def slot_env(num_envs: int = 3, *, max_steps: int = 48, frame_stride: int | None = None, **kwargs) -> GymSlotEnv:
    return GymSlotEnv(
        make_env, num_envs, success_fn=functools.partial(reacher_success, distance=DISTANCE),
        instructions="reach", max_steps=max_steps, chunk_len=CHUNK, frame_stride=frame_stride, seed=SEED, **kwargs,
    )


def reset(env: GymSlotEnv, slots: dict[int, int], rollout_offset: int = 0, tasks: dict[int, int] | None = None):
    """Resets ``{slot: init_state_id}`` (on ``{slot: task_id}``, default 0); every other slot is left alone."""
    n = env.batch_size[0]
    mask = torch.zeros(n, 1, dtype=torch.bool)
    init = torch.zeros(n, 1, dtype=torch.long)
    task = torch.zeros(n, 1, dtype=torch.long)
    for s, i in slots.items():
        mask[s], init[s], task[s] = True, i, (tasks or {}).get(s, 0)
    ids = torch.arange(n).unsqueeze(-1) + rollout_offset
    return env.reset(TensorDict(
        {"_reset": mask, "task_id": task, "init_state_id": init, "rollout_id": ids, "group_id": ids}, [n]
    ))


def step(env: GymSlotEnv, actions: torch.Tensor, active: list[int]):
    n = env.batch_size[0]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[active] = True
    full = torch.zeros(n, CHUNK, env.action_dim)
    full[active] = actions
    return env.step(TensorDict({"action": full, "_step": mask}, [n]))["next"]


def expert_episode(init_state_id: int, steps: int):
    """A plain gymnasium replay of the expert: actions, distances after each step and the rendered frames."""
    env, expert = make_env(), ReacherExpert()
    obs, _ = env.reset(seed=init_state_seed(SEED, 0, init_state_id))
    actions, distances, frames = [], [], [env.render()]
    for _ in range(steps):
        action = expert(obs)
        obs, *_ = env.unwrapped.step(action)
        actions.append(action)
        distances.append(fingertip_distance(env))
        frames.append(env.render())
    env.close()
    return np.stack(actions), np.array(distances), np.stack(frames).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def env():
    env = slot_env()
    yield env
    env.close()


def test_reset_replays_the_init_state_of_its_id(env):
    out = reset(env, {0: 5, 1: 5, 2: 6})
    state, image = out["observation", "state"], out["observation", "image"]
    assert state.dtype == torch.float32 and state.shape == (3, 10)
    assert image.dtype == torch.uint8 and image.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(state[0], state[1]) and torch.equal(image[0], image[1])
    assert not torch.equal(state[0, 4:6], state[2, 4:6])  # another target
    # the state is the gymnasium observation of a reset with the id's seed
    plain = make_env()
    obs, _ = plain.reset(seed=init_state_seed(SEED, 0, 6))
    plain.close()
    torch.testing.assert_close(state[2], torch.from_numpy(obs).float())
    assert out["init_state_id"].flatten().tolist() == [5, 5, 6]
    assert out["rollout_id"].flatten().tolist() == [0, 1, 2]
    assert not out["done"].any() and out["step_count"].eq(0).all()
    assert list(out["instruction"]) == ["reach"] * 3
    assert out["frames_mask"][:, 0].all() and not out["frames_mask"][:, 1:].any()  # the first reward frame
    assert torch.equal(out["frames"][:, 0], image)


def test_specs_match_the_data():
    env = GymSlotEnv(make_env, 2, success_fn=reacher_success, instructions=INSTRUCTIONS, max_steps=24, chunk_len=CHUNK)
    check_env_specs(env)
    env.close()


def test_reset_passes_the_task_to_a_multi_task_env():
    env = GymSlotEnv(make_env, 3, success_fn=reacher_success, instructions=INSTRUCTIONS, max_steps=24, chunk_len=CHUNK)
    out = reset(env, {0: 9, 1: 9, 2: 9}, tasks={0: 2, 1: 6, 2: 2})
    env.close()
    target = out["observation", "state"][:, 4:6].double()
    for slot, task in enumerate((2, 6, 2)):
        assert (target[slot] - torch.from_numpy(TASK_TARGETS[task])).abs().max() <= TARGET_JITTER
    assert torch.equal(target[0], target[2]) and not torch.equal(target[0], target[1])
    assert list(out["instruction"]) == [INSTRUCTIONS[2], INSTRUCTIONS[6], INSTRUCTIONS[2]]
    assert out["task_id"].flatten().tolist() == [2, 6, 2]


def test_partial_reset_and_partial_step_leave_other_slots_alone(env):
    reset(env, {0: 1, 1: 2, 2: 3})
    moved = step(env, torch.zeros(2, CHUNK, 2), active=[0, 2])
    assert moved["chunk_steps"].flatten().tolist() == [CHUNK, 0, CHUNK]
    assert moved["step_count"].flatten().tolist() == [CHUNK, 0, CHUNK]
    assert moved["frames_mask"][1].sum() == 0 and moved["frames_mask"][[0, 2]].all()
    again = reset(env, {1: 4}, rollout_offset=10)
    assert again["rollout_id"][1].item() == 11 and again["init_state_id"][1].item() == 4
    # torchrl fills the slots not reset from the input tensordict; the simulations themselves keep going
    later = step(env, torch.zeros(3, CHUNK, 2), active=[0, 1, 2])
    assert later["step_count"].flatten().tolist() == [2 * CHUNK, CHUNK, 2 * CHUNK]
    assert later["rollout_id"].flatten().tolist() == [0, 11, 2]


def test_chunk_stops_at_success_inside_the_chunk(env):
    actions, distances, _ = expert_episode(init_state_id=7, steps=48)
    first = int(np.argmax(distances < DISTANCE)) + 1  # env steps up to and including the first success
    assert distances[first - 1] < DISTANCE and first % CHUNK != 0, "pick an init state whose success is mid-chunk"
    reset(env, {0: 7, 1: 7, 2: 7})
    chunks = torch.from_numpy(np.concatenate([actions, np.zeros((CHUNK, 2), np.float32)])).float()
    for c in range(math.ceil(first / CHUNK)):
        out = step(env, chunks[c * CHUNK : (c + 1) * CHUNK].expand(1, CHUNK, 2), active=[1])
    assert out["chunk_steps"][1].item() == first - (math.ceil(first / CHUNK) - 1) * CHUNK
    assert out["step_count"][1].item() == first
    assert out["success"][1].item() and out["terminated"][1].item() and out["done"][1].item()
    assert not out["truncated"][1].item() and out["reward"][1].item() == 1.0
    assert not out["done"][0].item()
    with pytest.raises(RuntimeError, match=r"slots \[1\] have no running episode"):
        step(env, torch.zeros(1, CHUNK, 2), active=[1])


def test_frames_are_the_renders_after_their_sub_steps():
    stride = 3
    env = slot_env(1, frame_stride=stride)
    actions, distances, frames = expert_episode(init_state_id=2, steps=CHUNK)
    assert (distances >= DISTANCE).all()  # no success in the first chunk: all sub-steps run
    out = reset(env, {0: 2})
    torch.testing.assert_close(out["observation", "image"][0], torch.from_numpy(frames[0]))
    out = step(env, torch.from_numpy(actions).float().unsqueeze(0), active=[0])
    env.close()
    k = math.ceil(CHUNK / stride)
    assert out["frames"].shape == (1, k, 3, SIZE, SIZE) and out["frames_mask"][0].all()
    for j in range(k):  # frame j: after sub-step min((j + 1) * stride, 8), 1-based
        torch.testing.assert_close(out["frames"][0, j], torch.from_numpy(frames[min((j + 1) * stride, CHUNK)]))
    assert out["frames_step"][0].tolist() == [min((j + 1) * stride, CHUNK) for j in range(k)]
    torch.testing.assert_close(out["observation", "image"][0], out["frames"][0, -1])


def test_max_steps_truncates_inside_the_chunk():
    env = slot_env(1, max_steps=CHUNK + 3, frame_stride=2)
    reset(env, {0: 0})
    step(env, torch.zeros(1, CHUNK, 2), active=[0])
    out = step(env, torch.zeros(1, CHUNK, 2), active=[0])
    env.close()
    assert out["chunk_steps"].item() == 3 and out["step_count"].item() == CHUNK + 3
    assert out["truncated"].item() and out["done"].item() and not out["success"].item()
    assert out["frames_mask"][0].tolist() == [True, True, False, False]  # sub-steps 2 and 3 (the last)
    assert out["frames_step"][0].tolist() == [CHUNK + 2, CHUNK + 3, 0, 0]  # the episode steps they show


def test_actions_are_mapped_onto_the_box():
    # InvertedPendulum's action space is [-3, 3]: an action of 0.5 is a force of 1.5
    env = GymSlotEnv(
        lambda: gymnasium.make("InvertedPendulum-v5", render_mode="rgb_array", width=SIZE, height=SIZE),
        1, success_fn=lambda env, obs, info: False, instructions="balance", max_steps=100, chunk_len=CHUNK,
    )
    reset(env, {0: 0})
    step(env, torch.full((1, CHUNK, 1), 0.5), active=[0])
    ctrl = float(env.envs[0].unwrapped.data.ctrl[0])
    env.close()
    assert ctrl == pytest.approx(1.5)


def test_bad_actions_and_ids_fail_with_the_valid_choices(env):
    reset(env, {0: 0, 1: 0, 2: 0})
    with pytest.raises(ValueError, match=r"action has shape \[3, 4, 2\]; expected \[3, 8, 2\]"):
        env.step(TensorDict({"action": torch.zeros(3, 4, 2)}, [3]))
    with pytest.raises(ValueError, match="outside the valid range"):
        env.step(TensorDict({"action": torch.full((3, CHUNK, 2), 1.5)}, [3]))
    with pytest.raises(ValueError, match=r"task_id 2 of slot 0 is out of range; choose one of 0..0"):
        env.reset(TensorDict({"_reset": torch.ones(3, 1, dtype=torch.bool), "task_id": torch.full((3, 1), 2)}, [3]))


def test_a_crashing_env_fails_its_rollout_only():
    def success(env, obs, info):
        if env.unwrapped.data.qpos[0] > 1e9 or getattr(env.unwrapped, "broken", False):
            raise RuntimeError("simulation diverged")
        return False

    env = GymSlotEnv(make_env, 2, success_fn=success, instructions="reach", max_steps=48, chunk_len=CHUNK)
    reset(env, {0: 0, 1: 0})
    env.envs[1].unwrapped.broken = True
    out = step(env, torch.zeros(2, CHUNK, 2), active=[0, 1])
    assert out["worker_failed"].flatten().tolist() == [False, True]
    assert out["done"].flatten().tolist() == [False, True] and out["truncated"][1].item()
    out = reset(env, {1: 0})  # the broken env is rebuilt
    assert not out["worker_failed"].any() and not hasattr(env.envs[1].unwrapped, "broken")
    env.close()


@pytest.mark.parametrize("crashes", [1, 2])
def test_a_rollout_whose_env_crashed_starts_over_once(crashes):
    # rollout 2's env crashes in its second chunk, `crashes` times: after one crash the rollout starts over on
    # the rebuilt env and ends as the others do; after two it ends as failed (the sampler drops its group)
    left = {"crashes": crashes}

    def success(gym_env, obs, info):
        slot = next(slot for slot in env._slots if slot.env is gym_env)
        if slot.rollout_id == 2 and slot.step_count > CHUNK and left["crashes"]:
            left["crashes"] -= 1
            raise RuntimeError("simulation diverged")
        return reacher_success(gym_env, obs, info, distance=DISTANCE)

    env = GymSlotEnv(make_env, 2, success_fn=success, instructions="reach", max_steps=24, chunk_len=CHUNK, seed=SEED)
    torch.manual_seed(0)
    policy = StateTokenPolicy(env.state_dim, env.action_dim, CHUNK, hidden_sizes=(32,))
    trajs, stats = collect_rollouts(env, policy, group_requests([(0, 4), (0, 5)], rollouts_per_group=2))
    env.close()
    assert left["crashes"] == 0 and stats.restarts == 1
    assert sorted(trajs["rollout_id"].tolist()) == [0, 1, 2, 3]  # no rollout lost or run twice
    failed = dict(zip(trajs["rollout_id"].tolist(), trajs["failed"].tolist()))
    assert failed == {0: False, 1: False, 2: crashes == 2, 3: False}
    row = trajs[trajs["rollout_id"] == 2][0]
    if crashes == 1:  # the restarted rollout is whole: every step it recorded is one of its own episode
        executed = row["steps", "next", "chunk_steps"] * row["steps", "mask"]
        assert int(executed.sum()) == int(row["num_steps"]) and (row["num_steps"] == 24 or row["success"])


def test_slots_never_reset_report_blank_data():
    env = slot_env(3)
    out = reset(env, {1: 0})
    env.close()
    assert out["observation", "image"][[0, 2]].eq(0).all() and out["observation", "image"][1].gt(0).any()
    assert out["done"][[0, 2]].all() and not out["done"][1].item()


def test_collect_rollouts_gives_torchrl_the_other_slots_done_flags():
    # Partial resets: 8 rollouts of 16 steps on 3 slots (the last round resets 2 slots while the third, out of
    # requests, stays done), then 2 rollouts on the 3 slots (the start resets 2). Without the other slots' done
    # flags in the reset's input torchrl warns at each of them.
    env = slot_env(3, max_steps=16)
    torch.manual_seed(0)
    policy = StateTokenPolicy(env.state_dim, env.action_dim, CHUNK, hidden_sizes=(32,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajs, _ = collect_rollouts(env, policy, group_requests([(0, i) for i in range(4)], rollouts_per_group=2))
        again, _ = collect_rollouts(env, policy, group_requests([(0, 9)], rollouts_per_group=2))
    env.close()
    assert sorted(trajs["rollout_id"].tolist()) == list(range(8)) and again["init_state_id"].tolist() == [9, 9]
    assert [str(w.message) for w in caught if "_reset" in str(w.message)] == []


def test_collect_rollouts_runs_on_it_unchanged():
    env = slot_env(3, max_steps=20, frame_stride=4)
    torch.manual_seed(0)
    policy = StateTokenPolicy(env.state_dim, env.action_dim, CHUNK, hidden_sizes=(32,))
    requests = group_requests([(0, 11), (0, 12)], rollouts_per_group=2)
    trajs, stats = collect_rollouts(env, policy, requests)
    env.close()
    assert trajs.batch_size == (4,) and trajs["steps"].batch_size[0] == 4
    assert trajs["group_id"].tolist() == [0, 0, 1, 1] and trajs["init_state_id"].tolist() == [11, 11, 12, 12]
    assert torch.equal(trajs["initial_frame"][0], trajs["initial_frame"][1])  # same init state, same frame
    executed = trajs["steps", "next", "chunk_steps"] * trajs["steps", "mask"]
    assert executed.sum(-1).tolist() == trajs["num_steps"].tolist()
    assert stats.env_steps == int(trajs["num_steps"].sum())
    for row in range(4):  # every decision except an episode's last runs the whole chunk
        chunks = executed[row][trajs["steps", "mask"][row]]
        assert (chunks[:-1] == CHUNK).all()
        last = int(trajs["num_steps"][row]) - CHUNK * (len(chunks) - 1)
        assert chunks[-1] == last and (trajs["success"][row] or trajs["num_steps"][row] == 20)
