"""Training checkpoints: atomic, the last ``keep`` kept, resumable from the newest complete one.

Layout of ``<root>/global_step_<k>/``:

- ``model/`` and ``optim/``: ``torch.distributed.checkpoint`` directories (sharded with FSDP2, one file set
  per rank; plain files when not distributed) -- every rank writes its own shards;
- ``trainer_rank<r>.pt``: the ``trainer_state`` passed to :meth:`CheckpointManager.save` (the example's: step,
  next group id, prompt cursor, sampler state with its refill cache, shuffling generator, wandb run id) and the
  RNG streams of rank ``r``;
- ``run.json``: the settings a resuming run must share (``run_config``, and the number of ranks): a run that
  differs is refused before anything loads, naming the settings;
- whatever ``save``'s ``extra`` writes (the example: the published Hugging Face folder), before ``COMPLETE``;
- ``COMPLETE``: written last. A folder without it is ignored; an interrupted save's ``.tmp`` folder is removed
  when the next save starts.

A save writes into ``global_step_<k>.tmp`` and renames it when every rank is done, so a crash never leaves
a folder that looks complete: every file is on disk (fsynced) before ``COMPLETE`` is written, and the rename
is synced too. An old checkpoint is renamed before it is deleted, so a deletion cut short leaves nothing that
looks complete either.

:meth:`CheckpointManager.load_latest` resumes the newest complete checkpoint; :meth:`CheckpointManager.load`
a chosen one (siiRL's ``resume_mode=resume_path``).

Example:
    >>> import tempfile, torch
    >>> model = torch.nn.Linear(3, 1)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> manager = CheckpointManager(tempfile.mkdtemp(), keep=5)
    >>> manager.save(10, model=model, optimizer=optimizer, trainer_state={"step": 10}).name
    'global_step_10'
    >>> state = manager.load_latest(model=model, optimizer=optimizer)
    >>> state["step"], state["checkpoint_step"], manager.complete_steps()
    (10, 10, [10])
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .lora import check_adapters_apart

__all__ = ["CheckpointManager", "checkpoint_step", "get_rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_DCP_DIRS = ("model", "optim")  # torch.distributed.checkpoint's folders (its writer fsyncs their files)
# DCP planner errors of a model (or optimizer) whose keys or shapes differ from the checkpoint's: not corruption
_MISMATCH = ("Size mismatch between saved", "Missing key in checkpoint state_dict", "Invalid checkpoint metadata for")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_allowed():
    with warnings.catch_warnings():
        # one process without a process group saves and loads on purpose; DCP warns at every call all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _fsync(path: Path) -> None:
    """Waits until ``path``'s data (a folder's: its names) is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # some filesystems cannot sync a folder; its entries are then as durable as that filesystem makes them
        if not (path.is_dir() and error.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsyncs every file under ``folder`` but DCP's (already synced by its writer), then every folder, deepest first:
    the files a save wrote besides DCP's shards (trainer states, ``run.json``, ``extra``'s) and their names."""
    folders = []
    for dirpath, _, filenames in os.walk(folder):
        here = Path(dirpath)
        folders.append(here)
        if here == folder or here.relative_to(folder).parts[0] not in _DCP_DIRS:
            for name in filenames:
                _fsync(here / name)
    for here in reversed(folders):
        _fsync(here)


def _cause(error: BaseException) -> str:
    """One line that says what went wrong."""
    if isinstance(error, CheckpointException):  # DCP's: the ranks' tracebacks, each ending with its exception
        return (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return f"{type(error).__name__}: {error}".strip().splitlines()[0]


def _mismatch(error: BaseException) -> str | None:
    """The planner error of ``error`` (DCP's: one per failed rank) that says the model is not the checkpoint's."""
    errors = [exc for exc, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    return next((f"{type(exc).__name__}: {exc}" for exc in errors if any(m in str(exc) for m in _MISMATCH)), None)


def _load_error(path: Path, error: BaseException, file: str | None = None) -> RuntimeError:
    """What to say when ``path`` could not load: a model it does not fit, or a damaged checkpoint."""
    mismatch = _mismatch(error)
    if mismatch is not None:  # every checkpoint of that run would fail alike: deleting this one does not help
        return RuntimeError(f"checkpoint {path} does not match this model ({mismatch}): check model.path and the "
                            "settings that shape the model against the run that wrote it (the checkpoint itself is "
                            "not damaged)")
    cause = f"{file}: {_cause(error)}" if file else _cause(error)
    return RuntimeError(f"could not load checkpoint {path} ({cause}); delete that folder to resume from the one "
                        "before, or start afresh elsewhere")


def get_rng_state() -> dict:
    """The RNG streams of this process: python, numpy, torch CPU and its current CUDA device's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: resumable where fewer GPUs are visible
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # an older checkpoint's: every visible device's state
        device = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[device] if device < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of the checkpoint folder ``path``; ``FileNotFoundError`` or ``ValueError``, naming the path and why,
    unless it is a complete ``global_step_<k>`` checkpoint of :class:`CheckpointManager`'s layout."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {path}: pass an existing global_step_<step> folder")
    match = _STEP_DIR.match(path.name)
    if match is None:
        held = CheckpointManager(path, keep=None).complete_steps()
        hint = f"; it holds checkpoints: pass one, e.g. {path / f'global_step_{held[-1]}'}" if held else ""
        raise ValueError(f"{path} is not a checkpoint folder (its name is not global_step_<step>){hint}")
    if not (path / "COMPLETE").exists():
        raise ValueError(f"checkpoint {path} is incomplete (no COMPLETE: its save was cut short); pass a complete "
                         "one")
    missing = [name for name in _DCP_DIRS if not (path / name).is_dir()]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this trainer (no {' or '.join(missing)} folder): pass "
                         "a global_step_<step> folder that it wrote")
    return int(match.group(1))


