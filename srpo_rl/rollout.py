"""Env-slot rollout scheduling: run a list of rollout requests on a batched env, refilling slots at once.

torchrl's ``Collector`` steps every env of a batch and resets a finished env to whatever its own reset
logic picks; SRPO needs each rollout to start from a *given* (task, init state) with ids that identify its
GRPO group, and a finished slot to take the next pending request immediately. So this module is a thin
loop over :func:`srpo_rl.envs.make_libero_env`'s per-slot reset and partial step (``"_step"``):

- a slot runs one :class:`RolloutRequest`; the policy is queried only for active slots and only those
  slots are stepped (no padding steps, no queries for finished envs);
- a finished slot takes the next pending request at once, of the task it already has loaded where it can
  so that its reset stays soft (each task is due a share of the slots in proportion to its rollouts left:
  only a task above its share gives a slot to one below); the reset rides in the next round of steps (the
  env's ``step_send``), so it holds up no other slot; a task change rebuilds the simulation (seconds) and
  goes out on its own (the env's ``reset_send``): the slot rejoins the rounds when it is done;
- the policy process waits for the GPU asleep (:func:`srpo_rl.cuda_wait.wait_for_stream`), not spinning
  on a core;
- each finished episode becomes one row of the trajectory batch (layout in :func:`collect_rollouts`);
- with ``overlap=True`` the slots form an asynchronous pool: the env's ``step_recv_ready`` returns the slots
  whose chunk is done, in whatever order they finish, and the policy decides for them in one batch while the
  others simulate, so neither the GPU nor the CPUs wait for the other and no slot waits for a slower one;
  the policy runs on a thread of its own, so taking in the returning chunks overlaps the forward, and a
  policy with ``launch`` / ``finish`` (:class:`~srpo_rl.policy.OpenVLAOFTPolicy`) has each batch queued on the
  GPU right behind the decision in flight (``overlap="halves"``: two fixed halves in ping-pong instead);
- with the policy on an accelerator, torch's CPU ops in this process run on one thread during the rollout
  (:func:`single_cpu_thread`): idle OpenMP threads would otherwise spin on the simulation workers' cores;
- on a CUDA device the policy's work goes to a stream of higher priority than every default one
  (:data:`POLICY_STREAM_PRIORITY`), so that work sharing the GPU on an ordinary stream (the reward's
  :class:`~srpo_rl.rewards.BackgroundEmbedder`) is meant to fill the GPU around the forwards rather than
  delay them (measured with the 7B on an H100, 16 envs: the same rollout speed as at equal priority).

Example:
    >>> import tempfile, torch
    >>> from srpo_rl.envs import make_libero_env
    >>> from srpo_rl.models.openvla_oft import write_tiny_checkpoint
    >>> from srpo_rl.policy import OpenVLAOFTPolicy
    >>> from srpo_rl.rollout import collect_rollouts, group_requests
    >>> path = tempfile.mkdtemp()
    >>> _ = write_tiny_checkpoint(path)
    >>> policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_object", dtype=torch.float32)
    >>> env = make_libero_env("libero_object", num_envs=2, max_steps=16)
    >>> requests = group_requests([(0, 0), (1, 0)], rollouts_per_group=2)
    >>> trajs, stats = collect_rollouts(env, policy, requests, overlap=True)
    >>> trajs.batch_size, trajs["steps"].batch_size
    (torch.Size([4]), torch.Size([4, 2]))
    >>> env.close()
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.connection
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm.auto import tqdm

from .cuda_wait import wait_for_stream
from .distributed import gathered

logger = logging.getLogger(__name__)

__all__ = ["POLICY_KEYS", "POLICY_STREAM_PRIORITY", "RolloutRequest", "RolloutStats", "collect_rollouts", "group_requests",
           "single_cpu_thread"]

# What a step record keeps from the policy output (training recomputes log-probs from these).
POLICY_KEYS = ("policy_image", "prompt_ids", "prompt_mask", "action_tokens", "action_log_prob", "action")
# What it keeps from the env's ("next", ...) output (the reward frames and how far the chunk got).
NEXT_KEYS = ("frames", "frames_mask", "chunk_steps")
# ... and, where the env gives it, the episode step each reward frame shows (the reward samples frames in time)
FRAMES_STEP_KEY = "frames_step"
OBS_KEYS = (("observation", "image"), ("observation", "wrist_image"), ("observation", "state"))
# CUDA priority of the stream the policy runs on during a rollout (lower is higher; torch's default streams
# have 0, the lowest): when the GPU has work of both, its scheduler dispatches the policy's blocks first.
POLICY_STREAM_PRIORITY = -1


@functools.cache
def _policy_stream(device: torch.device, priority: int) -> torch.cuda.Stream:
    """One stream per device and priority for every rollout: the caching allocator keeps the memory it frees
    for its own stream, so a new stream per rollout would strand the last one's cache."""
    return torch.cuda.Stream(device, priority=priority)


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
    if group_id_stride < 1:  # 0 would give every group the same id
        raise ValueError(f"group_id_stride must be >= 1 (the number of ranks), got {group_id_stride}")
    requests = []
    for i, (task_id, init_state_id) in enumerate(prompts):
        group_id = first_group_id + i * group_id_stride
        for k in range(rollouts_per_group):
            requests.append(RolloutRequest(int(task_id), int(init_state_id), group_id * rollouts_per_group + k, group_id))
    return requests


