"""Metric and video logging on torchrl's loggers: console, TensorBoard, wandb.

torchrl's ``TensorboardLogger.log_video`` needs moviepy and, with moviepy 2.x, still writes nothing: torch's
``tensorboard.summary.make_video`` imports ``moviepy.editor``, which 2.x removed, prints a line and returns. So videos
are written as mp4 files (imageio + its ffmpeg) next to the logs, sent to wandb when enabled, and shown in
TensorBoard as a strip of frames. On wandb each call of :meth:`MetricLogger.log` is one history row, and each
metric's x-axis is its group's step (``train/step`` for ``train/...``), as torchrl's ``WandbLogger`` defines them.

Example:
    >>> import tempfile, torch
    >>> run_dir = tempfile.mkdtemp()
    >>> logger = MetricLogger(["tensorboard"], log_dir=run_dir, experiment_name="demo")
    >>> logger.log({"train/success_rate": 0.5}, step=1)
    >>> frames = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)  # [T, C, H, W]
    >>> logger.log_video("val/episode_0", frames, step=1)  # doctest: +ELLIPSIS
    PosixPath('.../videos/val_episode_0_step1.mp4')
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import imageio.v2 as imageio
import torch
import torch.distributed as dist
from torchrl.record.loggers import TensorboardLogger, WandbLogger  # (wandb itself is imported only by a WandbLogger)

__all__ = ["MetricLogger", "write_video"]

LOGGER_TYPES = ("console", "tensorboard", "wandb")


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: int = 20) -> Path:
    """Writes uint8 frames ``[T, 3, H, W]`` as an H.264 mp4 and returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    imageio.mimwrite(path, list(array), fps=fps, macro_block_size=1)
    return path


def _console_number(value: float) -> str:
    """Counts in full (25085, not 2.508e+04); other values to 4 significant digits."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def _tensorboard_logger(experiment_name: str, log_dir: Path, purge_step: int | None):
    """torchrl's ``TensorboardLogger``, its ``SummaryWriter`` made with ``purge_step`` (torchrl's passes none)."""
    from torch.utils.tensorboard import SummaryWriter

    class PurgingTensorboardLogger(TensorboardLogger):
        def _create_experiment(self) -> SummaryWriter:
            return SummaryWriter(log_dir=os.path.join(self.log_dir, self.exp_name), purge_step=purge_step)

    return PurgingTensorboardLogger(exp_name=experiment_name, log_dir=str(log_dir))


class MetricLogger:
    """Logs scalars and videos to the chosen backends; only rank 0 writes.

    Args:
        logger_types: any of ``console`` (one line a call), ``tensorboard``, ``wandb``.

    Keyword Args:
        log_dir: the run's folder: ``tensorboard/``, ``videos/`` and wandb's files go under it.
        experiment_name: the run's name (TensorBoard's and wandb's).
        project_name: wandb's project.
        config: the run's configuration, stored with the wandb run.
        wandb_offline: write the wandb run locally, to sync later.
        wandb_run_id: an earlier run's :attr:`wandb_run_id`: wandb continues that run (a resumed training's
            figures stay in one run) instead of starting another.
        resume_step: a resumed run's first step: TensorBoard drops what earlier runs in ``log_dir`` logged from that
            step on (the steps a crash cut short, which the resumed run logs again), as ``SummaryWriter``'s
            ``purge_step`` does.
    """

    def __init__(
        self,
        logger_types: Iterable[str],
        *,
        log_dir: str | os.PathLike,
        experiment_name: str,
        project_name: str = "srpo_rl",
        config: Mapping | None = None,
        wandb_offline: bool = False,
        wandb_run_id: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.types = [logger_types] if isinstance(logger_types, str) else list(logger_types)  # "console" is one
        unknown = [t for t in self.types if t not in LOGGER_TYPES]
        if unknown:
            raise ValueError(f"unknown logger {unknown[0]!r}; choose from {', '.join(LOGGER_TYPES)}")
        if "wandb" in self.types and importlib.util.find_spec("wandb") is None:
            raise ImportError("the wandb logger needs wandb: pip install 'srpo-rl[wandb]' (or leave wandb out of the loggers)")
        self.log_dir = Path(log_dir)
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.backends = []
        if not self.enabled:
            return
        if "tensorboard" in self.types:
            self.backends.append(_tensorboard_logger(experiment_name, self.log_dir / "tensorboard", resume_step))
        if "wandb" in self.types:
            self.backends.append(
                WandbLogger(
                    exp_name=experiment_name,
                    project=project_name,
                    save_dir=str(self.log_dir),
                    offline=wandb_offline,
                    id=wandb_run_id,  # torchrl asks wandb.init for resume="allow": a new id starts a new run
                    config=dict(config) if config else None,
                )
            )

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (``None`` without wandb, and on ranks other than 0), to resume it later."""
        for backend in self.backends:
            if isinstance(backend, WandbLogger):
                return backend.experiment.id
        return None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs scalars; with ``console`` prints one compact line."""
        if not self.enabled or not metrics:
            return
        values = {name: float(value) for name, value in metrics.items()}
        for backend in self.backends:
            # one call: wandb then writes one history row, each metric with its group's step ("train/step", ...)
            backend.log_metrics(values, step=step)
        if "console" in self.types:
            shown = " ".join(f"{k}={_console_number(v)}" for k, v in sorted(values.items()))
            print(f"[step {step}] {shown}", flush=True)

    def log_video(self, name: str, frames: torch.Tensor, step: int, fps: int = 20) -> Path | None:
        """Writes ``frames`` (uint8 ``[T, 3, H, W]``) as an mp4 and logs it; returns the file."""
        if not self.enabled:
            return None
        path = write_video(self.log_dir / "videos" / f"{name.replace('/', '_')}_step{step}.mp4", frames, fps)
        strip = frames[:: max(1, len(frames) // 8)][:8]
        for backend in self.backends:
            if isinstance(backend, TensorboardLogger):  # (a subclass of it: a name check missed it)
                backend.experiment.add_images(name, strip, global_step=step, dataformats="NCHW")
            elif isinstance(backend, WandbLogger):
                import wandb

                # through torchrl's per-group step, as the scalars: wandb's own global step counts log calls, and
                # a video logged at ``step=step`` behind it is dropped
                backend.log_metrics({name: wandb.Video(str(path), format="mp4")}, step=step)  # the mp4 holds its fps
        return path

    def close(self) -> None:
        """Flushes and closes the backends (TensorBoard's writer, the wandb run)."""
        for backend in self.backends:
            experiment = getattr(backend, "experiment", None)
            if hasattr(experiment, "close"):
                experiment.close()
            elif hasattr(experiment, "finish"):
                experiment.finish()
