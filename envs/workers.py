"""LIBERO simulations in worker processes: commands over pipes, timeouts, restart on failure.

One process per env slot runs a :class:`~srpo_rl.envs.sim.LiberoSim` (each holds about 2 GB, and
MuJoCo and the renderer are single-threaded, so processes are the unit of parallelism). The parent
sends ``(method, args)`` and the worker replies with the method's result. With ``reply_bytes`` the
large arrays of a reply (camera frames) travel through a shared-memory block of the slot instead of the
pipe: a pipe holds less than one reply, so the parent's read waited for the (niced, busy) worker to be
scheduled again for each refill (``benchmarks/worker_replies.py``, 4 busy workers on 2 cores: 2.4 ms to read
a reply through the pipe, 0.3 ms with the frames in shared memory). A worker that dies or
does not answer within the timeout is killed and restarted on the same task; the call reports a
:class:`Failure` for that slot and every other slot's result as usual, so a batch always completes.

:meth:`SimWorkers.call` sends and waits; :meth:`SimWorkers.send` and :meth:`SimWorkers.recv` split it
so that the caller can work (e.g. run the policy for other slots) while these slots simulate.

Processes are started with the ``spawn`` method (``forkserver`` also works), so scripts that
create workers need the usual ``if __name__ == "__main__":`` guard. Workers run with one OpenMP /
MKL / OpenBLAS thread each.

Workers rendering through EGL render on the GPU their parent computes on (``MUJOCO_EGL_DEVICE_ID``, unless
set): robosuite would otherwise put the frames of every process on device 0, and on an H100 every frame takes
about 0.7-1.0 ms of GPU time from the CUDA work beside it (``benchmarks/render_contention.py``), so on a
multi-GPU host the first GPU would carry every rank's frames and pace the others. Workers given
``cpu_render_slots`` render with Mesa's software rasterizer (llvmpipe) through Mesa's EGL library instead, on
their own CPU core: their frames take no GPU time, at 78-124 ms of a core a LIBERO frame (a 2-core EPYC, the
Xeon of an H100 machine), and their pixels differ a little from a GPU's (mean |diff| 1.9 on an H100). With the
7B on an H200 and 32 envs, 16 such slots made the rollout 0.97x as fast, not faster (``docs/performance.md``).

Examples:
    >>> workers = SimWorkers({"suite": "libero_object"}, task_ids=[0, 1])  # doctest: +SKIP
    >>> results = workers.call({0: ("reset", (0,)), 1: ("reset", (3,))})  # doctest: +SKIP
    >>> workers.send({1: ("reset", (4,))})  # doctest: +SKIP
    >>> results = workers.recv([1])  # doctest: +SKIP
    >>> workers.close()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from .suites import rendering_backend

__all__ = [
    "Failure", "SimWorkers", "WorkerError", "egl_device_for", "mesa_egl_vendor_file", "parent_render_device",
]

logger = logging.getLogger(__name__)

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
# where libglvnd looks for EGL vendor files (its defaults), to find Mesa's
_GLVND_EGL_DIRS = ("/etc/glvnd/egl_vendor.d", "/usr/share/glvnd/egl_vendor.d", "/usr/local/share/glvnd/egl_vendor.d")


class WorkerError(RuntimeError):
    """A worker could not be (re)built, or a command failed twice in a row."""


@dataclass(frozen=True)
class Failure:
    """A command that did not complete on one slot.

    Attributes:
        slot: the worker's slot.
        reason: what happened (crash with exit code, timeout, or the worker's traceback).
        restarted: the worker process was killed and restarted (crash or timeout).
    """

    slot: int
    reason: str
    restarted: bool


WORKER_NICENESS = 19  # added to the parent's niceness in every simulation worker (capped at 19)
_SHARED_MIN_BYTES = 16 * 1024  # reply arrays from this size go through the slot's shared memory


@dataclass(frozen=True)
class _SharedArray:
    """Where a reply array lies in the slot's shared memory (what travels through the pipe instead)."""

    offset: int
    shape: tuple[int, ...]
    dtype: str


def _share_arrays(reply: Any, buffer: memoryview | None) -> Any:
    """``reply`` with its large arrays (of a dict reply) written to ``buffer``, markers in their place; an array
    that does not fit in what is left travels through the pipe as before."""
    if buffer is None or not isinstance(reply, dict):
        return reply
    out, offset = {}, 0
    for key, value in reply.items():
        if isinstance(value, np.ndarray) and _SHARED_MIN_BYTES <= value.nbytes <= len(buffer) - offset:
            np.copyto(np.ndarray(value.shape, value.dtype, buffer=buffer, offset=offset), value)
            start, offset = offset, offset + -(-value.nbytes // 64) * 64  # the next array starts aligned
            value = _SharedArray(start, value.shape, value.dtype.str)
        out[key] = value
    return out


def _unshare_arrays(reply: Any, buffer: memoryview | None) -> Any:
    """The reply as the worker's method returned it: the shared arrays copied out of ``buffer`` (the worker
    writes there again on its next command)."""
    if buffer is None or not isinstance(reply, dict):
        return reply
    return {key: np.ndarray(v.shape, np.dtype(v.dtype), buffer=buffer, offset=v.offset).copy()
            if isinstance(v, _SharedArray) else v for key, v in reply.items()}


def _worker_main(conn: Connection, sim_kwargs: dict, task_id: int, shared_name: str | None = None) -> None:
    # the parent handles Ctrl-C and closes the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # when the simulations fill every core, the parent (which launches the policy's GPU kernels and
    # preprocesses its images) must not queue behind them: a slowed launch loop idles the GPU
    os.nice(WORKER_NICENESS)
    try:
        from .sim import LiberoSim

        sim = LiberoSim(task_id=task_id, **sim_kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    shared = None if shared_name is None else SharedMemory(name=shared_name)  # the parent owns and unlinks it
    conn.send(("ok", os.getpid()))
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if method == "close":
            break
        start = time.perf_counter()
        try:
            reply = ("ok", _share_arrays(getattr(sim, method)(*args, **kwargs), shared and shared.buf))
        except Exception:
            reply = ("error", traceback.format_exc())
        reply += (time.perf_counter() - start,)  # the command's time inside the worker
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    sim.close()
    if shared is not None:
        shared.close()


def egl_device_for(cuda_index: int, cuda_visible_devices: str | None) -> int | None:
    """The EGL device index of CUDA device ``cuda_index`` as robosuite counts EGL devices (all of the host's, in
    the driver's order, taken here as the physical GPU order), or ``None`` where ``CUDA_VISIBLE_DEVICES`` names
    GPUs by UUID (robosuite's own choice then stands).

    Examples:
        >>> egl_device_for(1, None), egl_device_for(1, "4,5"), egl_device_for(0, "GPU-8a5e")
        (1, 5, None)
    """
    if not cuda_visible_devices:
        return cuda_index
    visible = [name.strip() for name in cuda_visible_devices.split(",")]
    if not all(name.isdigit() for name in visible) or cuda_index >= len(visible):
        return None
    return int(visible[cuda_index])


def parent_render_device() -> int | None:
    """The EGL device for this process's simulation workers: its current CUDA device (:func:`egl_device_for`).

    ``None`` (robosuite chooses) where ``MUJOCO_EGL_DEVICE_ID`` is set, the backend is not EGL, or this
    process has not initialised CUDA (a CPU run does not start CUDA for this).
    """
    if os.environ.get("MUJOCO_EGL_DEVICE_ID") is not None or rendering_backend() != "egl":
        return None
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return egl_device_for(torch.cuda.current_device(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def mesa_egl_vendor_file(directories: Sequence[str] = _GLVND_EGL_DIRS) -> str | None:
    """libglvnd's vendor file of Mesa's EGL library (``libEGL_mesa``) in ``directories``, or ``None``.

    A process whose ``__EGL_VENDOR_LIBRARY_FILENAMES`` names only this file sees Mesa's EGL devices only, the
    first of which is its software rasterizer (llvmpipe): OpenGL on the CPU, beside a GPU driver's EGL.

    Examples:
        >>> path = mesa_egl_vendor_file()
        >>> path is None or path.endswith(".json")
        True
    """
    for directory in directories:
        for path in sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else ():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if "mesa" in json.loads(path.read_text())["ICD"]["library_path"].lower():
                    return str(path)
    return None


def _cpu_render_environment() -> dict[str, str]:
    """The variables that make a worker's EGL render with llvmpipe on one thread (a worker is one core)."""
    vendor = mesa_egl_vendor_file()
    if vendor is None:
        raise WorkerError(
            f"cpu_render_slots needs Mesa's EGL library (no libEGL_mesa vendor file in {', '.join(_GLVND_EGL_DIRS)}); "
            "install it, e.g. `apt-get install libegl-mesa0 libgl1-mesa-dri`, or set cpu_render_slots=0"
        )
    # Mesa lists its software device first: EGL device 0 once Mesa is the only vendor
    return {"__EGL_VENDOR_LIBRARY_FILENAMES": vendor, "MUJOCO_EGL_DEVICE_ID": "0", "LP_NUM_THREADS": "1"}


@contextlib.contextmanager
def _child_environment(render_device: int | None, cpu_render: dict[str, str] | None = None) -> Iterator[None]:
    # spawned children copy os.environ at start: set the thread counts (and the EGL device) for them only
    child = dict.fromkeys(_THREAD_VARS, "1")
    if render_device is not None:
        child["MUJOCO_EGL_DEVICE_ID"] = str(render_device)
    child.update(cpu_render or {})
    saved = {name: os.environ.get(name) for name in child}
    os.environ.update(child)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Worker:
    def __init__(self, ctx, slot: int, sim_kwargs: dict, task_id: int, shared_name: str | None = None,
                 render_device: int | None = None, cpu_render: dict[str, str] | None = None):
        self.slot, self.task_id = slot, task_id
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, sim_kwargs, task_id, shared_name), name=f"libero-sim-{slot}",
            daemon=True,
        )
        with _child_environment(render_device, cpu_render):
            self.process.start()
        child.close()  # so the parent sees EOF when the worker dies
        self.building = True

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=30)
        self.conn.close()

    def describe_death(self) -> str:
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"crashed ({signal.Signals(-code).name})"
        return f"crashed (exit code {code})"


class SimWorkers:
    """A fixed set of worker processes, each running one ``LiberoSim``.

    Args:
        sim_kwargs: keyword arguments of :class:`~srpo_rl.envs.sim.LiberoSim` except ``task_id``.
        task_ids: the initial task of each slot (one worker per entry).

    Keyword Args:
        timeout: seconds a step or reset may take before the worker is declared hung.
        build_timeout: seconds a (re)build of a simulation may take.
        context: multiprocessing start method, ``"spawn"`` (default) or ``"forkserver"``.
        reply_bytes: size of each slot's shared-memory block for the large arrays of its replies (0: none,
            everything through the pipe); arrays beyond it go through the pipe.
        render_device: the EGL device the workers render on (``MUJOCO_EGL_DEVICE_ID``); defaults to
            :func:`parent_render_device`, the GPU this process computes on.
        cpu_render_slots: how many slots (the last ones) render on the CPU instead, with Mesa's llvmpipe
            through EGL (needs Mesa's EGL library, :func:`mesa_egl_vendor_file`, and ``MUJOCO_GL=egl``). Their
            frames cost the GPU nothing and a core 78-124 ms each; their pixels differ a little from a GPU's
            everywhere (shading: mean |diff| 1.9, max 113 on an H100). Defaults to 0.

    Attributes:
        busy_time: seconds the workers spent inside each method, summed over slots
            (e.g. ``{"step_chunk": 12.5, "reset": 1.5}``): the simulation's share of a run.
        restarts: workers restarted so far.
        cpu_render_slots: the slots that render on the CPU (a ``range``, empty by default).
    """

    def __init__(
        self,
        sim_kwargs: Mapping[str, Any],
        task_ids: Sequence[int],
        *,
        timeout: float = 120.0,
        build_timeout: float = 600.0,
        context: str = "spawn",
        reply_bytes: int = 0,
        render_device: int | None = None,
        cpu_render_slots: int = 0,
    ):
        if context not in ("spawn", "forkserver"):
            raise ValueError(f"unknown start method {context!r}; choose 'spawn' or 'forkserver'")
        if reply_bytes < 0:
            raise ValueError(f"reply_bytes must be >= 0 (0: replies through the pipe only), got {reply_bytes}")
        if not 0 <= cpu_render_slots <= len(task_ids):
            raise ValueError(
                f"cpu_render_slots must be between 0 and the {len(task_ids)} slots, got {cpu_render_slots}"
            )
        if cpu_render_slots and rendering_backend() != "egl":
            raise ValueError(f"cpu_render_slots renders through EGL; MUJOCO_GL is {rendering_backend()!r}")
        self._ctx = multiprocessing.get_context(context)
        self._sim_kwargs = dict(sim_kwargs)
        self.timeout = float(timeout)
        self.build_timeout = float(build_timeout)
        self.restarts = 0
        self.busy_time: dict[str, float] = defaultdict(float)
        self._inflight: dict[int, tuple[str, float, float]] = {}  # slot -> (method, timeout, deadline)
        self._failed: dict[int, Failure] = {}  # sends that failed at once, reported by recv
        self._workers: list[_Worker] = []
        self._shared: list[SharedMemory] = []
        self.cpu_render_slots = range(len(task_ids) - cpu_render_slots, len(task_ids))
        try:  # whatever fails from here on, close() frees what was made (shared memory outlives the process)
            self._shared = [SharedMemory(create=True, size=reply_bytes) for _ in task_ids] if reply_bytes else []
            self._render_device = parent_render_device() if render_device is None else int(render_device)
            self._cpu_render = _cpu_render_environment() if cpu_render_slots else None
            for slot, task_id in enumerate(task_ids):
                self._workers.append(self._start(slot, int(task_id)))
            self._wait_built(range(len(self._workers)), retry=True)
        except BaseException:
            self.close()
            raise

    def _start(self, slot: int, task_id: int) -> _Worker:
        cpu_render = self._cpu_render if slot in self.cpu_render_slots else None
        return _Worker(self._ctx, slot, self._sim_kwargs, task_id, self._shared_name(slot), self._render_device,
                       cpu_render)

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        """Process id of each slot's worker."""
        return [worker.process.pid for worker in self._workers]

    @property
    def task_ids(self) -> list[int]:
        """The task each slot's simulation is built for."""
        return [worker.task_id for worker in self._workers]

    def _shared_name(self, slot: int) -> str | None:
        return self._shared[slot].name if self._shared else None

    def _shared_buffer(self, slot: int) -> memoryview | None:
        return self._shared[slot].buf if self._shared else None

    # -- lifecycle --------------------------------------------------------------------------------
    def restart(self, slot: int, reason: str) -> None:
        """Kills slot ``slot``'s worker and starts a new one on the same task (built lazily)."""
        old = self._workers[slot]
        logger.warning(
            "LIBERO worker %d (pid %s, task %d) %s; restarting it", slot, old.process.pid, old.task_id, reason
        )
        old.kill()
        self._workers[slot] = self._start(slot, old.task_id)
        self.restarts += 1

    def _wait_built(self, slots, *, retry: bool) -> None:
        pending = {self._workers[s].conn: s for s in slots if self._workers[s].building}
        deadline = time.monotonic() + self.build_timeout
        failed: dict[int, str] = {}
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for conn, slot in pending.items():
                    failed[slot] = f"did not finish building within {self.build_timeout:.0f} s"
                break
            for conn in ready:
                slot = pending.pop(conn)
                worker = self._workers[slot]
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError):
                    failed[slot] = worker.describe_death() + " while building"
                    continue
                if status == "ok":
                    worker.building = False
                else:
                    failed[slot] = f"failed to build its simulation:\n{payload}"
        for slot, reason in failed.items():
            if not retry:
                raise WorkerError(f"LIBERO worker {slot} (task {self._workers[slot].task_id}) {reason}")
            self.restart(slot, reason)
        if failed:
            self._wait_built(failed, retry=False)

    def close(self) -> None:
        """Stops every worker."""
        self._inflight.clear()
        self._failed.clear()
        for worker in self._workers:
            if worker.process.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):
                    worker.conn.send(("close", (), {}))
        for worker in self._workers:
            worker.process.join(timeout=10)
            worker.kill()
        for block in self._shared:
            block.close()
            block.unlink()
        self._shared = []

    # -- commands ---------------------------------------------------------------------------------
    def call(
        self,
        commands: Mapping[int, tuple[str, tuple] | tuple[str, tuple, dict]],
        *,
        timeout: float | None = None,
    ) -> dict[int, Any]:
        """Runs ``{slot: (method, args[, kwargs])}`` on the workers in parallel and waits for them.

        Returns:
            ``{slot: result}``, where a slot whose worker crashed, hung past ``timeout`` (default
            :attr:`timeout`) or raised gets a :class:`Failure` instead. Crashed and hung workers
            are restarted (their new simulation builds while the caller goes on).
        """
        self.send(commands, timeout=timeout)
        return self.recv(list(commands))

    def send(
        self,
        commands: Mapping[int, tuple[str, tuple] | tuple[str, tuple, dict]],
        *,
        timeout: float | None = None,
    ) -> None:
        """Starts ``{slot: (method, args[, kwargs])}`` on the workers and returns at once.

        :meth:`recv` collects the results. A slot takes one command at a time; other slots may have
        commands in flight. ``timeout`` (default :attr:`timeout`) counts from now.
        """
        busy = sorted(slot for slot in commands if slot in self._inflight or slot in self._failed)
        if busy:
            raise RuntimeError(f"slots {busy} still have a command in flight; recv() it before sending another")
        timeout = self.timeout if timeout is None else float(timeout)
        self._wait_built(commands, retry=True)
        for slot, command in commands.items():
            method, args, kwargs = (*command, {})[:3]
            worker = self._workers[slot]
            try:
                worker.conn.send((method, tuple(args), dict(kwargs)))
            except (BrokenPipeError, OSError):
                self._failed[slot] = self._fail(slot, worker.describe_death())
                continue
            self._inflight[slot] = (method, timeout, time.monotonic() + timeout)

    @property
    def in_flight(self) -> list[int]:
        """Slots whose command :meth:`recv` has not collected (a crashed worker's failure included)."""
        return sorted(set(self._inflight) | set(self._failed))

    def recv(self, slots: Sequence[int]) -> dict[int, Any]:
        """Waits for the results of the commands :meth:`send` started on ``slots``.

        Returns ``{slot: result}`` as :meth:`call` does (a :class:`Failure` for a crashed, hung or
        raising worker).
        """
        missing = sorted(s for s in slots if s not in self._inflight and s not in self._failed)
        if missing:
            raise RuntimeError(f"slots {missing} have no command in flight; send() one first")
        results: dict[int, Any] = {s: self._failed.pop(s) for s in slots if s in self._failed}
        pending = {self._workers[s].conn: s for s in slots if s in self._inflight}
        while pending:
            deadline = min(self._inflight[s][2] for s in pending.values())
            for conn in wait(list(pending), timeout=max(0.0, deadline - time.monotonic())):
                slot = pending.pop(conn)
                results[slot] = self._receive(slot)
            now = time.monotonic()
            for conn, slot in list(pending.items()):
                method, timeout, deadline = self._inflight[slot]
                if deadline <= now:
                    del pending[conn], self._inflight[slot]
                    results[slot] = self._fail(slot, f"did not answer {method!r} within {timeout:.0f} s")
        return results

    def ready(self, slots: Sequence[int], timeout: float | None = 0.0, wake: Sequence[Any] = ()) -> list[int]:
        """Those of ``slots`` (each with a command in flight) whose result :meth:`recv` can take at once,
        waiting up to ``timeout`` seconds for one (``None``: until one is ready) or until one of ``wake``
        (objects :func:`multiprocessing.connection.wait` accepts: another thread's signal) is readable;
        a crashed worker or one past its command's deadline counts as ready (``recv`` turns it into a
        :class:`Failure`)."""
        missing = sorted(s for s in slots if s not in self._inflight and s not in self._failed)
        if missing:
            raise RuntimeError(f"slots {missing} have no command in flight; send() one first")
        ready = {s for s in slots if s in self._failed}
        pending = {self._workers[s].conn: s for s in slots if s in self._inflight}
        if pending and not ready:
            deadline = min(self._inflight[s][2] for s in pending.values())
            wait_for = max(0.0, deadline - time.monotonic())
            wait_for = wait_for if timeout is None else min(wait_for, timeout)
            ready.update(pending[conn] for conn in wait([*pending, *wake], timeout=wait_for) if conn in pending)
        now = time.monotonic()
        ready.update(s for s in pending.values() if self._inflight[s][2] <= now)
        return sorted(ready)

    def _receive(self, slot: int) -> Any:
        method = self._inflight.pop(slot)[0]
        try:
            status, payload, seconds = self._workers[slot].conn.recv()
        except (EOFError, OSError):
            return self._fail(slot, self._workers[slot].describe_death())
        self.busy_time[method] += seconds
        if status == "ok":
            return _unshare_arrays(payload, self._shared_buffer(slot))
        logger.warning("LIBERO worker %d raised in %r:\n%s", slot, method, payload)
        return Failure(slot, f"raised in {method!r}:\n{payload}", restarted=False)

    def _fail(self, slot: int, reason: str) -> Failure:
        self.restart(slot, reason)
        return Failure(slot, reason, restarted=True)

    def set_task(self, slot: int, task_id: int) -> None:
        """Records that slot ``slot`` now runs ``task_id`` (after a successful ``set_task`` call)."""
        self._workers[slot].task_id = int(task_id)