@dataclass
class RolloutStats:
    """Counters and wall times of one :func:`collect_rollouts` call (seconds).

    ``env_time`` is the time the loop spent in env calls (sending rounds and waiting for their results),
    ``policy_time`` in policy calls, ``reset_time`` in synchronous resets (those of an env without
    ``step_send``; with one, resets ride in the env rounds or, when they change the task, go out on their
    own, and count as ``env_time`` only while the loop waits for them). ``policy_cpu_time`` is the CPU time of
    the thread that ran the policy calls (preprocessing, kernel launches, decoding; not its JPEG helper
    threads), ``loop_cpu_time`` that of the loop around them (taking in the env's results, bookkeeping,
    resets): where the policy runs on a thread of its own (``overlap=True``) the two compete for the GIL.
    ``policy_gpu_time`` is the GPU time of the policy's calls by their CUDA events (``gpu_ms()`` of what
    ``launch`` returns, as :class:`~srpo_rl.policy.LaunchedDecision` reports; 0 for a policy that reports
    none): against ``wall_time`` it says how busy the rollout kept the GPU, and so what room is left beside it
    (for the reward's embedding, :class:`~srpo_rl.rewards.BackgroundEmbedder`). ``restarts`` counts the
    rollouts that started over after their env crashed.
    """

    trajectories: int = 0
    env_steps: int = 0
    decisions: int = 0
    policy_calls: int = 0
    wall_time: float = 0.0
    env_time: float = 0.0
    policy_time: float = 0.0
    reset_time: float = 0.0
    policy_cpu_time: float = 0.0
    loop_cpu_time: float = 0.0
    policy_gpu_time: float = 0.0
    restarts: int = 0
    videos: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def env_steps_per_second(self) -> float:
        """Environment steps over the wall time of the rollout."""
        return self.env_steps / max(self.wall_time, 1e-9)

    def as_dict(self) -> dict[str, float]:
        """The counts and timings as plain numbers (for logging and the benchmarks' JSON)."""
        return {
            "trajectories": self.trajectories,
            "env_steps": self.env_steps,
            "decisions": self.decisions,
            "policy_calls": self.policy_calls,
            "env_steps_per_s": self.env_steps_per_second,
            "time_wall": self.wall_time,
            "time_env": self.env_time,
            "time_policy": self.policy_time,
            "time_reset": self.reset_time,
            "cpu_policy": self.policy_cpu_time,
            "cpu_loop": self.loop_cpu_time,
            "time_policy_gpu": self.policy_gpu_time,
            "restarts": self.restarts,
        }


class _Slot:
    """Book-keeping of one env slot: its request, its loaded task, its latest observation, its steps."""

    def __init__(self) -> None:
        self.request: RolloutRequest | None = None
        self.started = False  # the request's reset is done (its first observation is in ``obs``)
        self.rebuilding = False  # its reset changes the task: sent on its own (reset_send), in no round
        self.task_id: int | None = None
        self.obs: dict = {}
        self.steps: list[TensorDictBase | None] = []
        self.decision: TensorDictBase | None = None  # the policy output of the chunk in flight
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
        # copies: a view of one row would keep the whole [num_slots, ...] result alive
        obs = {key: td.get(key)[s].clone() for key in OBS_KEYS if key in td.keys(True)}
        obs["instruction"] = instructions[s]
        slots[s].obs = obs


def _policy_input(observations: list[dict]) -> TensorDict:
    """The policy's input batch from the slots' latest observations (``_Slot.obs``)."""
    data = {key: torch.stack([obs[key] for obs in observations]) for key in observations[0] if key != "instruction"}
    td = TensorDict(data, batch_size=[len(observations)])
    td.set_non_tensor("instruction", [obs["instruction"] for obs in observations])
    return td


class _PolicyThread:
    """The pool's policy, on a thread that decides for batches of slots back to back.

    The loop hands over each slot whose observation is in (:meth:`submit`); the thread takes every slot
    handed over since it last looked as its next batch and hands each decision back (:meth:`pop`), writing
    to :attr:`signal`'s pipe so that the loop can sleep on the simulations and on the decisions at once. A
    policy error comes out of :meth:`pop` in the loop's thread. Leaving the ``with`` block stops the thread.

    With a policy that queues its work (``launch`` returns before the GPU is done, ``finish`` waits), the
    next batch is launched shortly before the decision in flight is due, so that it runs right behind it:
    the GPU does not wait for this thread to decode one decision and to prepare the next. When it is due
    follows from the GPU time of earlier batches (:class:`_ForwardClock`); a batch takes the slots that are
    back by then, and a slot back later waits for the batch after.
    """

    def __init__(self, launch: Callable[[TensorDict], Any], finish: Callable[[Any], TensorDictBase],
                 clock: _ForwardClock | None = None) -> None:
        self._launch, self._finish = launch, finish
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (slot, observation), or None: stop
        self._decided: deque = deque()  # (slots, decision or the policy's exception)
        self._clock = clock or _ForwardClock()
        self.signal, self._signal_sender = multiprocessing.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._run, name="policy", daemon=True)

    def __enter__(self) -> _PolicyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._inbox.put(None)
        self._thread.join()  # before the pipe closes: the thread never writes to a closed pipe
        self.signal.close()
        self._signal_sender.close()

    def submit(self, slot: int, observation: dict) -> None:
        """Queues ``slot`` for the next batch (its ``observation`` is read by the policy thread)."""
        self._inbox.put((slot, observation))

    def pop(self) -> tuple[list[int], TensorDictBase | None]:
        """The oldest decision not yet popped, ``(slots, decision)``, or ``([], None)`` if none is done."""
        if not self._decided:
            return [], None
        slots, decision = self._decided.popleft()
        self.signal.recv_bytes()  # its signal, so that the next wait sleeps again
        if isinstance(decision, BaseException):
            raise decision
        return slots, decision

    def wait(self) -> None:
        """Sleeps until a decision is done."""
        multiprocessing.connection.wait([self.signal])

    def _take(self, block: bool) -> list | None:
        """Every slot handed over so far (waiting for one if ``block``); None when told to stop."""
        batch = []
        with contextlib.suppress(queue.Empty):
            batch.append(self._inbox.get(block=block))
            while True:
                batch.append(self._inbox.get_nowait())
        return None if None in batch else batch

    def _run(self) -> None:
        in_flight = None  # (slots, launched, when it is due on the clock's time or None)
        while True:
            if in_flight is not None:
                self._clock.sleep_until_launch(in_flight[2], in_flight[1])
            batch = self._take(block=in_flight is None)
            try:
                launched = None
                if batch:
                    t0 = self._clock.now()
                    launched = ([slot for slot, _ in batch], self._launch(_policy_input([obs for _, obs in batch])))
                    launched_at = self._clock.now()
                    self._clock.launched(launched_at - t0)
                if in_flight is not None:
                    slots, decision = in_flight[:2]
                    getattr(decision, "wait", lambda: None)()  # done on the GPU: what it took tells the clock
                    self._clock.finished(decision, len(slots))
                    self._hand_back(slots, self._finish(decision))
            except BaseException as error:  # noqa: BLE001 - handed to the loop, which raises it
                self._hand_back([], error)
                return
            if batch is None:
                return
            in_flight = None if launched is None else (*launched, self._clock.due(len(launched[0]), launched_at))

    def _hand_back(self, slots: list[int], decision) -> None:
        self._decided.append((slots, decision))
        self._signal_sender.send_bytes(b"")