class CheckpointManager:
    """Saves and restores training state under ``root``; keeps the newest ``keep`` checkpoints.

    ``keep=None`` keeps every checkpoint. ``run_config`` holds the settings a checkpoint must share with the run
    that resumes it (the example: the LoRA rank, the optimizer's kind and state dtype, rollouts per group); the
    number of ranks is added to it. A run whose settings differ from the checkpoint's is refused by
    :meth:`load_latest` and :meth:`load`, before anything loads.
    """

    def __init__(self, root: str | os.PathLike, keep: int | None = 5, run_config: dict | None = None) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep (max_ckpt_keep) must be >= 1, or None to keep every checkpoint; got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.run_config = dict(run_config or {})

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / "COMPLETE").exists():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def path(self, step: int) -> Path:
        """The folder of ``step``'s checkpoint (``<root>/global_step_<step>``), complete or not."""
        return self.root / f"global_step_{step}"

    def _run(self, world_size: int | None = None) -> dict:
        return {**self.run_config, "world_size": world_size or _world_size()}

    def save(self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Writes a checkpoint of ``step`` (collective: every rank calls it). ``extra(folder)``, called on every
        rank, writes more into the checkpoint's folder before it is marked complete."""
        check_adapters_apart(model)
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            # what a save or a deletion cut short left (never complete), before this save needs the disk space
            for stale in self.root.glob("global_step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        with _single_process_allowed():
            dcp.save(model_state, checkpoint_id=tmp / "model")
            dcp.save(optim_state, checkpoint_id=tmp / "optim")
        torch.save({**trainer_state, "rng": get_rng_state()}, tmp / f"trainer_rank{_rank()}.pt")
        if extra is not None:
            extra(tmp)
        _barrier()
        if _rank() == 0:
            (tmp / "run.json").write_text(json.dumps(self._run(), indent=1, sort_keys=True))
            _sync_tree(tmp)  # every rank's files are on disk before COMPLETE says they are
            (tmp / "COMPLETE").write_text(str(step))
            _fsync(tmp / "COMPLETE")
            _fsync(tmp)  # COMPLETE's name
            if final.exists():  # the same step saved again
                self._discard(final)
            os.replace(tmp, final)
            _fsync(self.root)  # the rename: otherwise a crash may bring back the .tmp name, and the next save drops it
            self._prune(step)
        _barrier()
        return final

    def _prune(self, saved: int) -> None:
        if self.keep is None:
            return
        for step in self.complete_steps()[: -self.keep]:
            if step != saved:  # never the one just written, whatever older runs left beside it
                self._discard(self.path(step))

    @staticmethod
    def _discard(path: Path) -> None:
        """Deletes a checkpoint folder, renamed first: a deletion cut short leaves no folder that looks complete, and
        the next save removes what is left. (No such ``.tmp`` name exists: the save removed them when it started.)"""
        doomed = path.with_name(path.name + ".discarded.tmp")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def load_latest(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Restores the newest complete checkpoint into ``model`` / ``optimizer`` and this process's RNG streams.

        Returns the trainer state that was saved (with ``"checkpoint_step"`` and ``"checkpoint_path"``), or ``None``
        when ``root`` holds no
        complete checkpoint (the caller should say so, naming ``root``: a run pointed at the wrong folder starts
        afresh otherwise unnoticed).
        """
        step = self._latest_step()
        if step is None:
            return None
        return self._load(self.path(step), step, model=model, optimizer=optimizer)

    def load(self, path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restores the checkpoint folder ``path`` (a complete ``global_step_<k>`` of this layout, under ``root`` or
        not), as :meth:`load_latest` does the newest: siiRL's ``resume_mode=resume_path``. Collective: every rank
        passes the same ``path``.

        Later saves still go to ``root``; checkpoints there newer than ``path``'s are another branch of the run,
        which :meth:`load_latest` would prefer on the next resume.
        """
        path = Path(path)
        return self._load(path, checkpoint_step(path), model=model, optimizer=optimizer)

    def _load(self, path: Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        self.check_run(path)
        model_state, optim_state = get_state_dict(model, optimizer)
        try:
            with _single_process_allowed():
                dcp.load(model_state, checkpoint_id=path / "model")
                # Parameters that never received a gradient (e.g. the unused last tower blocks) have no saved
                # optimizer state; they keep the freshly initialised one.
                dcp.load(optim_state, checkpoint_id=path / "optim",
                         planner=DefaultLoadPlanner(allow_partial_load=True))
        except (Exception, CheckpointException) as error:  # DCP's exception is a BaseException
            raise _load_error(path, error) from error
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        state = self._trainer_state(path)
        set_rng_state(state.pop("rng"))
        state["checkpoint_step"], state["checkpoint_path"] = step, str(path)
        return state

    def _trainer_state(self, path: Path) -> dict:
        """This rank's ``trainer_rank<r>.pt`` of ``path``."""
        file = path / f"trainer_rank{_rank()}.pt"
        if not file.exists():
            saved = self._saved_run(path)
            if saved is None or saved.get("world_size", 0) < _world_size():  # else run.json vouches for the file
                raise RuntimeError(f"checkpoint {path} has no {file.name}: it was written by fewer ranks than this "
                                   f"run has ({_world_size()}); resume with the same number of GPUs")
            raise RuntimeError(f"could not load checkpoint {path} ({file.name} is missing, though its run.json records "
                               f"world_size {saved['world_size']}); delete that folder to resume from the one "
                               "before, or start afresh elsewhere")
        try:
            return torch.load(file, weights_only=False)
        except Exception as error:
            raise _load_error(path, error, file.name) from error

    def _latest_step(self) -> int | None:
        """The newest complete step, as rank 0 sees it (every rank resumes the same one)."""
        steps = self.complete_steps()
        latest = [steps[-1] if steps else None]
        if dist.is_initialized():
            dist.broadcast_object_list(latest, src=0)
        return latest[0]

    def check_run(self, path: str | os.PathLike, world_size: int | None = None) -> None:
        """Raises ``ValueError``, naming the settings, when the checkpoint ``path`` was written with other run
        settings than this manager's ``run_config`` (and ``world_size`` processes: by default the process group's).
        The loads call it before anything loads; a script may call it earlier still, before it builds anything.
        A setting the checkpoint did not record (written by an older version) is not compared."""
        path = Path(path)
        saved, ours = self._saved_run(path), self._run(world_size)
        if saved is None:  # written before checkpoints recorded their run
            return
        differ = {k: (saved[k], ours[k]) for k in sorted(saved.keys() & ours.keys()) if saved[k] != ours[k]}
        if differ:
            listed = "; ".join(f"{k}: {old!r} there, {new!r} here" for k, (old, new) in differ.items())
            raise ValueError(f"checkpoint {path} was written by a run with other settings ({listed}): resume with its "
                             f"settings, or start afresh in another folder")

    @staticmethod
    def _saved_run(path: Path) -> dict | None:
        """The run settings ``path`` recorded in its ``run.json``; ``None`` for a checkpoint without one."""
        file = path / "run.json"
        if not file.exists():
            return None
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _load_error(path, error, file.name) from error
