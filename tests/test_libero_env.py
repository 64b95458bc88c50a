"""The batched TorchRL LIBERO env: specs, per-slot resets, chunk steps, worker faults, errors.

Real LIBERO in worker processes (about 2 GB each): one 2-slot env for the module, plus a
1-slot env per other suite, built and closed one at a time.
"""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from conftest import first_success_step
from srpo_rl.envs import INSTALL_COMMAND, LiberoSim, LiberoVecEnv, make_libero_env, suite_info
from srpo_rl.envs.suites import canonical_suite, resolve_max_steps
from srpo_rl.envs.workers import (
    SimWorkers,
    _SharedArray,
    _share_arrays,
    _unshare_arrays,
    egl_device_for,
    mesa_egl_vendor_file,
    parent_render_device,
)

N = 2
MAX_STEPS = 16


@pytest.fixture(scope="module")
def env():
    env = make_libero_env("libero_object", N, max_steps=MAX_STEPS, proprio=True, step_timeout=60)
    yield env
    env.close()


def _reset_td(mask, task_id=None, init_state_id=None, rollout_id=None, group_id=None, *, base=None) -> TensorDict:
    """A reset request; ``base`` is the current data (torchrl keeps it for the slots not reset)."""
    td = TensorDict({}, [len(mask)]) if base is None else base.exclude("reward").clone()
    td["_reset"] = torch.tensor(mask).unsqueeze(-1)
    for key, values in dict(
        task_id=task_id, init_state_id=init_state_id, rollout_id=rollout_id, group_id=group_id
    ).items():
        if values is not None:
            td[key] = torch.tensor(values, dtype=torch.int64).unsqueeze(-1)
    return td


def _step(env, actions=None, step_mask=None) -> TensorDict:
    td = TensorDict({"action": torch.zeros(N, 8, 7) if actions is None else actions}, [N])
    if step_mask is not None:
        td["_step"] = torch.tensor(step_mask)
    return env.step(td)["next"]


def test_specs(env):
    check_env_specs(env)
    spec = env.full_observation_spec
    assert spec["frames"].shape == (N, 1, 3, 256, 256) and spec["frames_mask"].shape == (N, 1)
    assert spec["frames_step"].shape == (N, 1) and spec["frames_step"].dtype == torch.int64
    assert spec["observation", "image"].dtype == torch.uint8
    assert env.action_spec.shape == (N, 8, 7)


def test_plain_reset_defaults(env):
    td = env.reset()
    assert td["task_id"].flatten().tolist() == [0, 1]  # slot i -> task i % num_tasks
    assert td["init_state_id"].flatten().tolist() == [0, 0]
    assert td["rollout_id"].flatten().tolist() == [-1, -1]
    assert td["step_count"].flatten().tolist() == [0, 0]
    assert not td["done"].any() and not td["worker_failed"].any()
    assert list(td["instruction"]) == list(suite_info("libero_object").instructions[:2])
    assert td["observation", "image"].shape == (N, 3, 256, 256)
    assert td["observation", "state"].shape == (N, 8)
    # a reset slot's first reward frame is its first image (no JPEG round trip here)
    assert td["frames_mask"].flatten().tolist() == [True, True]
    assert torch.equal(td["frames"][:, 0], td["observation", "image"])


