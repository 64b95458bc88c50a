"""The fast arm-control substeps against robosuite's own, bit for bit, on real LIBERO."""

import numpy as np
import pytest

from srpo_rl.envs import LiberoSim
from srpo_rl.envs.fast_osc import FastOSCSubsteps, install, uninstall


def _physics(sim: LiberoSim) -> np.ndarray:
    data = sim.env.env.sim.data._data
    return np.concatenate([data.qpos, data.qvel, data.qacc_warmstart, data.ctrl, data.qfrc_applied])


def _start(fast: LiberoSim, stock: LiberoSim, init_state_id: int, hard: bool) -> None:
    """Resets both to ``init_state_id`` with the same constraint-solver warm start. A reset sets positions and
    velocities; the warm start carries over from whatever the simulation did before, so two simulations built
    apart differ there by about 1e-12 even with robosuite's own control (and so do their next steps)."""
    fast.reset(init_state_id, hard=hard)
    stock.reset(init_state_id, hard=hard)
    stock.env.env.sim.data._data.qacc_warmstart[:] = fast.env.env.sim.data._data.qacc_warmstart


def _chunk(rng: np.random.Generator) -> np.ndarray:
    actions = rng.uniform(-1, 1, (8, 7))
    actions[:, -1] = np.sign(actions[:, -1])  # the gripper opens and closes within chunks
    return actions


@pytest.fixture(scope="module")
def sims():
    # no settle steps in reset: the warm starts are made equal first (see _start)
    fast = LiberoSim("libero_object", task_id=0, max_steps=512, num_steps_wait=0)
    stock = LiberoSim("libero_object", task_id=0, max_steps=512, num_steps_wait=0)
    uninstall(stock.env.env)
    yield fast, stock
    fast.close()
    stock.close()


def test_the_physics_stays_bit_identical_to_robosuites(sims):
    fast, stock = sims
    assert isinstance(fast.env.env.__dict__.get("_pre_action"), FastOSCSubsteps)
    assert "_pre_action" not in stock.env.env.__dict__ and "step" not in stock.env.env.sim.__dict__
    rng = np.random.default_rng(0)
    controllers, sims = [], []  # the objects themselves: an id could be reused once one is freed
    # an episode, a soft reset to another init state, a hard one (a new simulation and robot), a task change
    for task_id, init_state_id, hard, chunks in [(0, 0, False, 6), (0, 3, False, 4), (0, 1, True, 3),
                                                  (5, 1, False, 4)]:
        if task_id != fast.task_id:
            fast.set_task(task_id)
            stock.set_task(task_id)
            uninstall(stock.env.env)
        _start(fast, stock, init_state_id, hard)
        np.testing.assert_array_equal(_physics(fast), _physics(stock))
        settle = np.tile([0.0] * 6 + [-1.0], (8, 1))  # the evaluation's settle steps, then the episode
        for actions in [settle] + [_chunk(rng) for _ in range(chunks)]:
            outs = fast.step_chunk(actions, frame_stride=4), stock.step_chunk(actions, frame_stride=4)
            np.testing.assert_array_equal(_physics(fast), _physics(stock))
            for key in ("state", "frames", "image"):
                np.testing.assert_array_equal(outs[0][key], outs[1][key], err_msg=key)
            # every observable robosuite keeps, sampled on the same substeps
            observations = fast.env.env._get_observations(), stock.env.env._get_observations()
            assert observations[0].keys() == observations[1].keys()
            for key in observations[0]:
                np.testing.assert_array_equal(observations[0][key], observations[1][key], err_msg=key)
        substeps = fast.env.env.__dict__["_pre_action"]
        controllers.append(substeps.controller)
        sims.append(substeps.sim)
    # every reset loads a new controller, a hard reset or a task change a new simulation: the substeps follow
    assert len({id(c) for c in controllers}) == 4 and len({id(s) for s in sims}) == 3
    assert fast.env.env.robots[0].controller is fast.env.env.__dict__["_pre_action"].controller
    assert fast.env.env.sim.step == substeps._step  # the simulation of the last task steps through it


def test_install_refuses_a_controller_it_would_not_reproduce(sims):
    _, stock = sims
    env = stock.env.env
    controller = env.robots[0].controller
    controller.impedance_mode = "variable"  # gains from the action: not what the fast path computes
    try:
        assert not install(env)
        assert "_pre_action" not in env.__dict__
    finally:
        controller.impedance_mode = "fixed"
    assert install(env) and install(env)  # a second install is a no-op
    uninstall(env)
    assert "_pre_action" not in env.__dict__


def test_a_bad_state_is_reset_and_stepped_as_robosuite_would(sims, tmp_path, monkeypatch):
    import mujoco

    monkeypatch.chdir(tmp_path)  # MuJoCo writes its warning to MUJOCO_LOG.TXT in the working directory
    fast, stock = sims
    _start(fast, stock, 0, hard=False)
    for sim in (fast, stock):
        sim.step_chunk(np.zeros((8, 7)))
        sim.env.env.sim.data._data.qvel[3] = np.nan
    fast.env.env.__dict__["_pre_action"].forwarded = True  # as right after robosuite's forward and control
    fast.env.env.sim.step()
    stock.env.env.sim.step()  # mj_step: the check resets the state, which is then forwarded and stepped
    np.testing.assert_array_equal(_physics(fast), _physics(stock))
    for sim in (fast, stock):
        assert sim.env.env.sim.data._data.warning.number[int(mujoco.mjtWarning.mjWARN_BADQVEL)] == 1
