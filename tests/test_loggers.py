"""Metric and video logging (srpo_rl.loggers): the console line, TensorBoard scalars and images read back from the
event files, the mp4 decoded back to its frames, an unknown logger name refused before any backend writes, and the
wandb backend offline, read back from the run's own log file (its rows, the video, a resumed run)."""

import json
import os
import subprocess
import sys

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


def test_metric_logger_names_an_unknown_logger(tmp_path):
    with pytest.raises(ValueError, match="unknown logger 'tensorbord'; choose from console, tensorboard, wandb"):
        MetricLogger(["console", "tensorbord"], log_dir=tmp_path / "run", experiment_name="typo")
    assert not (tmp_path / "run").exists()  # refused before any backend wrote its folder
    # one name as a string is that logger, not its letters
    assert MetricLogger("console", log_dir=tmp_path / "one", experiment_name="one").types == ["console"]


# ---- the wandb backend, offline, read back from the run's own log file -------------------------
# wandb is an optional extra, so it goes into a temporary folder (``pip install --target``) put first on the
# ``PYTHONPATH`` of a child process that logs as the example does: several calls a step, metrics of several groups,
# a validation video; then a second process continues that run by its id, as a resumed training does. Each
# process's ``.wandb`` file is read record by record (LevelDB's log format: a 7-byte header, 32 KiB blocks of
# records, each ``crc32c (4) | length (2, little-endian) | type (1) | data``) and its run id and history rows parsed
# with wandb's own protobuf classes.
CHILD = """
import sys
import torch
from srpo_rl.loggers import MetricLogger

logger = MetricLogger(["console", "wandb"], log_dir=sys.argv[1], experiment_name="demo", wandb_offline=True,
                      config={"seed": 7})
print("run id:", logger.wandb_run_id)
for step in (1, 2):  # the example logs each phase's figures as it ends
    logger.log({"rollout/success_rate": 0.25 * step}, step)
    logger.log({"train/loss": -1.0 * step, "train/lr": 5e-6}, step)
frames = torch.arange(6 * 3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(6, 3, 16, 16)
logger.log_video("val/episode_3", frames, 2)
logger.close()
"""


RESUMED_CHILD = """
import sys
from srpo_rl.loggers import MetricLogger

logger = MetricLogger(["wandb"], log_dir=sys.argv[1], experiment_name="demo", wandb_offline=True,
                      wandb_run_id=sys.argv[2])  # as the example does when it resumes from a checkpoint
logger.log({"train/loss": -3.0}, 3)
logger.close()
"""


READ_HISTORY = """
import json, struct, sys
from wandb.proto import wandb_internal_pb2

data = open(sys.argv[1], "rb").read()
assert data[:4] == b":W&B", data[:7]
block, position, pending, rows, run_id = 32768, 7, b"", [], None
while position + 7 <= len(data):
    if block - position % block < 7:  # a block's last bytes are padding when no record header fits
        position += block - position % block
        continue
    length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
    pending += data[position + 7 : position + 7 + length]
    position += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "run":
            run_id = record.run.run_id
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({key: value for key, value in row.items() if not key.startswith("_")})  # wandb's own
print(json.dumps({"run_id": run_id, "rows": rows}))
"""


def _read_run(run_file, env):
    read = subprocess.run([sys.executable, "-c", READ_HISTORY, str(run_file)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(read.stdout)


def test_wandb_rows_carry_each_groups_step_keep_the_video_and_a_resumed_run_goes_on(tmp_path):
    target = tmp_path / "wandb_site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "wandb"],
                             capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"wandb cannot be installed here: {install.stderr[-500:]}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run_dir = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", CHILD, str(run_dir)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert "monotonically" not in child.stdout + child.stderr  # wandb drops data logged behind its step

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run = _read_run(run_file, env)
    assert f"run id: {run['run_id']}" in child.stdout
    rows = run["rows"]
    # one row a log call, each metric beside its group's step (torchrl's WandbLogger defines them as x-axes)
    assert rows[:4] == [
        {"rollout/success_rate": 0.25, "rollout/step": 1},
        {"train/loss": -1.0, "train/lr": 5e-6, "train/step": 1},
        {"rollout/success_rate": 0.5, "rollout/step": 2},
        {"train/loss": -2.0, "train/lr": 5e-6, "train/step": 2},
    ]
    # the video: the mp4 the logger wrote, at validation's step 2
    (video,) = rows[4:]
    assert video["val/step"] == 2 and video["val/episode_3/_type"] == "video-file", video
    assert (run_file.parent / "files" / video["val/episode_3/path"]).is_file()
    assert video["val/episode_3/size"] == (run_dir / "videos" / "val_episode_3_step2.mp4").stat().st_size

    # a resumed training passes the run id it kept in its checkpoint: the new process logs into the same run
    resumed = subprocess.run([sys.executable, "-c", RESUMED_CHILD, str(run_dir), run["run_id"]], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (later_file,) = set((run_dir / "wandb").glob("offline-run-*/run-*.wandb")) - {run_file}
    later = _read_run(later_file, env)
    assert later["run_id"] == run["run_id"]
    assert later["rows"] == [{"train/loss": -3.0, "train/step": 3}]