def test_slot_resets_with_and_without_task_change(env):
    td = env.reset(_reset_td([True, True], [0, 3], [5, 49], [100, 101], [7, 8]))
    assert td["task_id"].flatten().tolist() == [0, 3] and env.task_ids == [0, 3]
    assert td["init_state_id"].flatten().tolist() == [5, 49]
    assert td["rollout_id"].flatten().tolist() == [100, 101]
    assert td["group_id"].flatten().tolist() == [7, 8]
    assert td["instruction"][1] == "pick up the bbq sauce and place it in the basket"
    out = _step(env)
    assert out["step_count"].flatten().tolist() == [8, 8]
    assert out["rollout_id"].flatten().tolist() == [100, 101]

    # slot 1 only, same task (soft reset): slot 0 keeps running
    image_before = out["observation", "image"][0].clone()
    td = env.reset(_reset_td([False, True], [0, 3], [0, 2], [100, 102], [7, 9], base=out))
    assert td["step_count"].flatten().tolist() == [8, 0]
    assert td["rollout_id"].flatten().tolist() == [100, 102]
    assert torch.equal(td["observation", "image"][0], image_before)
    assert td["frames_mask"][1].all()  # the reset slot's first frame (slot 0 keeps its entries of ``base``)
    assert torch.equal(td["frames"][1, 0], td["observation", "image"][1])
    assert td["frames_step"][1].tolist() == [0]  # it shows the episode's step 0

    # slot 0 moves to another task (rebuild), slot 1 keeps its episode
    td = env.reset(_reset_td([True, False], [6, 3], [1, 2], [103, 102], [10, 9], base=td))
    assert env.task_ids == [6, 3]
    assert td["task_id"].flatten().tolist() == [6, 3] and td["step_count"].flatten().tolist() == [0, 0]
    assert td["rollout_id"].flatten().tolist() == [103, 102]
    assert td["instruction"][0] == suite_info("libero_object").instructions[6]
    out = _step(env)
    assert out["step_count"].flatten().tolist() == [8, 8]
    assert out["frames_step"].flatten().tolist() == [8, 8]  # one frame a chunk, after its last step


def test_discarded_resets_that_completed_keep_their_new_task(env):
    # a rollout that fails part-way has the env collect and drop what is in flight (discard_pending): a reset to
    # another task that completed did rebuild its worker, so the env records that task; else the next reset to
    # it would be taken for a soft one and go out inside a round, its rebuild holding up the other slots
    env.reset(_reset_td([True, True], [0, 1], [0, 0]))
    env.reset_send(_reset_td([True, False], [4, 1], [2, 0], [-1, -1], [-1, -1]))  # on its own
    action = torch.zeros(N, 8, 7)
    env.step_send(TensorDict({"action": action, "_step": torch.tensor([False, False]),
                              **_reset_td([False, True], [4, 5], [2, 3], [-1, -1], [-1, -1])}, [N]))  # in a round
    env.discard_pending()
    assert env.task_ids == [4, 5] and env.pending_resets == [] and env.pending_steps == 0
    td = env.reset(_reset_td([True, True], [4, 5], [1, 1]))  # soft resets now: the workers hold those tasks
    assert td["task_id"].flatten().tolist() == [4, 5]
    assert td["instruction"][1] == suite_info("libero_object").instructions[5]


def test_partial_step(env):
    env.reset(_reset_td([True, True], [0, 1], [0, 0]))
    out = _step(env, step_mask=[False, True])
    assert out["chunk_steps"].flatten().tolist() == [0, 8]
    assert out["step_count"].flatten().tolist() == [0, 8]
    assert out["frames_mask"].flatten().tolist() == [False, True]


def test_success_inside_chunk(env):
    sim = LiberoSim("libero_object", task_id=0, max_steps=MAX_STEPS)  # what a worker runs, stepped one by one here
    try:
        first = first_success_step(sim, init_state_id=3)
    finally:
        sim.close()
    env.reset(_reset_td([True, True], [0, 0], [3, 3]))
    env.teleport_to_goal([0])
    out = _step(env)
    assert out["success"].flatten().tolist() == [True, False]
    assert out["reward"].flatten().tolist() == [1.0, 0.0]
    assert out["terminated"].flatten().tolist() == [True, False]
    assert out["done"].flatten().tolist() == [True, False]
    assert out["chunk_steps"].flatten().tolist() == [first, 8] and first < 8  # slot 0 stopped inside its chunk
    assert out["frames_mask"].all()  # one frame per chunk: the last executed step's
    assert out["frames_step"].flatten().tolist() == out["chunk_steps"].flatten().tolist()
    assert torch.equal(out["frames"][:, 0], out["observation", "image"])
    with pytest.raises(RuntimeError, match=r"slots \[0\] have no running episode"):
        _step(env)


