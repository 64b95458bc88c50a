"""Manifest generation, loading and validation against the real LIBERO benchmark tables: a missing column, a
column of the wrong type and an empty file are named; PromptStream needs rows, and without shuffling it
follows the manifest's order every epoch."""

import re

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
        # the env gives the policy the suite's own instruction: an edited one would be silently unused
        ({"instruction": "open the top drawer"}, "row 0: instruction 'open the top drawer' is not libero_goal task 0's "
                                                 "instruction 'open the middle drawer of the cabinet'; the env gives "
                                                 "the policy the suite's own instruction"),
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
    with pytest.raises(ValueError, match="num_trials_per_task must be an integer >= 1, got 0"):
        generate_manifests(["libero_goal"], num_trials_per_task=0)
    with pytest.raises(ValueError, match="val_trials_per_task=3 of the 3 trials of libero_goal task 0 leaves none "
                                         "for training: use 1 to 2, or split_mode='shared'"):
        generate_manifests(["libero_goal"], num_trials_per_task=3, split_mode="holdout", val_trials_per_task=3)
    with pytest.raises(ValueError, match=r"leaves none for training: use more trials per task \(num_trials_per_task >= 2\)"):
        generate_manifests(["libero_goal"], num_trials_per_task=1, split_mode="holdout", val_trials_per_task=10)


def test_bad_argument_types_are_named(tmp_path):
    # a bare string is one suite, not a list of the suites 'l', 'i', 'b', ...
    with pytest.raises(TypeError, match=re.escape("suites must be a list of suite names, got the str 'libero_10'; "
                                                  "pass ['libero_10']")):
        generate_manifests("libero_10")
    with pytest.raises(TypeError, match="suites must be a list of suite names"):
        ensure_manifests(tmp_path / "train.parquet", tmp_path / "val.parquet", suites="libero_10")
    with pytest.raises(ValueError, match="suites is empty; give at least one of libero_spatial, "):
        generate_manifests([])
    for bad in (2.5, None, True, "5"):
        with pytest.raises(TypeError, match=re.escape(f"num_trials_per_task must be an integer >= 1, got {bad!r}")):
            generate_manifests(["libero_goal"], num_trials_per_task=bad)
    with pytest.raises(TypeError, match="val_trials_per_task must be an integer, got 2.5"):
        generate_manifests(["libero_goal"], num_trials_per_task=5, split_mode="holdout", val_trials_per_task=2.5)
    assert not list(tmp_path.iterdir())


def test_more_trials_than_init_states_take_all_of_them():
    # the documented cap: min(num_trials_per_task, available), 50 init states per task
    train, _ = generate_manifests(["libero_object"], num_trials_per_task=80)
    assert len(train) == 10 * 50 and max(r["trial_id"] for r in train) == 49


def test_an_alias_and_its_suite_are_one_suite():
    train, val = generate_manifests(["libero_10", "libero_long"])
    assert len(train) == len(val) == 500
    assert len({r["prompt_id"] for r in train}) == 500
    # each suite once, in first-seen order
    train, _ = generate_manifests(["libero_goal", "libero_long", "libero_goal", "libero_10"], num_trials_per_task=1)
    assert [r["suite"] for r in train[::10]] == ["libero_goal", "libero_10"]


def test_alias_rows_load_as_their_suite(tmp_path):
    rows, _ = generate_manifests(["libero_10"], num_trials_per_task=2)
    write_manifest([{**row, "suite": "libero_long"} for row in rows], tmp_path / "train.parquet")
    write_manifest([{**row, "suite": "LIBERO_LONG", "split": "val"} for row in rows], tmp_path / "val.parquet")
    assert load_manifest(tmp_path / "train.parquet") == rows
    train, val = ensure_manifests(tmp_path / "train.parquet", tmp_path / "val.parquet", suites=["libero_10"])
    assert {r["suite"] for r in train} == {r["suite"] for r in val} == {"libero_10"}


