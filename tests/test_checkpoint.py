"""CheckpointManager on real files: the last ``keep`` kept, the newest complete one resumed with its RNG streams."""

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
