"""CheckpointManager on real files: the last ``keep`` kept, the newest complete one resumed with its RNG streams."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from srpo_rl.checkpoint import CheckpointManager


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_keeps_the_last_checkpoints_and_resumes_the_newest_complete_one(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(tmp_path, keep=3)
    assert manager.load_latest(model=model, optimizer=optimizer) is None  # nothing saved yet
    for step in range(1, 8):
        _train_step(model, optimizer)
        manager.save(step, model=model, optimizer=optimizer, trainer_state={"step": step, "cursor": 10 * step})
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = optimizer.state[model.weight]["exp_avg"].clone()
    after_save = _draws()
    assert manager.complete_steps() == [5, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_5", "global_step_6", "global_step_7"]

    # a save that died before COMPLETE (a newer step) and one that died before its rename: both ignored
    shutil.copytree(tmp_path / "global_step_7", tmp_path / "global_step_8")
    (tmp_path / "global_step_8" / "COMPLETE").unlink()
    shutil.copytree(tmp_path / "global_step_7", tmp_path / "global_step_9.tmp")
    for _ in range(3):  # the run goes on: weights, optimizer moments and RNG streams move
        _train_step(model, optimizer)
    _draws()

    state = manager.load_latest(model=model, optimizer=optimizer)
    assert state == {"step": 7, "cursor": 70, "checkpoint_step": 7}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved_weights[key]), key
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], saved_moments)
    assert _draws() == after_save  # the random streams continue as they would have after the save

    manager.save(10, model=model, optimizer=optimizer, trainer_state={"step": 10})
    assert manager.complete_steps() == [6, 7, 10]
    assert not (tmp_path / "global_step_9.tmp").exists()  # the next save clears what an interrupted one left


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep .* must be >= 1, got 0"):
        CheckpointManager(tmp_path, keep=0)


def test_a_checkpoint_of_other_run_settings_is_refused_before_anything_loads(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    CheckpointManager(tmp_path, run_config={"lora_rank": 0, "n": 8}).save(
        1, model=model, optimizer=optimizer, trainer_state={"step": 1})
    assert json.loads((tmp_path / "global_step_1" / "run.json").read_text()) == {"lora_rank": 0, "n": 8,
                                                                                "world_size": 1}
    other = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"other settings \(lora_rank: 0 there, 32 here\): resume with its settings"):
        CheckpointManager(tmp_path, run_config={"lora_rank": 32, "n": 8}).load_latest(
            model=other, optimizer=torch.optim.AdamW(other.parameters()))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing loaded
    state = CheckpointManager(tmp_path, run_config={"n": 8, "lora_rank": 0}).load_latest(
        model=other, optimizer=torch.optim.AdamW(other.parameters()))
    assert state["step"] == 1 and torch.equal(other.weight, model.weight)


def test_the_save_just_written_is_kept_beside_higher_steps_and_extra_files_come_before_complete(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20):  # an earlier run's checkpoints, of higher steps
        manager.save(step, model=model, optimizer=optimizer, trainer_state={})
    seen = []

    def extra(folder):
        seen.append((folder.name, (folder / "COMPLETE").exists()))
        (folder / "published.txt").write_text("weights")

    path = manager.save(1, model=model, optimizer=optimizer, trainer_state={}, extra=extra)
    assert seen == [("global_step_1.tmp", False)]  # written into the folder before it was marked complete
    assert (path / "published.txt").read_text() == "weights" and (path / "COMPLETE").exists()
    # pruning never deletes the checkpoint it has just written (the example refuses to start a run in a folder of an
    # earlier run's checkpoints: keeping the highest steps, pruning would mix the two runs)
    assert manager.complete_steps() == [1, 10, 20]

    def failing(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save(2, model=model, optimizer=optimizer, trainer_state={}, extra=failing)
    assert 2 not in manager.complete_steps()  # an export that failed leaves no checkpoint that looks complete


def test_a_corrupt_checkpoint_names_its_folder(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model=model, optimizer=optimizer, trainer_state={})
    for shard in (path / "model").glob("*.distcp"):
        shard.write_bytes(b"")
    with pytest.raises(RuntimeError, match=rf"could not load checkpoint {path} .*delete that folder"):
        manager.load_latest(model=model, optimizer=optimizer)
