"""Manifest generation, loading and validation against the real LIBERO benchmark tables."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srpo_rl.envs import canonical_suite
from srpo_rl.manifest import (
    MANIFEST_SCHEMA,
    PromptStream,
    ensure_manifests,
    generate_manifests,
    load_manifest,
    write_manifest,
)


def test_shared_split_is_the_reference_layout(tmp_path):
    train, val = ensure_manifests(tmp_path / "train.parquet", tmp_path / "val.parquet", suites=["libero_long"])
    # 10 tasks x 50 init states, identical rows in both files (siiRL's prepare_libero_train_valid_datasets).
    assert len(train) == len(val) == 500
    assert [r["prompt_id"] for r in train] == [r["prompt_id"] for r in val]
    assert train[0]["prompt_id"] == "libero_10_0_0" and train[-1]["prompt_id"] == "libero_10_9_49"
    assert train[0]["instruction"] == "put both the alphabet soup and the tomato sauce in the basket"
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in val} == {"val"}
    assert pq.read_schema(tmp_path / "train.parquet").equals(MANIFEST_SCHEMA, check_metadata=False)


def test_holdout_split_and_trial_cap():
    train, val = generate_manifests(["libero_object"], num_trials_per_task=20, split_mode="holdout", val_trials_per_task=5)
    assert len(train) == 10 * 15 and len(val) == 10 * 5
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in val}
    assert max(r["trial_id"] for r in val) == 19 and min(r["trial_id"] for r in val) == 15


def test_existing_files_are_loaded_not_regenerated(tmp_path):
    rows, _ = generate_manifests(["libero_goal"], num_trials_per_task=2)
    write_manifest(rows[:3], tmp_path / "train.parquet")
    write_manifest(rows[:1], tmp_path / "val.parquet")
    train, val = ensure_manifests(tmp_path / "train.parquet", tmp_path / "val.parquet", suites=["libero_goal"])
    assert len(train) == 3 and len(val) == 1
    # a manifest left by a run on another suite is refused, not run on this suite's tasks
    with pytest.raises(ValueError, match=r"train.parquet holds suite\(s\) libero_goal, but this run is on libero_10"):
        ensure_manifests(tmp_path / "train.parquet", tmp_path / "val.parquet", suites=["libero_long"])


def test_round_trip_keeps_rows(tmp_path):
    rows, _ = generate_manifests(["libero_spatial", "libero_90"], num_trials_per_task=1)
    assert len(rows) == 10 + 90
    write_manifest(rows, tmp_path / "m.parquet")
    assert load_manifest(tmp_path / "m.parquet") == rows
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary file left behind


def test_failed_write_leaves_nothing(tmp_path):
    bad = [{"suite": "libero_goal", "task_id": "not an int"}]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, KeyError, TypeError)):
        write_manifest(bad, tmp_path / "m.parquet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "row_change, message",
    [
        ({"suite": "libero_lng"}, "unknown suite 'libero_lng'; choose one of"),
        ({"task_id": 10}, "unknown task_id 10 for libero_goal; valid ids are 0..9"),
        ({"trial_id": 50}, "trial_id 50 out of range for libero_goal task 0; valid init states are 0..49"),
        ({"split": "test"}, "split 'test' is not 'train' or 'val'"),
    ],
)
def test_invalid_rows_are_named(tmp_path, row_change, message):
    rows, _ = generate_manifests(["libero_goal"], num_trials_per_task=1)
    rows[0].update(row_change)
    write_manifest(rows, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path / "m.parquet")


def test_wrong_schema_is_named(tmp_path):
    pq.write_table(pa.table({"suite": ["libero_goal"], "task": [0]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"lacks columns \['task_id', 'task_name'"):
        load_manifest(tmp_path / "m.parquet")


def test_bad_arguments():
    assert canonical_suite("libero_long") == "libero_10"
    with pytest.raises(ValueError, match="unknown split_mode 'random'; choose one of shared, holdout"):
        generate_manifests(["libero_goal"], split_mode="random")
    with pytest.raises(ValueError, match="num_trials_per_task must be >= 1, got 0"):
        generate_manifests(["libero_goal"], num_trials_per_task=0)
    with pytest.raises(ValueError, match="val_trials_per_task=3 of the 3 trials of libero_goal task 0 leaves none "
                                         "for training: use 1 to 2, or split_mode='shared'"):
        generate_manifests(["libero_goal"], num_trials_per_task=3, split_mode="holdout", val_trials_per_task=3)
    with pytest.raises(ValueError, match=r"leaves none for training: use more trials per task \(num_trials_per_task >= 2\)"):
        generate_manifests(["libero_goal"], num_trials_per_task=1, split_mode="holdout", val_trials_per_task=10)


def test_prompt_stream_epochs_and_resume():
    rows = [{"prompt_id": str(i)} for i in range(10)]
    stream = PromptStream(rows, seed=3)
    first = [r["prompt_id"] for r in stream.next(4) + stream.next(4)]
    assert len(set(first)) == 8  # no repeat inside an epoch
    state = stream.state_dict()
    third = [r["prompt_id"] for r in stream.next(4)]  # only 2 left: drop_last starts epoch 1
    assert stream.state_dict() == {"epoch": 1, "position": 4}
    resumed = PromptStream(rows, seed=3)
    resumed.load_state_dict(state)
    assert [r["prompt_id"] for r in resumed.next(4)] == third
    assert sorted(int(r["prompt_id"]) for r in PromptStream(rows, seed=3).next(10)) == list(range(10))
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        stream.next(0)
