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
  by the next save.

A save writes into ``global_step_<k>.tmp`` and renames it when every rank is done, so a crash never leaves
a folder that looks complete.

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

__all__ = ["CheckpointManager", "get_rng_state", "set_rng_state"]

_STEP_DIR = re.compile(r"^global_step_(\d+)$")


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


class CheckpointManager:
    """Saves and restores training state under ``root``; keeps the newest ``keep`` checkpoints.

    ``run_config`` holds the settings a checkpoint must share with the run that resumes it (the example: the LoRA
    rank, the optimizer's kind and state dtype, rollouts per group); the number of ranks is added to it. A run
    whose settings differ from the latest checkpoint's is refused by :meth:`load_latest`, before anything loads.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5, run_config: dict | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep (max_ckpt_keep) must be >= 1, got {keep}")
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

    def _run(self) -> dict:
        return {**self.run_config, "world_size": _world_size()}

    def save(self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Writes a checkpoint of ``step`` (collective: every rank calls it). ``extra(folder)``, called on every
        rank, writes more into the checkpoint's folder before it is marked complete."""
        check_adapters_apart(model)
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
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
            (tmp / "COMPLETE").write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune(step)
        _barrier()
        return final

    def _prune(self, saved: int) -> None:
        for step in self.complete_steps()[: -self.keep]:
            if step != saved:  # never the one just written, whatever older runs left beside it
                shutil.rmtree(self.path(step), ignore_errors=True)
        for path in self.root.glob("global_step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    def load_latest(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Restores the newest complete checkpoint into ``model`` / ``optimizer`` and this process's RNG streams.

        Returns the trainer state that was saved (with ``"checkpoint_step"``), or ``None`` when there is none.
        """
        step = self._latest_step()
        if step is None:
            return None
        path = self.path(step)
        self._check_run(path)
        model_state, optim_state = get_state_dict(model, optimizer)
        try:
            with _single_process_allowed():
                dcp.load(model_state, checkpoint_id=path / "model")
                # Parameters that never received a gradient (e.g. the unused last tower blocks) have no saved
                # optimizer state; they keep the freshly initialised one.
                dcp.load(optim_state, checkpoint_id=path / "optim",
                         planner=DefaultLoadPlanner(allow_partial_load=True))
        except (Exception, CheckpointException) as error:  # DCP's exception is a BaseException
            cause = (str(error).strip().splitlines() or [type(error).__name__])[-1]  # DCP's: the ranks' tracebacks
            raise RuntimeError(f"could not load checkpoint {path} ({cause}); delete that folder to resume from the "
                               "one before, or start afresh elsewhere") from error
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        trainer_file = path / f"trainer_rank{_rank()}.pt"
        if not trainer_file.exists():  # a checkpoint without run.json, written by fewer ranks
            raise RuntimeError(f"checkpoint {path} has no {trainer_file.name}: it was written by fewer ranks than this "
                               f"run has ({_world_size()}); resume with the same number of GPUs")
        state = torch.load(trainer_file, weights_only=False)
        set_rng_state(state.pop("rng"))
        state["checkpoint_step"] = step
        return state

    def _latest_step(self) -> int | None:
        """The newest complete step, as rank 0 sees it (every rank resumes the same one)."""
        steps = self.complete_steps()
        latest = [steps[-1] if steps else None]
        if dist.is_initialized():
            dist.broadcast_object_list(latest, src=0)
        return latest[0]

    def _check_run(self, path: Path) -> None:
        """Refuses, on every rank and before anything loads, a checkpoint written with other run settings."""
        saved_file = path / "run.json"
        if not saved_file.exists():  # written before checkpoints recorded their run
            return
        saved, ours = json.loads(saved_file.read_text()), self._run()
        differ = {k: (saved.get(k), ours.get(k)) for k in sorted(saved.keys() | ours.keys())
                  if saved.get(k) != ours.get(k)}
        if differ:
            listed = "; ".join(f"{k}: {old!r} there, {new!r} here" for k, (old, new) in differ.items())
            raise ValueError(f"checkpoint {path} was written by a run with other settings ({listed}): resume with its "
                             f"settings, or start afresh in another folder")