def test_a_repeated_init_state_is_named(tmp_path):
    rows, _ = generate_manifests(["libero_goal"], num_trials_per_task=2)
    write_manifest(rows + [rows[1]], tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"m.parquet rows 1 and 20 are the same init state \(libero_goal task 0 "
                                         r"trial 1, prompt_id 'libero_goal_0_1'\): it would count twice in evaluation"):
        load_manifest(tmp_path / "m.parquet")
    # an alias names the same init state
    rows, _ = generate_manifests(["libero_10"], num_trials_per_task=1)
    write_manifest(rows + [{**rows[3], "suite": "libero_long"}], tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"rows 3 and 10 are the same init state \(libero_10 task 3 trial 0"):
        load_manifest(tmp_path / "m.parquet")


def test_holdout_refuses_a_validation_file_that_overlaps_training(tmp_path):
    paths = tmp_path / "train.parquet", tmp_path / "val.parquet"
    ensure_manifests(*paths, suites=["libero_goal"], num_trials_per_task=5)  # shared: the same rows in both
    paths[1].unlink()  # only the validation file is generated again, next to the shared run's train file
    holdout = dict(suites=["libero_goal"], num_trials_per_task=5, split_mode="holdout", val_trials_per_task=2)
    with pytest.raises(ValueError, match=r"split_mode='holdout' but manifests \S+train.parquet and \S+val.parquet "
                                         r"share 20 init state\(s\) \(e.g. libero_goal task 0 trial 3\), so validation "
                                         "would run on trained init states: delete both files"):
        ensure_manifests(*paths, **holdout)
    for path in paths:
        path.unlink()
    train, val = ensure_manifests(*paths, **holdout)
    assert len(train) == 30 and len(val) == 20
    # existing files skip generation, but not the split_mode check (a typo would skip the overlap check)
    with pytest.raises(ValueError, match="unknown split_mode 'holdot'; choose one of shared, holdout"):
        ensure_manifests(*paths, suites=["libero_goal"], split_mode="holdot")


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


def test_a_manifest_without_its_split_column_is_named(tmp_path):
    rows, _ = generate_manifests(["libero_goal"], num_trials_per_task=1)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).drop_columns(["split"])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"m.parquet lacks columns \['split'\]; a manifest has columns suite, "
                                         "task_id, task_name, instruction, trial_id, prompt_id, split"):
        load_manifest(tmp_path / "m.parquet")


def test_a_manifest_column_of_the_wrong_type_is_named(tmp_path):
    rows, _ = generate_manifests(["libero_goal"], num_trials_per_task=1)
    columns = {name: [row[name] for row in rows] for name in MANIFEST_SCHEMA.names}
    columns["task_id"] = [f"task {t}" for t in columns["task_id"]]  # strings that are no int64
    pq.write_table(pa.table(columns), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="m.parquet has columns of the wrong type"):
        load_manifest(tmp_path / "m.parquet")


def test_a_manifest_without_rows_is_refused(tmp_path):
    pq.write_table(MANIFEST_SCHEMA.empty_table(), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="m.parquet has no rows"):
        load_manifest(tmp_path / "m.parquet")


def test_prompt_stream_needs_rows():
    for empty in ([], (row for row in [])):  # an empty generator too (it is truthy)
        with pytest.raises(ValueError, match="PromptStream needs at least one manifest row"):
            PromptStream(empty)


def test_prompt_stream_without_shuffle_follows_manifest_order_every_epoch():
    rows = [{"prompt_id": i} for i in range(5)]
    # the seed plays no part without shuffling
    for seed in (0, 7):
        stream = PromptStream(rows, seed=seed, shuffle=False)
        ids = [[r["prompt_id"] for r in stream.next(2)] for _ in range(3)]
        # the third batch does not fit the 1 row left: drop_last starts epoch 1 at the first row again
        assert ids == [[0, 1], [2, 3], [0, 1]]
        assert stream.state_dict() == {"epoch": 1, "position": 2}
        # more than an epoch: the rest of the manifest does not fit, so a whole epoch, then the start of the next
        assert [r["prompt_id"] for r in stream.next(7)] == [0, 1, 2, 3, 4, 0, 1]
        assert stream.state_dict() == {"epoch": 3, "position": 2}
