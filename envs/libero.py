"""LIBERO suites as one batched TorchRL env: N simulations, one worker process each.

:func:`make_libero_env` returns a :class:`LiberoVecEnv` with ``batch_size=[num_envs]``. One
``step`` executes one action chunk ``[action_chunks_len, 7]`` per slot and stops inside it at
success or at ``max_steps``; each slot is reset on its own to a given ``(task, init state)``.

Why not torchrl's ``LiberoEnv`` / ``LiberoWrapper`` + ``MultiAction`` directly
(torchrl 0.14.1; the specs, ``EnvBase`` partial steps and partial resets are torchrl's):

- ``LiberoEnv`` binds one task to an env instance for its lifetime; SRPO moves a finished slot to
  the next pending ``(task, init state)`` at once, any task of the suite.
- ``LiberoEnv`` ``torch.load``\\ s the upstream ``*.pruned_init`` files, which libero-pro (the
  only PyPI LIBERO with assets) does not ship (it ships NPZ), and it writes a LIBERO config file
  that points at a folder without assets when ``LIBERO_CONFIG_PATH`` is set.
- robosuite renders every camera at every env step; here only the frames that are used are
  rendered (the policy's frame after each chunk and the reward frames every ``frame_stride``).
- ``MultiAction(stack_rewards=False)`` loses the success reward when success comes before the
  chunk's last sub-step: the remaining sub-steps are skipped and the outer reward is zero-filled
  (``tests/test_libero_sim.py::test_torchrl_multiaction_loses_mid_chunk_success`` shows it on a
  real LIBERO env). Here the chunk stops at the successful sub-step and reports reward 1.

Rollout ids and group ids are not made up here: the caller passes them in the reset tensordict
(``"rollout_id"``, ``"group_id"``) and every step of the episode carries them, so ids stay unique
across slots, workers and GPUs when the caller makes them so (e.g. a global counter per job).

Examples:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> from srpo_rl.envs import make_libero_env
    >>> env = make_libero_env("libero_object", num_envs=2)  # doctest: +SKIP
    >>> td = env.reset(TensorDict({
    ...     "_reset": torch.ones(2, 1, dtype=torch.bool),
    ...     "task_id": torch.tensor([[0], [3]]), "init_state_id": torch.tensor([[5], [7]]),
    ...     "rollout_id": torch.tensor([[100], [101]]), "group_id": torch.tensor([[10], [11]]),
    ... }, [2]))  # doctest: +SKIP
    >>> td["observation", "image"].shape  # doctest: +SKIP
    torch.Size([2, 3, 256, 256])
    >>> td["action"] = torch.zeros(2, 8, 7)  # doctest: +SKIP
    >>> td = env.step(td)  # doctest: +SKIP
    >>> td["next", "chunk_steps"].squeeze(-1).tolist(), td["next", "frames"].shape  # doctest: +SKIP
    ([8, 8], torch.Size([2, 1, 3, 256, 256]))
    >>> env.close()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, NonTensor, Unbounded
from torchrl.envs import EnvBase

from .chunk import action_batch, num_frames
from .slot_fields import slot_mask, slot_values
from ..jpeg import check_jpeg_quality
from .sim import ACTION_DIM
from .suites import resolve_max_steps, suite_info
from .workers import Failure, SimWorkers, WorkerError

__all__ = ["LiberoVecEnv", "make_libero_env"]

logger = logging.getLogger(__name__)

_ID_KEYS = ("task_id", "init_state_id", "rollout_id", "group_id")
_STATE_DIM = 8


class LiberoVecEnv(EnvBase):
    """A batch of LIBERO simulations of one suite, stepped one action chunk at a time.

    Args:
        suite: ``libero_spatial``, ``libero_object``, ``libero_goal``, ``libero_10`` (alias
            ``libero_long``) or ``libero_90``.
        num_envs: number of slots (one worker process each, about 2 GB of memory each).

    Keyword Args:
        max_steps: episode length in env steps, settle steps excluded. ``None`` = 512 (the SRPO
            recipe); ``"suite"`` = the OpenVLA-OFT evaluation length of the suite (spatial 220,
            object 280, goal 300, libero_10 520, libero_90 400).
        num_steps_wait: uncounted no-op settle steps after each reset. Defaults to 10.
        action_chunks_len: env steps per action chunk. Defaults to 8.
        action_token_len: action dimensions; LIBERO actions have 7. Defaults to 7.
        frame_stride: keep a reward frame every ``frame_stride`` env steps (1 = every step, as
            siiRL records); ``None`` = one per chunk. The last executed step's frame is always kept, and
            ``frames_step`` says which step each frame shows (the reward samples them in time).
        image_size: square camera resolution. Defaults to 256.
        wrist_image: also return ``("observation", "wrist_image")``. Defaults to ``False``.
        proprio: also return ``("observation", "state")`` (eef pos, eef axis-angle, gripper qpos).
        task_ids: initial task of each slot; defaults to slot ``i`` on task ``i % num_tasks``.
        step_timeout: seconds a chunk step or a reset may take before the worker is restarted.
        build_timeout: seconds building a task's simulation may take.
        seed: numpy's seed in the simulators, set before every reset: LIBERO draws the fixtures' placement
            from it (the init states set the objects, not the fixtures). The reference seeds 0. Defaults to 0.
        jpeg_quality: the reference's JPEG round trip at this quality (95) for the policy's camera
            images, done in the worker processes, where it costs the policy's process no time; pair it with
            ``OpenVLAOFTPolicy(jpeg_quality=None)`` (the same bytes as the policy's own round trip). The
            reward ``frames`` stay as rendered. ``None`` (the default): raw images.
        cpu_render_slots: how many slots (the last ones) render with Mesa's llvmpipe on the CPU instead of the
            GPU (:class:`~srpo_rl.envs.workers.SimWorkers`): on a GPU whose graphics are slow beside CUDA work
            (an H100 loses about 0.8 ms of the policy's time a frame) this trades 78-124 ms of a core a frame
            for it, and the pixels differ a little from the GPU's. It did not pay with the 7B: on an H200 with
            32 envs, 16 CPU-render slots ran 0.97x the rollout of all-GPU frames (those slots come back later,
            so the policy's batches halve). Defaults to 0.
        legacy_look: draw the scenes' textures as MuJoCo <= 3.3.2 drew them, the look the published
            checkpoints were trained on, on a MuJoCo from 3.3.3 on (which draws them darker); a no-op on 3.3.2
            (:func:`~srpo_rl.envs.render_fidelity.apply_legacy_look`, ``docs/mujoco_rendering.md``). Defaults
            to ``False``.
        device: device of the returned tensors. Defaults to CPU.

    Reset: ``env.reset(td)`` resets the slots where ``td["_reset"]`` is true (all when absent) to
    ``td["task_id"]`` / ``td["init_state_id"]`` and stamps ``td["rollout_id"]`` /
    ``td["group_id"]`` (all int64 ``[N, 1]``). Missing ids default to the slot's current task
    (initially ``i % num_tasks``), init state 0, and rollout / group id -1. A reset on the slot's
    current task is a soft reset (0.1 s); a new task rebuilds that slot's simulation (2-8 s). A reset
    slot's ``frames[:, 0]`` is its first reward frame, as rendered (``frames_mask[:, 0]`` true): the
    observation's ``image`` is the same frame, JPEG-decoded when ``jpeg_quality`` is set.
    ``frames_step`` (int64 ``[N, K]``) is the episode step each reward frame shows: 0 for the reset
    frame, ``t`` for the frame after env step ``t``.

    Step: ``td["action"]`` float ``[N, action_chunks_len, 7]`` in ``[-1, 1]``; an optional
    ``td["_step"]`` bool ``[N]`` steps only those slots (the others report their last data with
    ``chunk_steps`` 0). A slot whose episode ended must be reset before it steps again. A worker
    that crashes or hangs is restarted on its task; its rollout ends with ``done`` and
    ``worker_failed`` set, and the other slots' results are returned as usual.

    Asynchronous steps: :meth:`step_send` starts a step (and resets) of some slots and returns at
    once; :meth:`step_recv` waits for the oldest such round, :meth:`step_recv_ready` collects whichever
    slots are done; so a caller can run the policy on some slots while the others simulate
    (``srpo_rl.rollout.collect_rollouts(..., overlap=True)``).
    """

    def __init__(
        self,
        suite: str,
        num_envs: int,
        *,
        max_steps: int | str | None = None,
        num_steps_wait: int = 10,
        action_chunks_len: int = 8,
        action_token_len: int = ACTION_DIM,
        frame_stride: int | None = None,
        image_size: int = 256,
        wrist_image: bool = False,
        proprio: bool = False,
        task_ids: Sequence[int] | None = None,
        step_timeout: float = 120.0,
        build_timeout: float = 600.0,
        seed: int = 0,
        jpeg_quality: int | None = None,
        cpu_render_slots: int = 0,
        legacy_look: bool = False,
        device: torch.device | str | None = None,
    ):
        info = suite_info(suite)  # validates the name and imports LIBERO (clear errors)
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        max_steps = resolve_max_steps(max_steps, info.name)
        if action_token_len != ACTION_DIM:
            raise ValueError(
                f"action_token_len must be {ACTION_DIM} for LIBERO (6-D pose delta + gripper), got {action_token_len}"
            )
        if action_chunks_len < 1:
            raise ValueError(f"action_chunks_len must be >= 1, got {action_chunks_len}")
        if frame_stride is not None and frame_stride < 1:
            raise ValueError(f"frame_stride must be None (one frame per chunk) or >= 1, got {frame_stride}")
        if task_ids is None:
            task_ids = [i % info.num_tasks for i in range(num_envs)]
        if len(task_ids) != num_envs:
            raise ValueError(f"task_ids has {len(task_ids)} entries; expected num_envs={num_envs}")
        task_ids = [info.check_task(t) for t in task_ids]
        super().__init__(batch_size=torch.Size([num_envs]), device=device)
        self.suite = info.name
        self.info = info
        self.num_envs = num_envs
        self.max_steps = int(max_steps)
        self.num_steps_wait = int(num_steps_wait)
        self.action_chunks_len = int(action_chunks_len)
        self.frame_stride = self.action_chunks_len if frame_stride is None else int(frame_stride)
        self.num_frames = num_frames(self.action_chunks_len, self.frame_stride)
        self.image_size = int(image_size)
        self.wrist_image = bool(wrist_image)
        self.proprio = bool(proprio)
        self._seed = int(seed)
        self._make_specs()
        self._init_slots(task_ids)
        self._workers = None
        self._sent: deque = deque()  # (stepped slots, reset requests, reset ids) of each step_send
        self._resetting: dict[int, tuple[tuple[int, int], dict]] = {}  # slot -> (request, ids) of reset_send
        self.is_closed = False
        sim_kwargs = dict(
            suite=self.suite,
            max_steps=self.max_steps,
            num_steps_wait=self.num_steps_wait,
            image_size=self.image_size,
            wrist_image=self.wrist_image,
            channels_first=True,
            seed=self._seed,
            jpeg_quality=check_jpeg_quality(jpeg_quality),
            legacy_look=bool(legacy_look),
        )
        # a reply's frames (observation, wrist, reward frames) through shared memory, not the pipe
        frame_bytes = 3 * self.image_size**2
        reply_bytes = (1 + self.wrist_image + self.num_frames) * frame_bytes + (1 << 16)
        self._workers = SimWorkers(sim_kwargs, task_ids, timeout=step_timeout, build_timeout=build_timeout,
                                   reply_bytes=reply_bytes, cpu_render_slots=cpu_render_slots)

    # -- specs ------------------------------------------------------------------------------------
    def _make_specs(self) -> None:
        n, size, k = self.num_envs, self.image_size, self.num_frames
        flag = lambda *shape: Categorical(2, shape=(n, *shape), dtype=torch.bool)  # noqa: E731
        count = lambda: Unbounded(shape=(n, 1), dtype=torch.int64)  # noqa: E731
        observation = Composite(image=Unbounded(shape=(n, 3, size, size), dtype=torch.uint8), shape=(n,))
        if self.wrist_image:
            observation["wrist_image"] = Unbounded(shape=(n, 3, size, size), dtype=torch.uint8)
        if self.proprio:
            observation["state"] = Unbounded(shape=(n, _STATE_DIM), dtype=torch.float32)
        self.observation_spec = Composite(
            observation=observation,
            instruction=NonTensor(shape=(n,), example_data=self.info.instructions[0]),
            success=flag(1),
            step_count=count(),
            chunk_steps=count(),
            frames=Unbounded(shape=(n, k, 3, size, size), dtype=torch.uint8),
            frames_mask=flag(k),
            frames_step=Unbounded(shape=(n, k), dtype=torch.int64),
            worker_failed=flag(1),
            **{key: count() for key in _ID_KEYS},
            shape=(n,),
        )
        self.action_spec = Bounded(
            low=-1.0, high=1.0, shape=(n, self.action_chunks_len, ACTION_DIM), dtype=torch.float32
        )
        self.reward_spec = Bounded(low=0.0, high=1.0, shape=(n, 1), dtype=torch.float32)
        self.done_spec = Composite(done=flag(1), terminated=flag(1), truncated=flag(1), shape=(n,))

    def _init_slots(self, task_ids: list[int]) -> None:
        # the latest data of every slot, returned for slots that a call does not touch
        n, size = self.num_envs, self.image_size
        self._slots = TensorDict(
            {
                "image": torch.zeros(n, 3, size, size, dtype=torch.uint8),
                "wrist_image": torch.zeros(n, 3, size, size, dtype=torch.uint8),
                "state": torch.zeros(n, _STATE_DIM),
                "success": torch.zeros(n, 1, dtype=torch.bool),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
                "truncated": torch.zeros(n, 1, dtype=torch.bool),
                "done": torch.ones(n, 1, dtype=torch.bool),  # not started: must be reset
                "step_count": torch.zeros(n, 1, dtype=torch.int64),
                "worker_failed": torch.zeros(n, 1, dtype=torch.bool),
                "task_id": torch.tensor(task_ids, dtype=torch.int64).unsqueeze(-1),
                "init_state_id": torch.zeros(n, 1, dtype=torch.int64),
                "rollout_id": torch.full((n, 1), -1, dtype=torch.int64),
                "group_id": torch.full((n, 1), -1, dtype=torch.int64),
            },
            batch_size=[n],
        )

    # -- torchrl API ------------------------------------------------------------------------------
    def _set_seed(self, seed: int | None) -> None:
        # Nothing to seed here: episodes are set by (task, init state, actions), and the simulators' numpy seed,
        # which places LIBERO's fixtures at every reset, is the constructor's (``seed``: the reference's 0 for
        # every episode), so that a collector seeding its envs does not move the scene away from the reference's
        return None

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        n = self.num_envs
        requests, ids = self._reset_requests(tensordict, slot_mask(tensordict, "_reset", n))
        self._check_idle(requests)
        timeout = self._reset_timeout(requests)
        results = self._workers.call(self._reset_commands(requests), timeout=timeout)
        results = self._apply_resets(requests, ids, results)
        return self._output(chunk_steps=torch.zeros(n, 1, dtype=torch.int64), resets=results)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        slots, actions = self._step_slots(tensordict, slot_mask(tensordict, "_step", self.num_envs))
        self._check_idle(slots)
        commands = self._step_commands(slots, actions)
        return self._step_output(slots, self._workers.call(commands))

    # -- asynchronous steps -----------------------------------------------------------------------
    def step_send(self, tensordict: TensorDictBase) -> None:
        """Starts a step of some slots and returns at once; :meth:`step_recv` returns its result.

        Meant for overlapping the simulation of some slots with work on others (e.g. the policy on
        the other half of the batch): slots with a command in flight cannot be sent another one,
        every other slot can. Results come back in the order of the sends.

        Reads ``td["_step"]`` (bool ``[N]``: the slots that execute their ``td["action"]`` chunk)
        and, optionally, ``td["_reset"]`` (bool ``[N]`` or ``[N, 1]``) with the reset ids of
        :meth:`reset`: those slots start a new episode in the same round instead of stepping, so
        that a finished slot does not hold up the others. The two masks must not overlap; without
        ``"_step"``, every slot not reset steps.

        Examples:
            >>> env = make_libero_env("libero_object", num_envs=4)  # doctest: +SKIP
            >>> _ = env.reset()  # doctest: +SKIP
            >>> half = torch.tensor([True, True, False, False])  # doctest: +SKIP
            >>> env.step_send(TensorDict({"action": torch.zeros(4, 8, 7), "_step": half}, [4]))  # doctest: +SKIP
            >>> env.step_send(TensorDict({"action": torch.zeros(4, 8, 7), "_step": ~half}, [4]))  # doctest: +SKIP
            >>> first = env.step_recv()  # slots 0 and 1, while 2 and 3 may still simulate  # doctest: +SKIP
            >>> first["chunk_steps"].flatten().tolist()  # doctest: +SKIP
            [8, 8, 0, 0]
        """
        n = self.num_envs
        no_slot = torch.zeros(n, dtype=torch.bool)
        reset_mask = slot_mask(tensordict, "_reset", n) if "_reset" in tensordict.keys() else no_slot
        step_mask = slot_mask(tensordict, "_step", n) if "_step" in tensordict.keys() else ~reset_mask
        both = torch.nonzero(step_mask & reset_mask).flatten().tolist()
        if both:
            raise ValueError(f"slots {both} are in both '_step' and '_reset'; a slot either steps or resets")
        requests, ids = self._reset_requests(tensordict, reset_mask)
        slots, actions = self._step_slots(tensordict, step_mask) if step_mask.any() else ([], None)
        self._check_idle([*slots, *requests])
        self._workers.send(self._step_commands(slots, actions))
        self._workers.send(self._reset_commands(requests), timeout=self._reset_timeout(requests))
        self._sent.append((slots, requests, ids))

    def step_recv(self) -> TensorDictBase:
        """Waits for the oldest :meth:`step_send` and returns its result.

        The result has the layout of ``env.step(td)["next"]``: stepped slots carry their new
        observation, reward, done flags and frames; reset slots their first observation
        (``step_count`` 0, ``chunk_steps`` 0, no frames); every other slot its latest known data
        with ``chunk_steps`` 0.
        """
        if not self._sent:
            raise RuntimeError("step_recv() without a pending step_send()")
        slots, requests, ids = self._sent.popleft()
        results = self._workers.recv([*slots, *requests])
        resets = self._apply_resets(requests, ids, {s: results[s] for s in requests})
        return self._step_proc_data(self._step_output(slots, {s: results[s] for s in slots}, resets=resets))

    def step_recv_ready(self, timeout: float | None = None, wake: Sequence[Any] = ()) -> TensorDictBase | None:
        """Collects every slot of any pending :meth:`step_send` whose result is in, in whatever order they
        finish, waiting up to ``timeout`` seconds for one (``None``: as long as it takes); ``None`` when none is.
        The wait also ends when one of ``wake`` is readable (anything :func:`multiprocessing.connection.wait`
        takes, e.g. the read end of a pipe another thread writes to when its work is done), so a caller can
        sleep on the simulations and on its own threads at once instead of polling either.

        For an asynchronous pool of slots: the caller decides for the slots as they come back instead of
        waiting for a whole round, so one slow slot (a reset, a long chunk) holds up no other. The result has
        the layout of :meth:`step_recv`, plus ``"_ready"`` (bool ``[N, 1]``) marking the collected slots
        (stepped or reset); slots still simulating stay in flight for a later call.

        Examples:
            >>> env = make_libero_env("libero_object", num_envs=2)  # doctest: +SKIP
            >>> _ = env.reset()  # doctest: +SKIP
            >>> env.step_send(TensorDict({"action": torch.zeros(2, 8, 7), "_step": torch.tensor([True, False])}, [2]))  # doctest: +SKIP
            >>> env.step_send(TensorDict({"action": torch.zeros(2, 8, 7), "_step": torch.tensor([False, True])}, [2]))  # doctest: +SKIP
            >>> out = env.step_recv_ready()  # the first slot to finish, maybe both  # doctest: +SKIP
            >>> out["_ready"].flatten().tolist()  # doctest: +SKIP
            [False, True]
        """
        flying = [s for slots, requests, _ in self._sent for s in (*slots, *requests)]
        if not flying:
            raise RuntimeError("step_recv_ready() without a pending step_send()")
        done = set(self._workers.ready(flying, timeout, wake))
        if not done:
            return None
        results = self._workers.recv(sorted(done))
        stepped, kept, resets = [], deque(), {}
        for slots, requests, ids in self._sent:
            finished = {s: r for s, r in requests.items() if s in done}
            resets.update(self._apply_resets(finished, ids, {s: results[s] for s in finished}))
            stepped += [s for s in slots if s in done]
            rest = ([s for s in slots if s not in done], {s: r for s, r in requests.items() if s not in done}, ids)
            if rest[0] or rest[1]:
                kept.append(rest)
        self._sent = kept
        out = self._step_proc_data(self._step_output(stepped, {s: results[s] for s in stepped}, resets=resets))
        mask = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        mask[sorted(done)] = True
        out.set("_ready", mask.to(out.device))
        return out

    def reset_send(self, tensordict: TensorDictBase) -> None:
        """Starts the resets of the ``td["_reset"]`` slots (ids as in :meth:`reset`) and returns at once.

        For resets that should hold up nothing else: a task change rebuilds the simulation (seconds), during
        which :meth:`step_send` rounds of the other slots go on. :meth:`reset_recv` collects them.

        Examples:
            >>> env = make_libero_env("libero_object", num_envs=2)  # doctest: +SKIP
            >>> _ = env.reset()  # doctest: +SKIP
            >>> env.reset_send(TensorDict({"_reset": torch.tensor([[True], [False]]),  # doctest: +SKIP
            ...                            "task_id": torch.tensor([[3], [0]])}, [2]))
            >>> env.step_send(TensorDict({"action": torch.zeros(2, 8, 7),  # doctest: +SKIP
            ...                           "_step": torch.tensor([False, True])}, [2]))
            >>> env.step_recv()["chunk_steps"].flatten().tolist()  # slot 1 stepped meanwhile  # doctest: +SKIP
            [0, 8]
            >>> env.reset_recv(timeout=None)["_reset"].flatten().tolist()  # doctest: +SKIP
            [True, False]
        """
        n = self.num_envs
        requests, ids = self._reset_requests(tensordict, slot_mask(tensordict, "_reset", n))
        self._check_idle(requests)
        self._workers.send(self._reset_commands(requests), timeout=self._reset_timeout(requests))
        self._resetting.update({slot: (request, ids) for slot, request in requests.items()})

    def reset_recv(self, timeout: float | None = 0.0) -> TensorDictBase | None:
        """Collects the :meth:`reset_send` resets that have finished, waiting up to ``timeout`` seconds for
        one (``None``: as long as it takes); ``None`` when none has.

        The result has the layout of :meth:`reset`'s output, with ``"_reset"`` (bool ``[N, 1]``) marking
        the slots whose reset finished: their first observation and ids.
        """
        if not self._resetting:
            raise RuntimeError("reset_recv() without a pending reset_send()")
        done = self._workers.ready(list(self._resetting), timeout)
        if not done:
            return None
        results = self._workers.recv(done)
        resets = {}
        for slot in done:
            request, ids = self._resetting.pop(slot)
            resets.update(self._apply_resets({slot: request}, ids, {slot: results[slot]}))
        out = self._output(chunk_steps=torch.zeros(self.num_envs, 1, dtype=torch.int64), resets=resets)
        mask = torch.zeros(self.num_envs, 1, dtype=torch.bool)
        mask[done] = True
        out.set("_reset", mask.to(out.device))
        return out

    def discard_pending(self) -> None:
        """Waits for every step and reset in flight and drops their results, so that the env takes commands again
        (after an error part-way through a rollout: :func:`srpo_rl.rollout.collect_rollouts` calls it).

        Each wait is bounded by its command's timeout (a hung worker is restarted). The slots whose results were
        dropped are marked done: their next command must be a reset.
        """
        slots = self._workers.in_flight  # the workers' own record: also a command sent whose bookkeeping here failed
        # a reset that completes rebuilt its worker for the task it was sent: record that task, or the next reset
        # of the old one would be taken for a soft one (and go out in a round, where its rebuild holds up the others)
        tasks = {slot: task for _, requests, _ in self._sent for slot, (task, _) in requests.items()}
        tasks |= {slot: task for slot, ((task, _), _) in self._resetting.items()}
        self._sent.clear()
        self._resetting.clear()
        if slots:
            for slot, result in self._workers.recv(slots).items():
                if slot in tasks and not isinstance(result, Failure):
                    self._workers.set_task(slot, tasks[slot])
            self._slots["done"][slots] = True

    @property
    def pending_resets(self) -> list[int]:
        """Slots whose :meth:`reset_send` reset :meth:`reset_recv` has not collected yet."""
        return sorted(self._resetting)

    @property
    def pending_steps(self) -> int:
        """Number of :meth:`step_send` calls whose result :meth:`step_recv` has not returned yet."""
        return len(self._sent)

    # -- commands ---------------------------------------------------------------------------------
    def _check_idle(self, slots) -> None:
        busy = sorted({s for sent, requests, _ in self._sent for s in (*sent, *requests)} & set(slots))
        if busy:
            raise RuntimeError(f"slots {busy} have a step in flight (step_send); step_recv() it first")
        resetting = sorted(set(self._resetting) & set(slots))
        if resetting:
            raise RuntimeError(f"slots {resetting} have a reset in flight (reset_send); reset_recv() it first")

    def _reset_requests(self, tensordict: TensorDictBase | None, mask: torch.Tensor):
        n = self.num_envs
        ids = {key: slot_values(tensordict, key, n) for key in _ID_KEYS}
        requests = {}
        for slot in torch.nonzero(mask).flatten().tolist():
            task = int(ids["task_id"][slot]) if ids["task_id"] is not None else int(self._slots["task_id"][slot])
            init = int(ids["init_state_id"][slot]) if ids["init_state_id"] is not None else 0
            self.info.check_init_state(task, init)  # raises before any worker is touched
            requests[slot] = (task, init)
        return requests, ids

    def _reset_timeout(self, requests: dict[int, tuple[int, int]]) -> float:
        changes_task = any(task != self._workers.task_ids[slot] for slot, (task, _) in requests.items())
        return self._workers.build_timeout if changes_task else self._workers.timeout

    @staticmethod
    def _reset_commands(requests: dict[int, tuple[int, int]]) -> dict:
        return {slot: ("reset", (init,), {"task_id": task}) for slot, (task, init) in requests.items()}

    def _apply_resets(self, requests: dict[int, tuple[int, int]], ids: dict, results: dict) -> dict:
        """Writes the reset slots' first observations and ids; returns their results (a failed reset is
        retried once on the restarted worker; a second failure raises)."""
        retry = {s: command for s, command in self._reset_commands(requests).items() if isinstance(results[s], Failure)}
        if retry:  # once, on the restarted worker
            results = {**results, **self._workers.call(retry, timeout=self._workers.build_timeout)}
        for slot, (task, init) in requests.items():
            result = results[slot]
            if isinstance(result, Failure):
                raise WorkerError(f"slot {slot} could not reset to task {task}, init state {init}: {result.reason}")
            self._workers.set_task(slot, task)
            self._write(slot, result)
            row = self._slots[slot]
            row["task_id"].fill_(task)
            row["init_state_id"].fill_(init)
            for key in ("rollout_id", "group_id"):
                row[key].fill_(int(ids[key][slot]) if ids[key] is not None else -1)
            row["worker_failed"].fill_(False)
        return {slot: results[slot] for slot in requests}

    def _step_slots(self, tensordict: TensorDictBase, mask: torch.Tensor) -> tuple[list[int], np.ndarray]:
        actions = action_batch(tensordict.get("action", None), self.num_envs, self.action_chunks_len, ACTION_DIM)
        slots = torch.nonzero(mask).flatten().tolist()
        over = [s for s in slots if bool(self._slots["done"][s])]
        if over:
            raise RuntimeError(
                f"slots {over} have no running episode (it ended, or they were never reset); reset them "
                f"(td['_reset']) before stepping, or leave them out of td['_step']"
            )
        return slots, actions

    def _step_commands(self, slots: list[int], actions: np.ndarray | None) -> dict:
        return {s: ("step_chunk", (actions[s],), {"frame_stride": self.frame_stride}) for s in slots}

    def _step_output(self, slots: list[int], results: dict, resets: dict | None = None) -> TensorDictBase:
        """The output of a call that stepped ``slots`` (``results``: their chunk results) and reset the slots
        of ``resets`` (their reset results, whose one frame is the first reward frame)."""
        n = self.num_envs
        frames = torch.zeros(n, self.num_frames, 3, self.image_size, self.image_size, dtype=torch.uint8)
        frames_mask = torch.zeros(n, self.num_frames, dtype=torch.bool)
        frames_step = torch.zeros(n, self.num_frames, dtype=torch.int64)
        chunk_steps = torch.zeros(n, 1, dtype=torch.int64)
        reward = torch.zeros(n, 1)
        for slot in slots:
            result = results[slot]
            row = self._slots[slot]
            if isinstance(result, Failure):
                logger.error("rollout %d (slot %d) failed: %s", int(row["rollout_id"]), slot, result.reason)
                row["worker_failed"].fill_(True)
                row["success"].fill_(False)
                row["terminated"].fill_(False)
                row["truncated"].fill_(True)
                row["done"].fill_(True)
                continue
            self._write(slot, result)
            frames[slot] = torch.from_numpy(result["frames"])
            frames_mask[slot] = torch.from_numpy(result["frames_mask"])
            frames_step[slot] = torch.from_numpy(result["frames_step"])
            chunk_steps[slot] = result["chunk_steps"]
            reward[slot] = float(result["success"])
        out = self._output(chunk_steps=chunk_steps, frames=(frames, frames_mask, frames_step), resets=resets)
        out["reward"] = reward.to(self.device)
        return out

    # -- helpers ----------------------------------------------------------------------------------
    def _write(self, slot: int, result: dict) -> None:
        row = self._slots[slot]
        row["image"].copy_(torch.from_numpy(result["image"]))
        if self.wrist_image:
            row["wrist_image"].copy_(torch.from_numpy(result["wrist_image"]))
        row["state"].copy_(torch.from_numpy(result["state"]))
        row["success"].fill_(bool(result["success"]))
        row["terminated"].fill_(bool(result["success"]))
        row["truncated"].fill_(bool(result["truncated"]))
        row["done"].fill_(bool(result["done"]))
        row["step_count"].fill_(int(result["step_count"]))

    def _output(self, *, chunk_steps: torch.Tensor, frames=None, resets: dict | None = None) -> TensorDict:
        """Every slot's latest data, with ``frames`` (the stepped slots' reward frames) and the first reward
        frame of each slot in ``resets`` (reset results) at ``frames[:, 0]``."""
        slots, n = self._slots, self.num_envs
        if frames is None:
            frames = (
                torch.zeros(n, self.num_frames, 3, self.image_size, self.image_size, dtype=torch.uint8),
                torch.zeros(n, self.num_frames, dtype=torch.bool),
                torch.zeros(n, self.num_frames, dtype=torch.int64),
            )
        for slot, result in (resets or {}).items():
            first = torch.from_numpy(result["frames"])
            frames[0][slot, : len(first)] = first
            frames[1][slot, : len(first)] = torch.from_numpy(result["frames_mask"])
            frames[2][slot, : len(first)] = torch.from_numpy(result["frames_step"])
        observation = {"image": slots["image"].clone()}
        if self.wrist_image:
            observation["wrist_image"] = slots["wrist_image"].clone()
        if self.proprio:
            observation["state"] = slots["state"].clone()
        tasks = slots["task_id"].flatten().tolist()
        out = TensorDict(
            {
                "observation": observation,
                "instruction": NonTensorStack.from_list([self.info.instructions[t] for t in tasks]),
                "chunk_steps": chunk_steps,
                "frames": frames[0],
                "frames_mask": frames[1],
                "frames_step": frames[2],
                **slots.select(
                    "success", "terminated", "truncated", "done", "step_count", "worker_failed", *_ID_KEYS
                ).clone(),
            },
            batch_size=[n],
        )
        return out.to(self.device) if self.device is not None and self.device != out.device else out

    # -- extras -----------------------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """Process id of each slot's simulation worker."""
        return self._workers.pids

    @property
    def task_ids(self) -> list[int]:
        """The task each slot's simulation is built for."""
        return self._workers.task_ids

    @property
    def worker_time(self) -> dict[str, float]:
        """Seconds the workers spent simulating, per command (``step_chunk``, ``reset``, ...), summed over slots."""
        return dict(self._workers.busy_time)

    @property
    def step_timeout(self) -> float:
        """Seconds a chunk step or a reset may take before the worker counts as hung."""
        return self._workers.timeout

    @step_timeout.setter
    def step_timeout(self, seconds: float) -> None:
        self._workers.timeout = float(seconds)

    def teleport_to_goal(self, slots: Sequence[int]) -> None:
        """Moves the given slots' scenes into their goal configuration (tests and benchmarks).

        See :meth:`srpo_rl.envs.sim.LiberoSim.teleport_to_goal`.
        """
        results = self._workers.call({int(s): ("teleport_to_goal", ()) for s in slots})
        failed = {s: r.reason for s, r in results.items() if isinstance(r, Failure)}
        if failed:
            raise WorkerError(f"teleport_to_goal failed on slots {failed}")

    def close(self, *, raise_if_closed: bool = True) -> None:
        """Stops the worker processes."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        super().close(raise_if_closed=raise_if_closed)


def make_libero_env(suite: str, num_envs: int, **kwargs: Any) -> LiberoVecEnv:
    """Builds a :class:`LiberoVecEnv`: ``num_envs`` LIBERO simulations of ``suite``, batched.

    Keyword arguments go to :class:`LiberoVecEnv`, which documents them all (``max_steps``,
    ``num_steps_wait``, ``action_chunks_len``, ``frame_stride``, ``image_size``, ``wrist_image``,
    ``task_ids``, ``step_timeout``, ``seed``, ...). ``max_steps=None`` uses the SRPO recipe's 512 env
    steps and ``max_steps="suite"`` the OpenVLA-OFT evaluation length of the suite.

    Raises:
        ValueError: unknown suite, ``num_envs < 1`` or another bad argument (the message lists the
            valid values).
        ImportError: LIBERO or its assets are missing; the message gives the install command.

    Examples:
        >>> env = make_libero_env("libero_long", num_envs=2, max_steps="suite")  # doctest: +SKIP
        >>> env.max_steps  # doctest: +SKIP
        520
    """
    return LiberoVecEnv(suite, num_envs, **kwargs)