def test_episode_ends_at_max_steps(env):
    env.reset(_reset_td([True, True], [0, 1], [0, 0]))
    first = _step(env)
    assert not first["done"].any()
    out = _step(env)
    assert out["step_count"].flatten().tolist() == [MAX_STEPS, MAX_STEPS]
    assert out["truncated"].all() and out["done"].all() and not out["terminated"].any()
    assert out["reward"].sum() == 0


def test_torchrl_rollout_resets_finished_slots(env):
    # torchrl's own rollout loop: done slots are reset through '_reset' (default task, init state 0)
    env.reset(_reset_td([True, True], [0, 1], [0, 0]))
    rollout = env.rollout(4, break_when_any_done=False, auto_reset=False, tensordict=env.reset())
    assert rollout.batch_size == (N, 4)
    assert rollout["next", "step_count"][0].flatten().tolist() == [8, 16, 8, 16]
    assert rollout["next", "done"][0].flatten().tolist() == [False, True, False, True]
    assert rollout["next", "frames"].shape == (N, 4, 1, 3, 256, 256)


def test_action_errors(env):
    env.reset(_reset_td([True, True], [0, 1], [0, 0]))
    with pytest.raises(ValueError, match=r"action has shape \[2, 4, 7\]; expected \[2, 8, 7\]"):
        env.step(TensorDict({"action": torch.zeros(N, 4, 7)}, [N]))
    with pytest.raises(ValueError, match="floating dtype"):
        env.step(TensorDict({"action": torch.zeros(N, 8, 7, dtype=torch.int64)}, [N]))
    bad = torch.zeros(N, 8, 7)
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite at slot 1 sub-step 3 dim 2"):
        env.step(TensorDict({"action": bad}, [N]))
    bad[1, 3, 2] = 1.25
    with pytest.raises(ValueError, match=r"1.25 at slot 1 sub-step 3 dim 2 is outside the valid range \[-1, 1\]"):
        env.step(TensorDict({"action": bad}, [N]))


def test_reset_errors(env):
    with pytest.raises(ValueError, match=r"task_id 10 out of range for suite 'libero_object'; choose 0..9"):
        env.reset(_reset_td([True, False], [10, 0], [0, 0]))
    with pytest.raises(ValueError, match=r"init_state_id 50 out of range for 'libero_object' task 2 .*choose 0..49"):
        env.reset(_reset_td([True, True], [2, 2], [50, 0]))


def test_construction_errors():
    with pytest.raises(ValueError, match=r"unknown suite 'libero_lng'; choose one of .*libero_long \(libero_10\)"):
        make_libero_env("libero_lng", 1)
    with pytest.raises(ValueError, match="num_envs must be an int >= 1, got 0"):
        make_libero_env("libero_object", 0)
    with pytest.raises(ValueError, match=r"max_steps must be .* got 'long'"):
        make_libero_env("libero_object", 1, max_steps="long")
    with pytest.raises(ValueError, match=r"max_steps must be .* got 2.5"):  # not truncated to 2
        make_libero_env("libero_object", 1, max_steps=2.5)
    assert resolve_max_steps(np.int64(300), "libero_goal") == 300 and resolve_max_steps("suite", "libero_goal") == 300
    with pytest.raises(ValueError, match="action_token_len must be 7"):
        make_libero_env("libero_object", 1, action_token_len=6)
    with pytest.raises(ValueError, match=r"task_id 12 out of range .*choose 0..9"):
        make_libero_env("libero_object", 1, task_ids=[12])
    assert canonical_suite("libero_long") == "libero_10"


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_missing_libero_gives_install_command():
    code = (
        "import sys; sys.modules['libero'] = None\n"  # makes `libero` unimportable, as when absent
        "from srpo_rl.envs import make_libero_env\n"
        "make_libero_env('libero_object', 1)\n"
    )
    result = _run_python(code)
    assert result.returncode != 0
    assert f"LIBERO is not installed; install it with: {INSTALL_COMMAND}" in result.stderr


