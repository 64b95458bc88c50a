"""LiberoSim (one in-process LIBERO simulation), the chunk logic and the gymnasium envs.

Real LIBERO (libero-pro) with Mesa EGL rendering; one simulation is built for the module.
"""

import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import gymnasium
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from conftest import first_success_step
from srpo_rl.envs import LiberoSim, num_frames
from srpo_rl.envs.chunk import frame_slots
from srpo_rl.envs.sim import quat2axisangle, release_free_heap

SIZE = 256


@pytest.fixture(scope="module")
def sim():
    sim = LiberoSim("libero_object", task_id=0, max_steps=512, num_steps_wait=10)
    yield sim
    sim.close()


def _actions(seed: int, n: int = 8) -> np.ndarray:
    actions = np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 7)).astype(np.float32)
    actions[:, -1] = -1.0
    return actions


# OpenVLA's LIBERO evaluation settles the scene with get_libero_dummy_action(): no motion, the gripper open (-1)
REFERENCE_WAIT_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])


def _native_episode(sim: LiberoSim, init_state_id: int, actions: np.ndarray) -> list[np.ndarray]:
    """The OpenVLA evaluation protocol on plain robosuite: every step renders its camera.

    Returns the policy images (rotated 180 degrees): after the settle steps, then after each action.
    """
    env = sim.env
    for camera in sim._cameras.values():
        camera.open = True  # robosuite's own behaviour: the sensor renders at every step
    try:
        env.reset()
        for robot in env.env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        env.set_init_state(sim.init_states[init_state_id])
        for _ in range(sim.num_steps_wait):
            obs, *_ = env.step(REFERENCE_WAIT_ACTION)
        images = [obs["agentview_image"][::-1, ::-1]]
        for action in actions:
            obs, *_ = env.step(action.astype(np.float64))
            images.append(obs["agentview_image"][::-1, ::-1])
    finally:
        for camera in sim._cameras.values():
            camera.open = False
    return images


# -- chunk logic ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "chunk, stride, executed, expected",
    [
        (8, 1, 8, [(j, j) for j in range(8)]),
        (8, 8, 8, [(0, 7)]),
        (8, 8, 3, [(0, 2)]),
        (8, 3, 8, [(0, 2), (1, 5), (2, 7)]),
        (8, 3, 5, [(0, 2), (1, 4)]),
        (8, 1, 2, [(0, 0), (1, 1)]),
    ],
)
def test_frame_slots(chunk, stride, executed, expected):
    assert num_frames(chunk, stride) == -(-chunk // stride)
    assert frame_slots(chunk, stride, executed) == expected


def test_quat2axisangle_matches_scipy():
    for quat in Rotation.random(20, random_state=0).as_quat():  # (x, y, z, w)
        if quat[3] < 0:
            quat = -quat  # same rotation; acos(w) then gives the angle in [0, pi]
        np.testing.assert_allclose(quat2axisangle(quat), Rotation.from_quat(quat).as_rotvec(), atol=1e-9)
    assert np.all(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])) == 0)


# -- resets ----------------------------------------------------------------------------------------
def _resident_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:")) / 1024


def test_release_free_heap_hands_freed_heap_pages_back():
    # 200 MiB of 64 KiB blocks on the C heap (below glibc's mmap threshold), each followed by a kept 1 KiB block:
    # once the big ones are freed, the heap cannot shrink from its top, so glibc keeps their pages resident
    pairs = [(bytearray(64 * 1024), bytearray(1024)) for _ in range(3200)]
    kept = [small for _, small in pairs]
    del pairs
    before = _resident_mib()
    if not release_free_heap():
        pytest.skip("this C library has no malloc_trim (not glibc)")
    assert before - _resident_mib() > 150, "the freed 200 MiB stayed resident"
    assert len(kept) == 3200


