"""Metric and video logging (srpo_rl.loggers): the console line, TensorBoard scalars and images read back from the
event files, the mp4 decoded back to its frames."""

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from srpo_rl.loggers import MetricLogger, write_video


def _frames(count: int = 6, size: int = 16) -> torch.Tensor:
    """uint8 [T, 3, H, W]: frame t a flat colour of its own, so each decoded frame can be told apart."""
    colours = torch.tensor([[40 * t % 256, (255 - 30 * t) % 256, (100 + 20 * t) % 256] for t in range(count)],
                           dtype=torch.uint8)
    return colours[:, :, None, None].expand(count, 3, size, size).contiguous()


def test_write_video_decodes_back_to_its_frames(tmp_path):
    frames = _frames()
    path = write_video(tmp_path / "videos" / "episode.mp4", frames, fps=10)
    decoded = np.stack(imageio.mimread(path))
    assert decoded.shape == (6, 16, 16, 3)
    want = frames.permute(0, 2, 3, 1).numpy().astype(int)
    # H.264 in yuv420p: flat colours come back within a few levels
    assert np.abs(decoded.astype(int) - want).max() <= 6
    assert imageio.get_reader(path).get_meta_data()["fps"] == pytest.approx(10)


def test_console_line_prints_counts_in_full_and_the_rest_to_four_digits(tmp_path, capsys):
    logger = MetricLogger(["console"], log_dir=tmp_path, experiment_name="console")
    logger.log({"train/samples": 25085.0, "train/lr": 5e-6, "loss": -0.123456, "delta": -3.0, "odd": float("nan")}, 7)
    assert capsys.readouterr().out == "[step 7] delta=-3 loss=-0.1235 odd=nan train/lr=5e-06 train/samples=25085\n"


def test_tensorboard_gets_the_scalars_and_a_strip_of_the_videos_frames(tmp_path):
    logger = MetricLogger(["tensorboard"], log_dir=tmp_path, experiment_name="run")
    logger.log({"train/x": 1.5}, 4)
    path = logger.log_video("val/episode_0", _frames(count=16), step=4)
    logger.close()
    assert path == tmp_path / "videos" / "val_episode_0_step4.mp4" and path.stat().st_size > 0
    run = EventAccumulator(str(tmp_path / "tensorboard" / "run"), size_guidance={"images": 0})
    run.Reload()
    assert [(e.step, e.value) for e in run.Scalars("train/x")] == [(4, 1.5)]
    (image,) = run.Images("val/episode_0")
    # every second of the 16 frames, 8 in all, as one grid of 16 x 16 tiles
    assert image.step == 4 and image.width * image.height == 8 * 16 * 16


def test_a_resumed_run_s_tensorboard_replaces_the_steps_it_logs_again(tmp_path):
    first = MetricLogger(["tensorboard"], log_dir=tmp_path, experiment_name="run")
    for step in (1, 2, 3):  # a crash after step 3's figures, before its checkpoint
        first.log({"train/x": float(step)}, step)
    first.close()
    resumed = MetricLogger(["tensorboard"], log_dir=tmp_path, experiment_name="run", resume_step=3)  # from step 2's
    resumed.log({"train/x": 30.0}, 3)
    resumed.close()
    run = EventAccumulator(str(tmp_path / "tensorboard" / "run"))  # the run's files in order, as TensorBoard reads them
    run.Reload()
    assert [(e.step, e.value) for e in run.Scalars("train/x")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