def test_missing_assets_give_install_command(tmp_path):
    (tmp_path / "config.yaml").write_text(f"assets: {tmp_path / 'nowhere'}\n")
    result = _run_python(
        "from srpo_rl.envs import make_libero_env\nmake_libero_env('libero_object', 1)\n",
        LIBERO_CONFIG_PATH=str(tmp_path),
    )
    assert result.returncode != 0
    assert "LIBERO assets not found" in result.stderr and INSTALL_COMMAND in result.stderr
    assert str(tmp_path / "config.yaml") in result.stderr


def test_rendering_backend_defaults_to_egl():
    code = (
        "import os\nfrom srpo_rl.envs.suites import configure_rendering\n"
        "print(configure_rendering(), os.environ['PYOPENGL_PLATFORM'])"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=120)
    assert result.stdout.split() == ["egl", "egl"]
    result = _run_python(code, MUJOCO_GL="osmesa", PYOPENGL_PLATFORM="osmesa")
    assert result.stdout.split() == ["osmesa", "osmesa"]


def test_libero_import_never_prompts_or_writes_config(tmp_path):
    # stdin closed: a prompt would fail with EOFError; HOME is empty: nothing may be written there
    env = {k: v for k, v in os.environ.items() if k != "LIBERO_CONFIG_PATH"}
    env["HOME"] = str(tmp_path)
    code = (
        "from srpo_rl.envs.suites import import_libero, suite_info\n"
        "import_libero()\nprint(suite_info('libero_90').num_tasks)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "90"
    assert list(tmp_path.iterdir()) == []


def test_robosuite_macro_file_notes_are_not_shown():
    # robosuite logs at import, in every env process, that it has no private macro file (its defaults are LIBERO's)
    code = (
        "import sys\nfrom srpo_rl.envs.suites import import_libero\n"
        "import_libero()\nfrom libero.libero.envs import OffScreenRenderEnv\nprint('robosuite' in sys.modules)"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "True"
    assert "macro" not in result.stderr, result.stderr


def test_killed_worker_is_recovered(env, caplog):
    env.reset(_reset_td([True, True], [0, 1], [0, 0], [200, 201]))
    old = env.worker_pids
    os.kill(old[1], signal.SIGKILL)
    out = _step(env)
    assert out["worker_failed"].flatten().tolist() == [False, True]
    assert out["done"].flatten().tolist() == [False, True]
    assert out["chunk_steps"].flatten().tolist() == [8, 0] and not out["frames_mask"][1].any()
    assert env.worker_pids[0] == old[0] and env.worker_pids[1] != old[1]
    assert "rollout 201 (slot 1) failed" in caplog.text and "SIGKILL" in caplog.text
    td = env.reset(_reset_td([False, True], [0, 1], [0, 4], [200, 202], base=out))
    assert not td["worker_failed"].any() and td["init_state_id"][1].item() == 4
    assert _step(env)["step_count"].flatten().tolist() == [16, 8]


def test_hung_worker_is_restarted(env, caplog):
    env.reset(_reset_td([True, True], [0, 1], [0, 0], [300, 301]))
    old = env.worker_pids
    timeout = env.step_timeout
    env.step_timeout = 5.0
    os.kill(old[0], signal.SIGSTOP)  # the worker stops answering
    try:
        out = _step(env)
    finally:
        env.step_timeout = timeout
    assert out["worker_failed"].flatten().tolist() == [True, False]
    assert out["done"][0].item() and out["chunk_steps"][1].item() == 8
    assert env.worker_pids[0] != old[0]
    assert "did not answer 'step_chunk' within 5 s" in caplog.text
    td = env.reset(_reset_td([True, True], [0, 1], [0, 0]))
    assert not td["done"].any()


@pytest.mark.parametrize(
    "suite, task_id",
    [("libero_spatial", 0), ("libero_goal", 7), ("libero_long", 3), ("libero_90", 0)],
)
def test_suite_builds_resets_and_succeeds(suite, task_id):
    info = suite_info(suite)
    env = LiberoVecEnv(suite, 1, task_ids=[task_id], max_steps=MAX_STEPS)
    try:
        for init_state_id in (0, info.num_init_states[task_id] - 1):
            td = env.reset(_reset_td([True], [task_id], [init_state_id]))
            assert td["instruction"][0] == info.instructions[task_id]
            assert td["step_count"].item() == 0 and td["observation", "image"].float().std() > 10
        env.teleport_to_goal([0])
        out = _step_one(env)
        assert out["success"].item() and out["reward"].item() == 1.0 and out["chunk_steps"].item() < 8
    finally:
        env.close()


def _step_one(env) -> TensorDict:
    return env.step(TensorDict({"action": torch.zeros(1, 8, 7)}, [1]))["next"]


def test_shared_memory_carries_the_large_reply_arrays():
    buffer = memoryview(bytearray(3 * 256 * 256 + 100))
    image = np.arange(256 * 256 * 3, dtype=np.uint8).reshape(256, 256, 3)[::-1, ::-1].transpose(2, 0, 1)
    big = np.ones((4, 256, 256, 3), dtype=np.uint8)  # does not fit after the image: through the pipe
    reply = {"image": image, "state": np.zeros(8, np.float32), "frames": big, "done": True}
    shared = _share_arrays(reply, buffer)
    assert isinstance(shared["image"], _SharedArray) and shared["image"].offset == 0
    assert shared["state"] is reply["state"] and shared["frames"] is big and shared["done"] is True
    assert len(pickle.dumps(shared["image"])) < 200  # what the pipe carries instead of 196 KB
    back = _unshare_arrays(shared, buffer)
    assert np.array_equal(back["image"], image) and back["image"].flags.c_contiguous
    buffer[:10] = bytes(10)  # the worker's next reply overwrites the block: the copy taken stays
    assert np.array_equal(back["image"], image)
    assert _share_arrays(reply, None) is reply and _unshare_arrays(reply, None) is reply


def test_replies_through_shared_memory_equal_replies_through_the_pipe():
    kwargs = {"suite": "libero_object", "max_steps": 64, "image_size": 128, "channels_first": True, "seed": 3}
    through_pipe = SimWorkers(kwargs, [2])
    through_shared = SimWorkers(kwargs, [2], reply_bytes=4 * 3 * 128 * 128)
    try:
        for command in (("reset", (5,)), ("step_chunk", (np.full((8, 7), 0.3, np.float32),))):
            a, b = through_pipe.call({0: command})[0], through_shared.call({0: command})[0]
            assert a.keys() == b.keys()
            for key in a:
                assert np.array_equal(a[key], b[key]), (command[0], key)
    finally:
        through_pipe.close()
        through_shared.close()
    with pytest.raises(ValueError, match="reply_bytes must be >= 0"):
        SimWorkers(kwargs, [2], reply_bytes=-1)


def test_workers_that_fail_to_start_leave_no_shared_memory_behind():
    # shared memory outlives the process that made it: a start that fails after making it must unlink it
    def blocks() -> set[str]:
        return {p.name for p in Path("/dev/shm").glob("psm_*")}

    before = blocks()
    unpicklable = {"suite": "libero_object", "make": lambda: None}  # spawn pickles the kwargs: the start fails
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        SimWorkers(unpicklable, [0, 1], reply_bytes=1 << 16)
    assert blocks() - before == set()


@pytest.mark.parametrize(
    "cuda_index, visible, expected",
    [(0, None, 0), (3, "", 3), (1, "4,5", 5), (0, " 6 , 2", 6), (2, "4,5", None), (0, "GPU-8a5e,GPU-77c1", None)],
)
def test_egl_device_of_a_cuda_device(cuda_index, visible, expected):
    # robosuite counts EGL devices over the whole host; CUDA_VISIBLE_DEVICES renumbers CUDA's
    assert egl_device_for(cuda_index, visible) == expected


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(entry.decode().split("=", 1) for entry in f.read().split(b"\0") if b"=" in entry)


def test_workers_render_on_the_egl_device_they_are_given(monkeypatch):
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    workers = SimWorkers({"suite": "libero_object", "image_size": 64}, [0], render_device=0)
    try:
        assert _environ(workers.pids[0])["MUJOCO_EGL_DEVICE_ID"] == "0"
        assert workers.call({0: ("reset", (0,))})[0]["image"].std() > 5  # robosuite rendered on that device
    finally:
        workers.close()
    assert "MUJOCO_EGL_DEVICE_ID" not in os.environ  # set for the children only


def test_workers_leave_the_device_to_robosuite_without_cuda_or_when_the_user_chose(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    if not torch.cuda.is_initialized():  # a CPU run never starts CUDA to choose a render device
        assert parent_render_device() is None
    monkeypatch.setenv("MUJOCO_EGL_DEVICE_ID", "0")
    assert parent_render_device() is None
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID")
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert parent_render_device() is None


def test_mesa_egl_vendor_file_is_found_by_its_library(tmp_path):
    nvidia, mesa = tmp_path / "10_nvidia.json", tmp_path / "50_mesa.json"
    nvidia.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "libEGL_nvidia.so.0"}}')
    assert mesa_egl_vendor_file([str(tmp_path / "missing"), str(tmp_path)]) is None
    mesa.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "/opt/lib/libEGL_mesa.so.0"}}')
    (tmp_path / "20_broken.json").write_text("{not json")
    assert mesa_egl_vendor_file([str(tmp_path)]) == str(mesa)