def test_reset_runs_settle_steps(sim):
    renders = sim.renders
    obs = sim.reset(init_state_id=3)
    assert sim.renders - renders == 1  # only the policy's first frame, after the last settle step
    assert obs["step_count"] == 0 and obs["chunk_steps"] == 0 and not obs["done"]
    assert obs["image"].shape == (SIZE, SIZE, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 10  # a real scene, not a blank frame
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    # the settle steps moved the simulation on from the stored initial state
    state = sim.get_state()
    init = sim.init_states[3]
    assert state[0] == pytest.approx(init[0] + 10 * 0.05)  # 10 control steps of 0.05 s
    assert np.abs(state[1:] - init[1:]).max() > 1e-4
    assert not sim.check_success()


def test_reset_image_equals_robosuite_image(sim):
    native = _native_episode(sim, 2, np.zeros((0, 7)))
    assert np.array_equal(sim.reset(init_state_id=2)["image"], native[0])


def test_soft_reset_matches_hard_reset(sim):
    actions = _actions(0, 16)
    trajectories = []
    for hard in (True, False, False):
        sim.reset(init_state_id=1, hard=hard)
        frames, states = [], []
        for chunk in (actions[:8], actions[8:]):
            out = sim.step_chunk(chunk, frame_stride=1)
            frames.append(out["frames"])
            states.append(sim.get_state())
        trajectories.append((np.concatenate(frames), np.stack(states)))
    (hard_frames, hard_states), *soft = trajectories
    for frames, states in soft:
        assert np.abs(states - hard_states).max() <= 1e-6
        assert np.array_equal(frames, hard_frames)


def _fixture_layout(robosuite_env) -> np.ndarray:
    model = robosuite_env.sim.model
    return np.concatenate([model.body_pos, model.body_quat], axis=1).copy()


def _fixture_layouts() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Layouts after three resets of one LiberoSim (libero_goal task 3), the reference's fresh env seeded 0, and
    that env after a second reset from the same stream."""
    from libero.libero.envs import OffScreenRenderEnv

    sim = LiberoSim("libero_goal", task_id=3, max_steps=64, num_steps_wait=2)
    try:
        layouts = []
        for init_state_id in (0, 5, 0):
            sim.reset(init_state_id=init_state_id)
            sim.step_chunk(_actions(init_state_id), frame_stride=8)
            layouts.append(_fixture_layout(sim.env.env))
        fresh = OffScreenRenderEnv(bddl_file_name=sim.info.bddl_files[3], camera_heights=SIZE, camera_widths=SIZE)
        try:
            fresh.seed(0)
            fresh.reset()
            reference = _fixture_layout(fresh.env)
            fresh.reset()  # a second reset from the same stream, as a soft reset without the seed would do
            return layouts, reference, _fixture_layout(fresh.env)
        finally:
            fresh.close()
    finally:
        sim.close()


def test_every_reset_places_the_fixtures_as_the_references_fresh_env():
    # libero_goal's scene has fixtures (cabinet, stove, wine rack): LIBERO places them at each reset from numpy's
    # global stream, into the model, where the init state does not reach. The reference builds an env seeded 0
    # for every episode; here one simulation serves many episodes. In its own process: the reference's plain
    # robosuite env, closed, would free its GL objects in whatever context is current (LiberoSim guards that).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        layouts, reference, moved = pool.submit(_fixture_layouts).result(timeout=300)
    assert np.abs(moved - reference).max() > 1e-3  # the fixtures do move with the stream
    for layout in layouts:
        assert np.array_equal(layout, reference)


def test_simulations_in_one_process_render_their_own_scenes(sim):
    # robosuite makes a GL context current only when it creates it, and frees a closing simulation's GL objects
    # in whatever context is current: a second simulation in the process (gymnasium's vector envs) made the
    # first one draw another scene, then black frames once it was closed
    before = sim.reset(init_state_id=1)["image"].copy()
    other = LiberoSim("libero_goal", task_id=3, max_steps=64, num_steps_wait=2)
    try:
        other_image = other.reset(init_state_id=0)["image"]
        assert np.array_equal(sim.reset(init_state_id=1)["image"], before)
        assert np.abs(other_image.astype(int) - before).mean() > 10  # another scene: the check can tell them apart
        other.set_task(4)  # a rebuild closes its first simulation
        assert np.array_equal(sim.reset(init_state_id=1)["image"], before)
    finally:
        other.close()
    assert np.array_equal(sim.reset(init_state_id=1)["image"], before)


# -- chunks and frames -----------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 3, None])
def test_chunk_frames_are_robosuite_frames(sim, stride):
    actions = _actions(1)
    native = _native_episode(sim, 0, actions)  # native[i + 1] = image after sub-step i
    sim.reset(init_state_id=0)
    renders = sim.renders
    out = sim.step_chunk(actions, frame_stride=stride)
    k = num_frames(8, 8 if stride is None else stride)
    assert sim.renders - renders == k  # no unused frame is rendered
    assert out["chunk_steps"] == 8 and out["step_count"] == 8 and not out["done"]
    assert out["frames"].shape == (k, SIZE, SIZE, 3) and out["frames_mask"].all()
    for slot, sub_step in frame_slots(8, 8 if stride is None else stride, 8):
        assert np.array_equal(out["frames"][slot], native[sub_step + 1])
    # the episode step each frame shows: native[t] is the image after env step t
    assert all(np.array_equal(out["frames"][j], native[t]) for j, t in enumerate(out["frames_step"]))
    assert np.array_equal(out["image"], native[-1])


def test_explicit_render_equals_robosuite_observable(sim):
    sim.reset(init_state_id=0)
    sim.step_chunk(_actions(2, 3))
    camera = sim._cameras["agentview"]
    camera.open = True
    try:
        sim.env.env._update_observables(force=True)  # robosuite renders its observable now
        observed = sim.env.env._observables["agentview_image"].obs
    finally:
        camera.open = False
    assert np.array_equal(sim.render(), observed[::-1, ::-1])


@pytest.mark.parametrize("stride", [1, None])
def test_success_inside_chunk(sim, stride):
    first = first_success_step(sim, init_state_id=4)
    sim.reset(init_state_id=4)
    sim.teleport_to_goal()
    renders = sim.renders
    out = sim.step_chunk(np.zeros((8, 7), np.float32), frame_stride=stride)
    assert out["success"] and out["done"] and not out["truncated"]
    # the chunk stops where the step-by-step run first saw success, inside the chunk
    assert out["chunk_steps"] == first and first < 8 and out["step_count"] == first
    n = out["chunk_steps"]
    expected_mask = np.arange(8) < n if stride == 1 else np.array([True])
    assert np.array_equal(out["frames_mask"], expected_mask)
    assert out["frames_step"].tolist() == (list(range(1, n + 1)) + [0] * (8 - n) if stride == 1 else [n])
    assert sim.renders - renders == (n if stride == 1 else 1)
    last = np.flatnonzero(out["frames_mask"])[-1]
    assert np.array_equal(out["frames"][last], out["image"])
    assert not out["frames"][~out["frames_mask"]].any()
    with pytest.raises(RuntimeError, match="is over"):
        sim.step_chunk(np.zeros((8, 7), np.float32))


def test_teleporting_to_a_goal_predicate_it_does_not_know_is_refused(sim, monkeypatch):
    # a custom BDDL goal beyond the five suites' (in, on and four articulations): named, nothing moved
    sim.reset(init_state_id=0)
    problem = dict(sim.env.env.parsed_problem)
    predicate, obj, target = problem["goal_state"][0]  # the task's own goal: put obj in/on target
    problem["goal_state"] = [[predicate, obj, target], ["Stack", obj, target]]  # the known one is not moved either
    monkeypatch.setattr(sim.env.env, "parsed_problem", problem)
    before = sim.env.get_sim_state().copy()
    with pytest.raises(ValueError, match="cannot teleport to goal predicate 'stack'; teleport_to_goal knows in, on, "
                                         "open, close, turnon, turnoff"):
        sim.teleport_to_goal()
    assert np.array_equal(sim.env.get_sim_state(), before)


def test_an_episode_that_starts_solved_ends_at_its_first_step(sim):
    """Success is read after steps only (as the reference rollout reads ``done``): a reset from a solved state
    reports a running episode, so a batched rollout steps it, and its first step ends it."""
    sim.reset(init_state_id=4)
    sim.teleport_to_goal()
    assert sim.step_chunk(np.zeros((8, 7), np.float32))["success"]  # the goal holds within a chunk
    solved = sim.env.get_sim_state().copy()
    original = sim.init_states[4].copy()
    sim.init_states[4] = solved
    try:
        out = sim.reset(init_state_id=4)
        assert sim.check_success()  # the scene is solved after the settle steps ...
        assert not out["success"] and not out["done"]  # ... yet the episode runs until a step is taken
        out = sim.step_chunk(np.zeros((8, 7), np.float32))
        assert out["success"] and out["done"] and out["chunk_steps"] == 1 and out["step_count"] == 1
    finally:
        sim.init_states[4] = original


def test_episode_ends_at_max_steps(sim):
    sim.max_steps = 12
    try:
        sim.reset(init_state_id=0)
        first = sim.step_chunk(_actions(3), frame_stride=1)
        assert first["chunk_steps"] == 8 and not first["done"]
        out = sim.step_chunk(_actions(4), frame_stride=1)
        assert out["chunk_steps"] == 4 and out["step_count"] == 12
        assert out["truncated"] and out["done"] and not out["success"]
        assert np.array_equal(out["frames_mask"], np.arange(8) < 4)
        assert out["frames_step"].tolist() == [9, 10, 11, 12, 0, 0, 0, 0]  # episode steps, not the chunk's
        with pytest.raises(RuntimeError, match="call reset"):
            sim.step_chunk(_actions(5))
    finally:
        sim.max_steps = 512


def test_chunk_validation_errors(sim):
    sim.reset(init_state_id=0)
    with pytest.raises(ValueError, match=r"expected \[chunk_len, 7\]"):
        sim.step_chunk(np.zeros(7))
    with pytest.raises(ValueError, match=r"shape \[8, 6\]; expected \[8, 7\]"):
        sim.step_chunk(np.zeros((8, 6)))
    with pytest.raises(ValueError, match="floating dtype"):
        sim.step_chunk(np.zeros((8, 7), dtype=np.int64))
    bad = np.zeros((8, 7))
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="not finite at sub-step 2 dim 5"):
        sim.step_chunk(bad)
    bad[2, 5] = -1.5
    with pytest.raises(ValueError, match=r"-1.5 at sub-step 2 dim 5 is outside the valid range \[-1, 1\]"):
        sim.step_chunk(bad)
    with pytest.raises(ValueError, match=r"init_state_id 50 out of range .* choose 0..49"):
        sim.reset(init_state_id=50)


# -- torchrl's MultiAction on the same simulation --------------------------------------------------
def test_torchrl_multiaction_loses_mid_chunk_success(sim):
    """torchrl's MultiAction reports reward 0 when success lands before the chunk's last sub-step."""
    from torchrl.envs import LiberoWrapper, TransformedEnv
    from torchrl.envs.transforms import MultiAction

    env = TransformedEnv(
        LiberoWrapper(sim.env, init_states=sim.init_states, init_state_mode="fixed", init_state_id=4),
        MultiAction(stack_rewards=False),
    )
    try:
        td = env.reset()
        sim.teleport_to_goal()
        td["action"] = torch.zeros(8, 7)
        td = env.step(td)
    finally:
        env.base_env.is_closed = True  # the simulation belongs to the fixture: do not close it
    assert td["next", "success"].item() and td["next", "done"].item()
    assert td["next", "reward"].item() == 0.0  # the success reward is lost

    # the same state and chunk through LiberoSim: the chunk stops at success with reward 1
    sim.reset(init_state_id=4)
    sim.teleport_to_goal()
    out = sim.step_chunk(np.zeros((8, 7), np.float32))
    assert out["success"] and out["chunk_steps"] < 8


# -- gymnasium -------------------------------------------------------------------------------------
def test_gymnasium_ids_registered():
    for name in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_long", "libero_90"):
        assert f"LIBERO/{name}-v0" in gymnasium.registry


def test_gymnasium_make_and_step(sim):
    sim.close()  # one simulation at a time in this process
    env = gymnasium.make("LIBERO/libero_long-v0", task_id=3, chunk_len=1, max_steps=2, render_mode="rgb_array")
    try:
        obs, info = env.reset(seed=0, options={"init_state_id": 7})
        assert info["init_state_id"] == 7 and info["task_id"] == 3
        assert info["instruction"] == "put the black bowl in the bottom drawer of the cabinet and close it"
        assert env.observation_space.contains(obs)
        assert env.action_space.shape == (1, 7)
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert (reward, terminated, truncated, info["chunk_steps"]) == (0.0, False, False, 1)
        obs, _, _, truncated, info = env.step(np.zeros((1, 7), np.float32))
        assert truncated and info["step_count"] == 2 and info["frames_step"].tolist() == [2]
        assert np.array_equal(env.render(), obs["image"])
    finally:
        env.close()
        sim.set_task(0)


def test_jpeg_in_the_worker_gives_the_policy_round_trip_of_the_raw_image(sim):
    actions = _actions(4)
    raw = sim.reset(init_state_id=3)
    raw_step = sim.step_chunk(actions)
    sim.jpeg_quality = 95
    try:
        jpeg = sim.reset(init_state_id=3)
        jpeg_step = sim.step_chunk(actions)
    finally:
        sim.jpeg_quality = None
    # the PIL round trip of the rotated frame, done here by hand: the bytes the policy's own round trip gives
    for before, after in ((raw, jpeg), (raw_step, jpeg_step)):
        buffer = io.BytesIO()
        Image.fromarray(before["image"]).save(buffer, format="JPEG", quality=95)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        assert np.array_equal(after["image"], expected)
        assert not np.array_equal(after["image"], before["image"])  # it did change the image
    # the reward frames stay as rendered: a reset's first frame is the raw first image
    assert np.array_equal(jpeg_step["frames"], raw_step["frames"])
    assert np.array_equal(jpeg["frames"], raw["frames"]) and np.array_equal(raw["frames"], raw["image"][None])
    assert raw["frames_mask"].tolist() == [True]


def test_bad_jpeg_quality_is_named():
    with pytest.raises(ValueError, match=r"jpeg_quality .* 1\.\.100; got 0"):
        LiberoSim("libero_object", jpeg_quality=0)
