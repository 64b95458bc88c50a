"""CheckpointManager on real files: the last ``keep`` kept, the newest complete one resumed with its RNG streams."""

import json
import os
import random
import re
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
    assert state == {"step": 7, "cursor": 70, "checkpoint_step": 7, "checkpoint_path": str(manager.path(7))}
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved_weights[key]), key
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], saved_moments)
    assert _draws() == after_save  # the random streams continue as they would have after the save

    manager.save(10, model=model, optimizer=optimizer, trainer_state={"step": 10})
    assert manager.complete_steps() == [6, 7, 10]
    assert not (tmp_path / "global_step_9.tmp").exists()  # the next save clears what an interrupted one left


def test_keep_must_be_positive_or_none_to_keep_every_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="keep .* must be >= 1, or None to keep every checkpoint; got 0"):
        CheckpointManager(tmp_path, keep=0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep=None)
    for step in range(1, 8):
        manager.save(step, model=model, optimizer=optimizer, trainer_state={})
    assert manager.complete_steps() == list(range(1, 8))


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
    # a setting the checkpoint did not record (added to run_config since) is not compared
    state = CheckpointManager(tmp_path, run_config={"n": 8, "lora_rank": 0, "seed": 3}).load_latest(
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


def _saved(root, steps=(1,), **manager_options) -> tuple[CheckpointManager, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    manager = CheckpointManager(root, **manager_options)
    for step in steps:
        _train_step(model, optimizer)
        manager.save(step, model=model, optimizer=optimizer, trainer_state={"step": step})
    return manager, model, optimizer


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a descriptor's file through /proc")
def test_every_file_is_on_disk_before_complete_says_so_and_the_rename_after(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def extra(folder):  # the example's: the Hugging Face folder
        (folder / "huggingface").mkdir()
        (folder / "huggingface" / "config.json").write_text("{}")

    monkeypatch.setattr(os, "fsync", recording)
    root = tmp_path.resolve() / "ckpt"
    model = torch.nn.Linear(3, 2)
    path = CheckpointManager(root).save(1, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                        trainer_state={}, extra=extra)
    tmp = f"{path}.tmp"
    complete = synced.index(f"{tmp}/COMPLETE")
    written = {f"{tmp}/{name}" for name in ("trainer_rank0.pt", "run.json", "huggingface/config.json")}
    folders = {tmp, f"{tmp}/huggingface", f"{tmp}/model", f"{tmp}/optim"}
    assert written | folders <= set(synced[:complete])
    assert synced[complete + 1:] == [tmp, str(root)]  # COMPLETE's name, then the rename
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "huggingface", "model", "optim", "run.json",
                                                     "trainer_rank0.pt"]


def test_a_damaged_trainer_state_or_run_json_names_its_checkpoint_and_file(tmp_path):
    manager, model, optimizer = _saved(tmp_path)
    path = manager.path(1)
    damaged = rf"could not load checkpoint {re.escape(str(path))} \({{}}: .*\); delete that folder"
    for name in ("trainer_rank0.pt", "run.json"):
        original = (path / name).read_bytes()
        (path / name).write_bytes(original[: len(original) // 2])  # cut short
        with pytest.raises(RuntimeError, match=damaged.format(re.escape(name))):
            manager.load_latest(model=model, optimizer=optimizer)
        (path / name).write_bytes(original)

    (path / "trainer_rank0.pt").unlink()  # run.json says one rank wrote it: lost, not written by fewer ranks
    with pytest.raises(RuntimeError, match=r"trainer_rank0.pt is missing, though its run.json records world_size 1\)"
                                           r"; delete that folder") as caught:
        manager.load_latest(model=model, optimizer=optimizer)
    assert "fewer ranks" not in str(caught.value)
    (path / "run.json").unlink()  # a checkpoint from before run.json: most likely written by fewer ranks
    with pytest.raises(RuntimeError, match=r"has no trainer_rank0.pt: it was written by fewer ranks than this run has"):
        manager.load_latest(model=model, optimizer=optimizer)


def test_a_model_of_other_shapes_or_keys_is_told_apart_from_a_damaged_checkpoint(tmp_path):
    manager, _, _ = _saved(tmp_path)
    for other, cause in ((torch.nn.Linear(3, 4), r"ValueError: Size mismatch between saved .* for (weight|bias)"),
                         (torch.nn.Sequential(torch.nn.Linear(3, 2)),
                          r"RuntimeError: Missing key in checkpoint state_dict: 0\.(weight|bias)\.")):
        with pytest.raises(RuntimeError, match=rf"checkpoint {re.escape(str(manager.path(1)))} does not match this "
                                               rf"model \({cause}\): check model.path") as caught:
            manager.load_latest(model=other, optimizer=torch.optim.AdamW(other.parameters()))
        assert "delete" not in str(caught.value)  # the older checkpoints would not fit either


def test_a_deletion_cut_short_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    manager, model, optimizer = _saved(tmp_path, steps=(1, 2), keep=2)
    rmtree = shutil.rmtree

    def killed(path, ignore_errors=False):  # the process dies half-way through deleting step 1
        if os.path.basename(path).startswith("global_step_1"):
            rmtree(os.path.join(path, "model"))
            raise RuntimeError("killed")
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(RuntimeError, match="killed"):
        manager.save(3, model=model, optimizer=optimizer, trainer_state={"step": 3})
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert manager.complete_steps() == [2, 3]  # step 1, half deleted, no longer counts

    # the next save first clears what the deletion (or a save) cut short left, then saves the same step again
    (tmp_path / "global_step_5.tmp").mkdir()
    seen = []
    manager.save(3, model=model, optimizer=optimizer, trainer_state={"step": "again"},
                 extra=lambda folder: seen.extend(sorted(p.name for p in tmp_path.iterdir())))
    assert seen == ["global_step_2", "global_step_3", "global_step_3.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_2", "global_step_3"]
    assert manager.load_latest(model=model, optimizer=optimizer)["step"] == "again"


def test_a_chosen_checkpoint_loads_and_other_folders_are_refused_with_the_reason(tmp_path):
    manager, model, optimizer = _saved(tmp_path / "ckpt", steps=(1, 2), run_config={"lora_rank": 0})
    other = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    state = manager.load(manager.path(2), model=other, optimizer=other_optimizer)
    assert state == {"step": 2, "checkpoint_step": 2, "checkpoint_path": str(manager.path(2))}
    assert torch.equal(other.weight, model.weight)
    # an older one, from outside the manager's root: the run settings are checked all the same
    with pytest.raises(ValueError, match=r"other settings \(lora_rank: 0 there, 8 here\)"):
        CheckpointManager(tmp_path / "elsewhere", run_config={"lora_rank": 8}).load(
            manager.path(1), model=other, optimizer=other_optimizer)
    state = CheckpointManager(tmp_path / "elsewhere").load(f"{manager.path(1)}/", model=other,
                                                           optimizer=other_optimizer)
    assert state == {"step": 1, "checkpoint_step": 1, "checkpoint_path": str(manager.path(1))}
    assert not torch.equal(other.weight, model.weight)

    root = re.escape(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=rf"{root} is not a checkpoint folder \(its name is not global_step_<step>\); "
                                         rf"it holds checkpoints: pass one, e.g. {root}/global_step_2"):
        manager.load(tmp_path / "ckpt", model=other, optimizer=other_optimizer)
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint folder {re.escape(str(tmp_path / 'nowhere'))}: "):
        manager.load(tmp_path / "nowhere", model=other, optimizer=other_optimizer)
    (tmp_path / "ckpt" / "global_step_3").mkdir()  # a save cut short
    with pytest.raises(ValueError, match=rf"checkpoint {root}/global_step_3 is incomplete \(no COMPLETE"):
        manager.load(manager.path(3), model=other, optimizer=other_optimizer)
    shutil.copytree(manager.path(2), tmp_path / "ckpt" / "global_step_4")  # another layout: no optimizer folder
    shutil.rmtree(tmp_path / "ckpt" / "global_step_4" / "optim")
    with pytest.raises(ValueError, match=rf"{root}/global_step_4 is not a checkpoint of this trainer \(no optim "):
        manager.load(manager.path(4), model=other, optimizer=other_optimizer)