@pytest.mark.skipif(mesa_egl_vendor_file() is None, reason="Mesa's EGL library is not installed")
def test_cpu_render_slots_render_with_llvmpipe_and_the_same_pixels(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    workers = SimWorkers({"suite": "libero_object", "image_size": 256}, [0, 0], render_device=0, cpu_render_slots=1)
    try:
        assert list(workers.cpu_render_slots) == [1]
        gpu_slot, cpu_slot = _environ(workers.pids[0]), _environ(workers.pids[1])
        assert cpu_slot["__EGL_VENDOR_LIBRARY_FILENAMES"] == mesa_egl_vendor_file()
        assert cpu_slot["MUJOCO_EGL_DEVICE_ID"] == "0" and cpu_slot["LP_NUM_THREADS"] == "1"
        assert gpu_slot.get("__EGL_VENDOR_LIBRARY_FILENAMES") == os.environ.get("__EGL_VENDOR_LIBRARY_FILENAMES")
        renderers = workers.call({0: ("gl_renderer", ()), 1: ("gl_renderer", ())})
        assert renderers[1].startswith("llvmpipe"), renderers
        first = workers.call({0: ("reset", (4,)), 1: ("reset", (4,))})
        if renderers[0].startswith("llvmpipe"):  # no GPU here: both rasterize on the CPU, pixel for pixel
            assert np.array_equal(first[0]["image"], first[1]["image"])
        else:  # a GPU shades every pixel a little differently (H100: mean |diff| 1.92, max 113); the scene is the same
            assert np.abs(first[0]["image"].astype(int) - first[1]["image"]).mean() < 3.0
    finally:
        workers.close()
    with pytest.raises(ValueError, match="cpu_render_slots must be between 0 and the 1 slots, got 2"):
        SimWorkers({"suite": "libero_object"}, [0], cpu_render_slots=2)
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    with pytest.raises(ValueError, match="renders through EGL; MUJOCO_GL is 'osmesa'"):
        SimWorkers({"suite": "libero_object"}, [0], cpu_render_slots=1)


@pytest.mark.gpu
def test_workers_render_on_the_gpu_their_parent_computes_on(monkeypatch):
    monkeypatch.delenv("MUJOCO_EGL_DEVICE_ID", raising=False)
    monkeypatch.delenv("MUJOCO_GL", raising=False)  # EGL by default on Linux
    torch.cuda.init()
    expected = egl_device_for(torch.cuda.current_device(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    workers = SimWorkers({"suite": "libero_object", "image_size": 64}, [0])
    try:
        assert _environ(workers.pids[0])["MUJOCO_EGL_DEVICE_ID"] == str(expected)
        assert workers.call({0: ("reset", (0,))})[0]["image"].std() > 5
    finally:
        workers.close()