class _ForwardClock:
    """When a launched batch is due: the GPU time of earlier batches of its size (or per row of any size).

    Knows nothing until a launched decision reports its GPU time (``gpu_ms()``, as
    :class:`~srpo_rl.policy.LaunchedDecision` does): until then, and for a policy that does not, nothing
    is predicted and the next batch is launched as soon as there is one.

    A measurement spans the launch as well, so a forward whose host side was slow reads long: the first
    batch of a size compiles (``model.compile_blocks``) or captures its CUDA graph, seconds against tens of
    milliseconds. Trusted, such a figure makes the launch thread sleep that long behind every later batch of
    the size, and the GPU idle, until the running average forgets it. So the first measurement of each batch size
    is dropped, a later one counts at most ``_MAX_GROWTH`` times the estimate it updates, and the sleep ends
    when the decision in flight is done, whatever the estimate said.
    """

    _SMOOTHING = 0.2  # weight of the newest measurement in the running averages
    _MARGIN_S = 0.001  # wake this much before the launch must start
    _MAX_GROWTH = 2.0  # a measurement counts at most this many times the estimate it updates
    _POLL_S = 0.002  # while asleep, how often the decision in flight is checked

    def __init__(self, now: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.now, self.sleep = now, sleep  # the clock and the sleep it uses (a test gives its own)
        self._by_rows: dict[int, float] = {}  # rows -> seconds of GPU time
        self._per_row: float | None = None
        self._launch_s: float | None = None
        self._free_at = 0.0  # when the GPU was last seen done with a decision
        self._seen_rows: set[int] = set()  # batch sizes whose first (untrusted) measurement has come in

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self._SMOOTHING * (new - old)

    def launched(self, seconds: float) -> None:
        """A launch took ``seconds`` of this thread's time."""
        self._launch_s = self._average(self._launch_s, seconds)

    def finished(self, launched, rows: int) -> None:
        """``launched`` (``rows`` rows) is done on the GPU, now: its GPU time updates the estimates."""
        self._free_at = self.now()
        gpu_ms = getattr(launched, "gpu_ms", lambda: None)()
        if gpu_ms is None:
            return
        if rows not in self._seen_rows:  # a new batch size: compiled or captured in this very call
            self._seen_rows.add(rows)
            return
        seconds = gpu_ms / 1e3
        expected = self._estimate(rows)
        if expected is not None:
            seconds = min(seconds, self._MAX_GROWTH * expected)
        self._by_rows[rows] = self._average(self._by_rows.get(rows), seconds)
        self._per_row = self._average(self._per_row, seconds / rows)

    def _estimate(self, rows: int) -> float | None:
        """Seconds of GPU time a batch of ``rows`` takes: measured at that size, else per row (None: unknown)."""
        return self._by_rows.get(rows, None if self._per_row is None else self._per_row * rows)

    def due(self, rows: int, launched_at: float) -> float | None:
        """When a batch of ``rows`` launched at ``launched_at`` should be done (None: unknown). It starts on
        the GPU when the decision before it is done, or at its launch if that came later."""
        seconds = self._estimate(rows)
        return None if seconds is None else max(self._free_at, launched_at) + seconds

    def sleep_until_launch(self, due: float | None, in_flight=None) -> None:
        """Sleeps until the next batch must be launched to run right behind the one due at ``due``, or until
        ``in_flight`` (that batch's decision, with ``is_done()``) is done, if sooner."""
        if due is None:
            return
        wake = due - (self._launch_s or 0.0) - self._MARGIN_S
        is_done = getattr(in_flight, "is_done", None)
        while (wait := wake - self.now()) > 0:
            if is_done is None:
                self.sleep(wait)
                return
            if is_done():
                return
            self.sleep(min(wait, self._POLL_S))


def _reset_fields(num_slots: int, chosen: dict[int, RolloutRequest]) -> dict[str, torch.Tensor]:
    """``_reset`` mask and the request ids of the chosen slots, in the env's reset layout."""
    names = ("task_id", "init_state_id", "rollout_id", "group_id")
    fields = {k: torch.zeros(num_slots, 1, dtype=torch.long) for k in names}
    reset = torch.zeros(num_slots, 1, dtype=torch.bool)
    for s, request in chosen.items():
        reset[s] = True
        for name, value in fields.items():
            value[s] = getattr(request, name)
    return {"_reset": reset, **fields}


class _Rollout:
    """The state of one :func:`collect_rollouts` call: slots, pending requests, finished rows, stats."""

    def __init__(self, env, policy, requests, *, keep_steps: bool, record_videos: int, progress, on_finished,
                 policy_keys: Sequence[str]) -> None:
        self.env, self.policy, self.keep_steps, self.on_finished = env, policy, keep_steps, on_finished
        self.policy_keys = tuple(policy_keys)
        self.async_env = hasattr(env, "step_send") and hasattr(env, "step_recv")
        self.async_resets = self.async_env and hasattr(env, "reset_send") and hasattr(env, "reset_recv")
        self.num_slots = env.batch_size[0]
        self.slots = [_Slot() for _ in range(self.num_slots)]
        for slot, task in zip(self.slots, getattr(env, "task_ids", [None] * self.num_slots)):
            slot.task_id = task  # the tasks the env has loaded: the first requests prefer them too
        self.pending = list(requests)
        self.video_ids = {r.rollout_id for r in requests[:record_videos]}
        self.finished: dict[int, TensorDict] = {}
        self.restarted: set[int] = set()
        self.stats = RolloutStats()
        self.device = next((p.device for p in policy.parameters()), torch.device("cpu"))
        self.two_phase = callable(getattr(policy, "launch", None)) and callable(getattr(policy, "finish", None))
        self.stream = _policy_stream(self.device, POLICY_STREAM_PRIORITY) if self.device.type == "cuda" else None
        desc = progress if isinstance(progress, str) else "rollout"
        self.bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)

    # -- episodes ---------------------------------------------------------------------------------
    def assign(self, slot_ids: Iterable[int]) -> dict[int, RolloutRequest]:
        """Gives each of the free ``slot_ids`` the next pending request, keeping its loaded task where it can.

        Every task with rollouts left (pending or running) is due a share of the slots in proportion to
        them. A slot keeps its task (a soft reset) while that task has a pending request, unless the task
        has at least one slot more than its share and another task has less than its own: then the slot
        moves there (a rebuild: seconds), so that no task is left to a few slots at the end while the
        others' slots idle or rebuild all at once. A slot whose task has nothing pending takes the task
        furthest below its share. Within a task, the oldest request goes first.
        """
        chosen = {}
        pending, slots_on, share = self._shares()
        for s in slot_ids:
            if not self.pending:
                break
            slot = self.slots[s]
            task = slot.task_id
            starved = [t for t in pending if pending[t] and t != task and slots_on[t] < share[t]]
            surplus = slots_on[task] - 1 >= share.get(task, 0.0)
            if pending.get(task) and not (surplus and starved):
                new_task = task
            else:
                # furthest below its share; among equals the task of the oldest request (dicts keep order)
                new_task = max(starved or [t for t in pending if pending[t]],
                               key=lambda t: share[t] - slots_on[t])
            chosen[s] = request = _pick_request(self.pending, new_task)
            pending[new_task] -= 1
            if new_task != task:
                slots_on[task] -= 1
                slots_on[new_task] += 1
            slot.rebuilding = self.async_resets and task is not None and new_task != task
            slot.request, slot.task_id, slot.started = request, new_task, False
        return dict(sorted(chosen.items()))

    def _shares(self) -> tuple[Counter, Counter, dict[int, float]]:
        """Pending requests per task (in order of their oldest), slots per loaded task, and each task's share
        of the slots (in proportion to its pending and running rollouts)."""
        pending = Counter(request.task_id for request in self.pending)
        left = pending + Counter(slot.request.task_id for slot in self.slots if slot.request is not None)
        slots_on = Counter(slot.task_id for slot in self.slots if slot.task_id is not None)
        total = left.total()
        share = {t: n * self.num_slots / total for t, n in left.items()} if total else {}
        return pending, slots_on, share

    def begin(self, td: TensorDictBase, slot_ids: list[int]) -> None:
        """Reads the first observation of the slots just reset, and their first reward frame: the env's
        ``frames[:, 0]`` where it gives one (as rendered: the observation may be JPEG-decoded), else the
        observation's image."""
        _read_obs(td, slot_ids, self.slots)
        has_frames = "frames_mask" in td.keys()
        for s in slot_ids:
            slot = self.slots[s]
            slot.started, slot.steps = True, []
            first = td.get("frames")[s, 0] if has_frames and bool(td.get("frames_mask")[s, 0]) else None
            slot.initial_frame = (first if first is not None else slot.obs[("observation", "image")]).clone()
            slot.video = [slot.initial_frame] if slot.request.rollout_id in self.video_ids else None

    def start(self) -> None:
        """Gives every slot its first request. With an asynchronous env nothing waits here: the task changes
        go out on their own (:meth:`rebuild`), the soft resets with the first rounds."""
        if self.async_env:
            self.rebuild(list(self.assign(range(self.num_slots))))
        else:
            self.reset(list(range(self.num_slots)))

    def reset(self, slot_ids: list[int]) -> None:
        """Synchronous reset of ``slot_ids`` to their next requests."""
        t0 = time.perf_counter()
        chosen = self.assign(slot_ids)
        if chosen:
            td = TensorDict(_reset_fields(self.num_slots, chosen), batch_size=[self.num_slots])
            td = self.env.reset(td.update(self.idle_flags()))
            self.begin(td, list(chosen))
            for s in chosen:
                self.slots[s].rebuilding = False
        self.stats.reset_time += time.perf_counter() - t0

    def idle_flags(self) -> TensorDictBase:
        """The env's done flags, true for every slot that runs no episode. torchrl asks a partial reset's
        input for the other slots' flags (it warns at every reset without them); nothing reads them back."""
        flags = self.env.full_done_spec.zero()
        idle = torch.ones(self.num_slots, dtype=torch.bool)
        idle[self.running(range(self.num_slots))] = False
        for key in flags.keys(True, True):
            flags.get(key)[idle] = True
        return flags

    def rebuild(self, slot_ids: list[int]) -> None:
        """Starts the task-changing resets of ``slot_ids`` on their own: no round waits for a rebuild."""
        chosen = {s: self.slots[s].request for s in slot_ids if self.slots[s].rebuilding}
        if chosen:
            t0 = time.perf_counter()
            self.env.reset_send(TensorDict(_reset_fields(self.num_slots, chosen), batch_size=[self.num_slots]))
            self.stats.env_time += time.perf_counter() - t0

    def collect_rebuilds(self, wait: bool) -> None:
        """Starts the slots whose rebuild finished (waiting for one when ``wait``)."""
        if not self.async_resets or not self.env.pending_resets:
            return
        t0 = time.perf_counter()
        td = self.env.reset_recv(timeout=None if wait else 0.0)
        self.stats.env_time += time.perf_counter() - t0
        if td is not None:
            done = td.get("_reset").reshape(-1).nonzero().flatten().tolist()
            self.begin(td, done)
            for s in done:
                self.slots[s].rebuilding = False

    # -- decisions --------------------------------------------------------------------------------
    def decide(self, active: list[int]) -> torch.Tensor:
        """The policy's decision for the active slots (kept on each slot); the env's actions
        ``[num_slots, chunk, dims]``."""
        return self.apply_decision(active, self.call_policy(_policy_input([self.slots[s].obs for s in active])))

    def call_policy(self, td: TensorDict) -> TensorDictBase:
        """One timed policy call on a batch of observations; the decision comes back on the CPU."""
        return self.finish_policy(self.launch_policy(td))

    def launch_policy(self, td: TensorDict):
        """Starts a timed policy call: a policy with ``launch`` / ``finish`` (:class:`~srpo_rl.policy.OpenVLAOFTPolicy`)
        only queues it on its device; any other runs it here. :meth:`finish_policy` takes the result.

        Thread-safe against the loop's bookkeeping (the pool runs it on its policy thread): it touches only
        its input and the policy. Grad mode is per thread, so it is switched off here.
        """
        with self._timed_policy():
            # from pinned memory the copy is queued behind the GPU's work; from pageable memory it may wait for it
            on_gpu = self.device.type == "cuda"  # (pin_memory on this thread: its default spawns a thread pool)
            td = td.pin_memory(num_threads=0).to(self.device, non_blocking=True) if on_gpu else td.to(self.device)
            self.stats.policy_calls += 1
            return self.policy.launch(td) if self.two_phase else self.policy(td)

    def finish_policy(self, launched) -> TensorDictBase:
        """The decision of a :meth:`launch_policy` call, on the CPU."""
        with self._timed_policy():
            if self.two_phase:
                decision = self.policy.finish(launched)  # done on the GPU: its events have fired
                self.stats.policy_gpu_time += (getattr(launched, "gpu_ms", lambda: None)() or 0.0) / 1e3
                return decision
            wait_for_stream()  # asleep, not spinning on a core the simulation needs
            return launched.to("cpu")

    @contextlib.contextmanager
    def _timed_policy(self):
        t0, cpu = time.perf_counter(), time.thread_time()
        # a new thread starts on CUDA device 0: make the policy's device current (a rank's GPU); launch and
        # finish run on the one stream, so a decision's copies, events and waits are all on it
        on_device = torch.cuda.device(self.device) if self.stream is not None else contextlib.nullcontext()
        on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with torch.no_grad(), on_device, on_stream:
            yield
        self.stats.policy_time += time.perf_counter() - t0
        self.stats.policy_cpu_time += time.thread_time() - cpu

    def apply_decision(self, active: list[int], decision: TensorDictBase) -> torch.Tensor:
        """Keeps each slot's part of ``decision``; returns the env's ``[num_slots, chunk, dims]`` actions."""
        action = torch.zeros(self.num_slots, *decision["action"].shape[1:], dtype=torch.float32)
        action[active] = decision["action"].float()
        if self.keep_steps:
            kept = decision.select(*(k for k in self.policy_keys if k in decision.keys()))
            for i, s in enumerate(active):
                self.slots[s].decision = kept[i]
        return action

    def record(self, active: list[int], nxt: TensorDictBase) -> list[int]:
        """Stores one executed decision per active slot; returns the slots whose episode ended."""
        _read_obs(nxt, active, self.slots)
        done = nxt.get("done").view(-1)
        chunk_steps = nxt.get("chunk_steps").view(-1)
        self.stats.decisions += len(active)
        self.stats.env_steps += int(chunk_steps[active].sum())
        timed = (FRAMES_STEP_KEY,) if FRAMES_STEP_KEY in nxt.keys() else ()
        crashed = nxt.get("worker_failed").view(-1) if "worker_failed" in nxt.keys() else None
        ended = []
        for s in active:
            slot = self.slots[s]
            if self.keep_steps:
                record, slot.decision = slot.decision, None
                # a copy: a view of slot s would keep every slot's frames of this result alive until the
                # episode ends (at 32 slots, 6 MB a result for one frame a chunk)
                env_out = nxt[s].select(*NEXT_KEYS, *timed).clone()
                env_out.set("chunk_steps", env_out.get("chunk_steps").reshape(()))  # env's [1] -> per step
                record.set("next", env_out)
                slot.steps.append(record)
            else:
                slot.steps.append(None)
            if slot.video is not None:
                frames, mask = nxt.get("frames")[s], nxt.get("frames_mask")[s]
                slot.video.extend(frames[mask])
            if done[s] and crashed is not None and bool(crashed[s]) and self._restart(slot):
                ended.append(s)
                continue
            if done[s]:
                self.finished[slot.request.rollout_id] = row = _trajectory(slot, nxt, s, self.keep_steps)
                if self.on_finished is not None:
                    self.on_finished(row)
                if slot.video is not None:
                    self.stats.videos[slot.request.rollout_id] = torch.stack(slot.video)
                slot.request, slot.started = None, False
                ended.append(s)
                self.bar.update(1)
        return ended

    def _restart(self, slot: _Slot) -> bool:
        """Puts the request of a slot whose env crashed (``worker_failed``) back in front of the pending ones:
        it starts over on the restarted env, its steps so far dropped, so a crash costs no group. Once: a
        rollout that crashes again ends as ``failed`` (the sampler drops its group)."""
        request = slot.request
        if request.rollout_id in self.restarted:
            return False
        self.restarted.add(request.rollout_id)
        self.pending.insert(0, request)
        self.stats.restarts += 1
        logger.warning("rollout %d crashed its env; it starts over", request.rollout_id)
        slot.request, slot.started, slot.steps, slot.video = None, False, [], None
        return True

    def running(self, slot_ids) -> list[int]:
        return [s for s in slot_ids if self.slots[s].request is not None and self.slots[s].started]

    # -- loop -------------------------------------------------------------------------------------
    def run(self, num_groups: int) -> None:
        """Rounds of decide -> step for ``num_groups`` groups of slots, each round sent while the others run.

        A group's round is one ``step_send``: its running slots execute their chunk and its finished slots
        reset to their next request, so a reset holds up no other slot. With one group the policy then
        waits for the round; with two they alternate in ping-pong (``step_recv`` returns the rounds in the
        order they were sent), so one group's policy runs while the other simulates. A reset that changes
        the task rebuilds the simulation (seconds): it goes out on its own (``reset_send``) and the slot
        joins its group's rounds once it is done. An env without ``step_send`` runs one group
        synchronously and resets finished slots before the next decision.
        """
        self.start()
        size = -(-self.num_slots // num_groups)
        groups = [range(start, min(start + size, self.num_slots)) for start in range(0, self.num_slots, size)]
        in_flight: deque = deque()
        for group in groups:
            self._send(group, in_flight)
        while in_flight or any(slot.rebuilding for slot in self.slots):
            received = None
            if in_flight:
                received, active, resets, nxt = in_flight.popleft()
                if nxt is None:
                    t0 = time.perf_counter()
                    nxt = self.env.step_recv()
                    self.stats.env_time += time.perf_counter() - t0
                self.received(nxt, active, resets)
            self.collect_rebuilds(wait=False)
            self._send_idle(groups, in_flight, first=received)
            if not in_flight and any(slot.rebuilding for slot in self.slots):  # nothing to do but wait
                self.collect_rebuilds(wait=True)
                self._send_idle(groups, in_flight, first=None)

    def run_pool(self) -> None:
        """An asynchronous pool of slots: the policy decides for the slots as their chunks come back.

        Every slot simulates on its own: ``step_recv_ready`` returns the slots whose chunk (or reset) is
        done, in whatever order they finish, and the policy decides for all of them in one batch while the
        others go on simulating. So no slot waits for a slower one (a reset, a rebuild, a long chunk), the
        batch grows by itself when the policy is the slower side and shrinks when the simulation is, and
        with more slots than CPU cores the cores stay busy while the policy runs.

        The policy runs on a thread of its own (:class:`_PolicyThread`) that takes the next batch itself as
        soon as a decision is done: the slots that came back meanwhile, handed over by this loop. So the GPU
        does not wait for this loop to finish what it is doing (taking in a chunk, stacking a finished
        trajectory) before its next forward starts. (On an H200, 32 envs, with the loop handing each batch
        over when it saw the last decision, the policy thread sat idle 10.5 ms between two calls of 108 ms.)
        A policy with ``launch`` / ``finish`` has its next batch queued on the GPU right behind the decision in
        flight. This loop sends each decided chunk as soon as it sees the decision.
        """
        self.start()
        flying: set[int] = set()  # slots simulating: a chunk or a reset in flight
        deciding: set[int] = set()  # slots handed to the policy thread, their decision not yet sent
        with _PolicyThread(self.launch_policy, self.finish_policy) as policy:
            while True:
                for s in self.running(range(self.num_slots)):
                    if s not in flying and s not in deciding:
                        policy.submit(s, self.slots[s].obs)
                        deciding.add(s)
                decided_slots, decision = policy.pop()
                deciding.difference_update(decided_slots)
                # the decided chunks, and the soft resets (they go out at once, decision or not)
                self._step_decided(decided_slots, decision, flying)
                if flying:
                    self._take_ready(flying, wake=(policy.signal,) if deciding else ())
                    self.collect_rebuilds(wait=False)
                elif deciding:  # nothing simulates: wait for the decision
                    policy.wait()
                elif any(slot.rebuilding for slot in self.slots):
                    self.collect_rebuilds(wait=True)
                else:  # nothing simulates, decides or rebuilds: the end
                    return

    def _take_ready(self, flying: set[int], wake: tuple = ()) -> None:
        """Takes in the slots whose chunk or reset is back, waiting for one or for one of ``wake``."""
        t0 = time.perf_counter()
        nxt = self.env.step_recv_ready(timeout=None, wake=wake)
        self.stats.env_time += time.perf_counter() - t0
        if nxt is not None:  # None: woken without a result
            got = nxt.get("_ready").reshape(-1).nonzero().flatten().tolist()
            flying.difference_update(got)
            started = [s for s in got if self.slots[s].started]
            self.received(nxt, started, [s for s in got if s not in started])

    def _step_decided(self, active: list[int], decision: TensorDictBase | None, flying: set[int]) -> None:
        """Sends the chunks of ``active`` (decided in ``decision``) with the resets of the waiting slots."""
        waiting = [s for s in range(self.num_slots) if s not in flying and self.slots[s].request is not None
                   and not self.slots[s].started and not self.slots[s].rebuilding]
        if not active and not waiting:
            return
        td = TensorDict(_reset_fields(self.num_slots, {s: self.slots[s].request for s in waiting}),
                        batch_size=[self.num_slots])
        if active:
            td.set("action", self.apply_decision(active, decision))
        step_mask = torch.zeros(self.num_slots, dtype=torch.bool)
        step_mask[active] = True
        td.set("_step", step_mask)
        t0 = time.perf_counter()
        self.env.step_send(td)
        self.stats.env_time += time.perf_counter() - t0
        flying.update(active, waiting)

    def received(self, nxt: TensorDictBase, active: list[int], resets: list[int]) -> None:
        """Takes in a round's results: the first observations of ``resets``, the chunks of ``active``."""
        self.begin(nxt, resets)
        ended = self.record(active, nxt) if active else []
        if self.async_env:
            self.rebuild(list(self.assign(ended)))  # the others' resets go with the slot's next round
        elif ended:
            self.reset(ended)

    def _send_idle(self, groups: list[range], in_flight: deque, first: range | None) -> None:
        """Sends a round for every group with none in flight, ``first`` (the group just received) first."""
        sent = {id(entry[0]) for entry in in_flight}
        for group in sorted(groups, key=lambda g: g is not first):
            if id(group) not in sent:
                self._send(group, in_flight)

    def _send(self, group: range, in_flight: deque) -> None:
        active, resets, nxt = self._step_round(group)
        if active or resets:
            in_flight.append((group, active, resets, nxt))

    def _step_round(self, slot_ids) -> tuple[list[int], list[int], TensorDictBase | None]:
        """Decides for the running ``slot_ids`` and sends their chunks, with the resets of the waiting ones.

        Returns the stepped and the reset slots, and the round's result when the env steps synchronously.
        """
        active = self.running(slot_ids)
        waiting = [s for s in slot_ids if self.slots[s].request is not None and not self.slots[s].started
                   and not self.slots[s].rebuilding]
        chosen = {s: self.slots[s].request for s in waiting}  # assigned when their last episode ended
        if not active and not chosen:
            return [], [], None
        td = TensorDict(_reset_fields(self.num_slots, chosen), batch_size=[self.num_slots])
        if active:
            td.set("action", self.decide(active))
        step_mask = torch.zeros(self.num_slots, dtype=torch.bool)
        step_mask[active] = True
        td.set("_step", step_mask)
        t0 = time.perf_counter()
        nxt = None
        if self.async_env:
            self.env.step_send(td)
        else:  # only running slots here: finished ones were reset synchronously
            nxt = self.env.step(td.exclude("_reset")).get("next")
        self.stats.env_time += time.perf_counter() - t0
        return active, list(chosen), nxt

    def result(self, requests: Sequence[RolloutRequest], start: float) -> tuple[TensorDict, RolloutStats]:
        self.bar.close()
        self.stats.trajectories = len(self.finished)
        self.stats.wall_time = time.perf_counter() - start
        rows = [self.finished[r.rollout_id] for r in requests]
        return _stack_trajectories(rows, self.keep_steps), self.stats


def collect_rollouts(
    env: EnvBase,
    policy: TensorDictModuleBase,
    requests: Sequence[RolloutRequest],
    *,
    exploration_type: ExplorationType = ExplorationType.RANDOM,
    keep_steps: bool = True,
    record_videos: int = 0,
    progress: bool | str = False,
    overlap: bool | str = False,
    on_finished: Callable[[TensorDict], None] | None = None,
    policy_keys: Sequence[str] = POLICY_KEYS,
) -> tuple[TensorDict, RolloutStats]:
    """Runs every request to the end of its episode and returns the trajectory batch.

    Args:
        env: a batched slot env (:func:`srpo_rl.envs.make_libero_env` or one with the same reset/step contract).
        policy: writes ``action`` (plus tokens and log-probs) from ``("observation", "image")`` and ``instruction``;
            one with ``launch(td)`` / ``finish(launched)`` methods is called in those two halves (the pool queues
            the next batch behind the last before it finishes the last).
        requests: the episodes to run, any number (more than ``env.batch_size`` is the normal case).
        exploration_type: ``RANDOM`` samples (training), ``DETERMINISTIC`` takes the argmax (validation).
        keep_steps: keep the per-decision ``"steps"`` (needed for training; validation needs only outcomes).
        record_videos: keep the full frame sequence of the first ``record_videos`` requests in ``stats.videos``.
        progress: show a progress bar (``True`` or its description).
        overlap: run the slots as an asynchronous pool: the policy decides for the slots whose chunk came
            back while the others simulate, so neither the GPU nor the CPUs wait for the other. Pays off
            when the slots outnumber the CPU cores (e.g. 32 envs on 16 cores: the cores stay busy while the
            policy runs). ``"halves"``: two fixed halves in ping-pong instead (each half waits for its
            slowest slot). Needs an env with ``step_send`` / ``step_recv_ready``
            (:class:`~srpo_rl.envs.LiberoVecEnv`). The trajectories are the same as without it (same
            requests, same ids, same order); only the timing differs. Default ``False``, so that any
            batched TorchRL env works; the example's ``rollout.overlap`` turns the pool on.
        on_finished: called with each trajectory (a row of the returned batch, batch size ``[]``) as soon as
            its episode ends, while the other rollouts go on: e.g. to embed its video for the reward on a
            side CUDA stream, in the time the GPU would wait for the simulation
            (:class:`srpo_rl.rewards.BackgroundEmbedder`).
        policy_keys: the policy outputs each step record keeps (training recomputes log-probs from them).

    Returns:
        ``(trajectories, stats)``: ``trajectories`` has batch size ``[len(requests)]`` in request order with
        ``rollout_id``, ``group_id``, ``task_id``, ``init_state_id``, ``success``, ``truncated``, ``failed``,
        ``num_steps``, ``num_chunks``, ``initial_frame`` and, with ``keep_steps``, ``"steps"`` of batch size
        ``[len(requests), T]`` (``T`` = the longest episode in chunks) with the policy outputs, ``"mask"`` and
        ``("next", "frames" | "frames_mask" | "chunk_steps")`` (and ``("next", "frames_step")`` where the env
        gives it).
    """
    if not requests:
        raise ValueError("collect_rollouts needs at least one request")
    if not (overlap is True or overlap is False or overlap == "halves"):  # 1 == True: not a mode
        raise ValueError(f"overlap must be False, True (asynchronous pool) or 'halves'; got {overlap!r}")
    if overlap and not all(hasattr(env, name) for name in ("step_send", "step_recv", "step_recv_ready")):
        raise ValueError(
            f"overlap={overlap!r} needs an env with step_send/step_recv_ready (e.g. srpo_rl.envs.LiberoVecEnv); "
            f"{type(env).__name__} has none: pass overlap=False"
        )
    start = time.perf_counter()
    run = _Rollout(env, policy, requests, keep_steps=keep_steps, record_videos=record_videos, progress=progress,
                   on_finished=on_finished, policy_keys=policy_keys)
    cpu = time.thread_time()
    # an FSDP2-sharded policy's weights gathered once: its forwards, different in number on every rank, are
    # then no collectives
    try:
        with gathered(policy) if isinstance(policy, torch.nn.Module) else contextlib.nullcontext():
            if run.stream is not None:  # the policy reads weights the caller's stream may still be writing
                run.stream.wait_stream(torch.cuda.current_stream(run.device))
            with set_exploration_type(exploration_type), torch.no_grad(), single_cpu_thread(run.device.type != "cpu"):
                if overlap == "halves":
                    run.run(num_groups=2)
                elif overlap:
                    run.run_pool()
                else:
                    run.run(num_groups=1)
            if run.stream is not None:  # and what comes after the rollout runs after its GPU work
                torch.cuda.current_stream(run.device).wait_stream(run.stream)
    except BaseException:
        run.bar.close()
        _discard_pending(env)  # steps and resets still in flight would refuse the env's next rollout
        raise
    run.stats.loop_cpu_time = time.thread_time() - cpu
    if overlap is not True:  # the policy ran on this thread: its time is in both counters
        run.stats.loop_cpu_time -= run.stats.policy_cpu_time
    return run.result(requests, start)


def _discard_pending(env: EnvBase) -> None:
    """Lets an env with commands in flight (``discard_pending``, e.g. :class:`~srpo_rl.envs.LiberoVecEnv`) take
    commands again; a failure to do so is logged, not raised over the error being handled."""
    discard = getattr(env, "discard_pending", None)
    if discard is None or getattr(env, "is_closed", False):
        return
    try:
        discard()
    except Exception:  # noqa: BLE001 - the rollout's own error is the one to raise
        logger.exception("could not collect the env's steps in flight after the rollout failed")


@contextlib.contextmanager
def single_cpu_thread(enabled: bool = True) -> Iterator[None]:
    """Keeps torch's CPU ops in this process to one thread (while ``enabled``), then restores the count.

    Used around a rollout whose policy runs on an accelerator: this process then does little CPU work
    (stacking observations, copying results), but each such op wakes torch's OpenMP pool, whose threads
    spin for milliseconds after it at the default niceness, and with one op every few milliseconds they
    spin all the time, on the cores the (niced) simulation workers need. ``benchmarks/openmp_spin.py``
    measures the spinning; on a 16-core GPU machine it took about half of the cores.

    Example:
        >>> import torch
        >>> with single_cpu_thread():
        ...     torch.get_num_threads()
        1
    """
    if not enabled:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _stack_trajectories(rows: list[TensorDict], keep_steps: bool) -> TensorDict:
    if not keep_steps:
        return torch.stack(rows)
    # every trajectory's steps written straight into one zero-padded [N, longest] batch: no padded copy of each
    # beside it (the rows stay as handed to on_finished; at the recipe's batch the policy images are 4.6 GiB)
    steps = [row.get("steps") for row in rows]
    longest = max(s.batch_size[0] for s in steps)
    padded = steps[0][:1].apply(lambda x: x.new_zeros((len(rows), longest, *x.shape[1:])),
                                batch_size=[len(rows), longest])
    for i, s in enumerate(steps):
        padded[i, : s.batch_size[0]] = s
    return torch.stack([row.exclude("steps") for row in rows]).set("steps", padded)
