"""Task manifests: which (suite, task, init state) rows a run trains and validates on.

A manifest is a parquet file with one row per prompt, i.e. per LIBERO initial state:

=============  ======  ==============================================================
column         type    meaning
=============  ======  ==============================================================
suite          str     canonical suite name (an alias is read as its suite: ``libero_long`` as ``libero_10``)
task_id        int64   task index inside the suite
task_name      str     LIBERO task name
instruction    str     the task's language instruction; must equal the suite's own, the one the env gives
                       the policy (an edited instruction would be silently unused, so loading refuses it)
trial_id       int64   index of the fixed init state of the task (``set_init_state``)
prompt_id      str     ``f"{suite}_{task_id}_{trial_id}"`` (the reference's prompt id)
split          str     ``"train"`` or ``"val"``
=============  ======  ==============================================================

A file holds each (suite, task_id, trial_id) at most once: a repeated row would count twice in evaluation and
be drawn twice an epoch.

The reference recipe (siiRL's ``prepare_libero_train_valid_datasets``) trains and validates on the same
``num_trials_per_task`` init states of every task (``split_mode="shared"``); ``split_mode="holdout"`` keeps
the last ``val_trials_per_task`` init states of every task for validation only.

Example:
    >>> import os, tempfile
    >>> from srpo_rl.manifest import ensure_manifests
    >>> data = tempfile.mkdtemp()  # the files are generated there on first use, then loaded
    >>> train, val = ensure_manifests(os.path.join(data, "train.parquet"), os.path.join(data, "val.parquet"),
    ...                               suites=["libero_object"])
    >>> len(train), train[0]["prompt_id"]
    (500, 'libero_object_0_0')
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from srpo_rl.envs.suites import SUITE_ALIASES, SUITES, canonical_suite, suite_info

__all__ = [
    "MANIFEST_SCHEMA",
    "PromptStream",
    "SPLIT_MODES",
    "ensure_manifests",
    "generate_manifests",
    "load_manifest",
    "suite_tasks",
    "write_manifest",
]

MANIFEST_SCHEMA = pa.schema(
    [
        ("suite", pa.string()),
        ("task_id", pa.int64()),
        ("task_name", pa.string()),
        ("instruction", pa.string()),
        ("trial_id", pa.int64()),
        ("prompt_id", pa.string()),
        ("split", pa.string()),
    ]
)
SPLIT_MODES = ("shared", "holdout")


def suite_tasks(suite: str) -> list[dict]:
    """Lists the tasks of a LIBERO suite: ``task_id``, ``task_name``, ``instruction``, ``num_init_states``."""
    info = suite_info(suite)
    return [
        {"task_id": i, "task_name": name, "instruction": instruction, "num_init_states": states}
        for i, (name, instruction, states) in enumerate(zip(info.task_names, info.instructions, info.num_init_states))
    ]


def _suite_names(suites: Sequence[str]) -> list[str]:
    """The canonical names of ``suites``, each once, in first-seen order (``libero_long`` is ``libero_10``)."""
    valid = f"{', '.join(SUITES)} (or an alias: {', '.join(SUITE_ALIASES)})"
    if isinstance(suites, str):  # iterating it would try its letters as suite names
        raise TypeError(f"suites must be a list of suite names, got the str {suites!r}; pass [{suites!r}]")
    if not isinstance(suites, Sequence):
        raise TypeError(f"suites must be a list of suite names ({valid}), got {suites!r}")
    if not suites:
        raise ValueError(f"suites is empty; give at least one of {valid}")
    # an alias and its suite are one suite: listing both would repeat every row
    return list(dict.fromkeys(canonical_suite(suite) for suite in suites))


def _integer(name: str, value, valid: str) -> int:
    """``value`` as an int; a float, a bool or ``None`` is a TypeError naming ``name``, the value and ``valid``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {valid}, got {value!r}")
    return int(value)


def _check_split_mode(split_mode: str) -> None:
    if split_mode not in SPLIT_MODES:
        raise ValueError(f"unknown split_mode {split_mode!r}; choose one of {', '.join(SPLIT_MODES)}")


def generate_manifests(
    suites: Sequence[str],
    *,
    num_trials_per_task: int = 50,
    split_mode: str = "shared",
    val_trials_per_task: int = 10,
) -> tuple[list[dict], list[dict]]:
    """Builds the train and validation rows for every task of ``suites`` x ``min(num_trials_per_task, available)``.

    ``suites`` is a list of suite names; an alias and a repeated name add nothing (each suite comes once, in
    first-seen order). ``num_trials_per_task`` (an integer >= 1) is capped at each task's number of init states
    (50 for every standard suite), as in the reference: a larger value takes all of them, without an error.
    ``split_mode="shared"`` (the reference) puts the same rows in both; ``"holdout"`` moves the last
    ``val_trials_per_task`` init states of each task to validation.
    """
    _check_split_mode(split_mode)
    names = _suite_names(suites)
    num_trials_per_task = _integer("num_trials_per_task", num_trials_per_task, "an integer >= 1")
    if num_trials_per_task < 1:
        raise ValueError(f"num_trials_per_task must be an integer >= 1, got {num_trials_per_task}")
    if split_mode == "holdout":  # shared mode never reads it; its range is checked per task below
        val_trials_per_task = _integer("val_trials_per_task", val_trials_per_task, "an integer")
    train, val = [], []
    for name in names:
        for task in suite_tasks(name):
            trials = min(num_trials_per_task, task["num_init_states"])
            first_val = trials if split_mode == "shared" else trials - val_trials_per_task
            if split_mode == "holdout" and not 0 < val_trials_per_task < trials:
                left = "none for training" if val_trials_per_task >= trials else "no validation"
                need = f"1 to {trials - 1}" if trials > 1 else "more trials per task (num_trials_per_task >= 2)"
                raise ValueError(
                    f"split_mode='holdout' with val_trials_per_task={val_trials_per_task} of the {trials} trials of "
                    f"{name} task {task['task_id']} leaves {left}: use {need}, or split_mode='shared'"
                )
            for trial_id in range(trials):
                row = {
                    "suite": name,
                    "task_id": task["task_id"],
                    "task_name": task["task_name"],
                    "instruction": task["instruction"],
                    "trial_id": trial_id,
                    "prompt_id": f"{name}_{task['task_id']}_{trial_id}",
                }
                if split_mode == "shared" or trial_id < first_val:
                    train.append({**row, "split": "train"})
                if split_mode == "shared" or trial_id >= first_val:
                    val.append({**row, "split": "val"})
    return train, val


def write_manifest(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Writes rows atomically: a temporary file in the same folder, then a rename (no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=MANIFEST_SCHEMA)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_manifest(path: str | os.PathLike, *, check_tasks: bool = True) -> list[dict]:
    """Reads and validates a manifest: schema and known suites (an alias becomes its canonical name, so every
    consumer keys rows by one name); with ``check_tasks``, also each row against the suite's tables (task id,
    init state, instruction) and that no (suite, task_id, trial_id) repeats."""
    table = pq.read_table(path)
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(
            f"manifest {path} lacks columns {missing}; a manifest has columns "
            f"{', '.join(MANIFEST_SCHEMA.names)}"
        )
    try:
        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"manifest {path} has columns of the wrong type ({err}); expected {MANIFEST_SCHEMA}") from err
    rows = table.to_pylist()
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    _canonicalise_suites(rows, path)
    if check_tasks:
        _check_rows(rows, path)
    return rows


def _canonicalise_suites(rows: list[dict], path) -> None:
    """Rewrites each row's suite to its canonical name, so that an alias row is keyed and checked as its suite."""
    names = {}
    for i, row in enumerate(rows):
        if row["suite"] not in names:
            try:
                names[row["suite"]] = canonical_suite(row["suite"])
            except (TypeError, ValueError) as err:
                raise type(err)(f"manifest {path} row {i}: {err}") from err
        row["suite"] = names[row["suite"]]


def _check_rows(rows: list[dict], path) -> None:
    tasks = {}
    seen = {}  # (suite, task_id, trial_id) -> index of its first row
    for i, row in enumerate(rows):
        suite = row["suite"]  # canonical: _canonicalise_suites ran
        if suite not in tasks:
            tasks[suite] = suite_tasks(suite)
        _check_row(i, row, tasks[suite], path)
        key = (suite, row["task_id"], row["trial_id"])
        if key in seen:
            raise ValueError(
                f"manifest {path} rows {seen[key]} and {i} are the same init state ({suite} task {key[1]} trial "
                f"{key[2]}, prompt_id {row['prompt_id']!r}): it would count twice in evaluation and be drawn twice "
                "an epoch; keep one row per (suite, task_id, trial_id)"
            )
        seen[key] = i


def _check_row(i: int, row: dict, tasks: list[dict], path) -> None:
    suite, task_id = row["suite"], row["task_id"]
    if not 0 <= task_id < len(tasks):
        raise ValueError(
            f"manifest {path} row {i}: unknown task_id {task_id} for {suite}; valid ids are 0..{len(tasks) - 1}"
        )
    n_states = tasks[task_id]["num_init_states"]
    if not 0 <= row["trial_id"] < n_states:
        raise ValueError(
            f"manifest {path} row {i}: trial_id {row['trial_id']} out of range for {suite} task "
            f"{task_id}; valid init states are 0..{n_states - 1}"
        )
    expected = tasks[task_id]["instruction"]
    if row["instruction"] != expected:
        raise ValueError(
            f"manifest {path} row {i}: instruction {row['instruction']!r} is not {suite} task {task_id}'s "
            f"instruction {expected!r}; the env gives the policy the suite's own instruction, so this one would "
            "go unused: restore it (or delete the file to have it generated)"
        )
    if row["split"] not in ("train", "val"):
        raise ValueError(f"manifest {path} row {i}: split {row['split']!r} is not 'train' or 'val'")


def ensure_manifests(
    train_path: str | os.PathLike,
    val_path: str | os.PathLike,
    *,
    suites: Sequence[str],
    num_trials_per_task: int = 50,
    split_mode: str = "shared",
    val_trials_per_task: int = 10,
) -> tuple[list[dict], list[dict]]:
    """Loads the manifests, generating (atomically) whichever file does not exist yet.

    Raises ``ValueError`` when an existing manifest holds a suite outside ``suites`` (e.g. one left in the
    output directory by a run on another suite), whose task ids would otherwise run on the wrong tasks, and
    with ``split_mode="holdout"`` when the two files share an init state (e.g. a train file left by a
    ``"shared"`` run next to a newly generated validation file).
    """
    _check_split_mode(split_mode)
    wanted = set(_suite_names(suites))
    paths = (train_path, val_path)
    if not all(os.path.exists(p) for p in paths):
        generated = generate_manifests(
            suites, num_trials_per_task=num_trials_per_task, split_mode=split_mode, val_trials_per_task=val_trials_per_task
        )
        for rows, path in zip(generated, paths):
            if not os.path.exists(path):
                write_manifest(rows, path)
    manifests = load_manifest(train_path), load_manifest(val_path)
    for rows, path in zip(manifests, paths):
        other = sorted({row["suite"] for row in rows} - wanted)
        if other:
            raise ValueError(
                f"manifest {path} holds suite(s) {', '.join(other)}, but this run is on {', '.join(sorted(wanted))}: "
                "point it at a manifest of these suites, or delete it to have it generated"
            )
    if split_mode == "holdout":
        _check_disjoint(*manifests, *paths)
    return manifests


def _check_disjoint(train: list[dict], val: list[dict], train_path, val_path) -> None:
    # only one file may have been generated now: the other may come from a run with other settings
    trained = {(row["suite"], row["task_id"], row["trial_id"]) for row in train}
    shared = sorted(trained & {(row["suite"], row["task_id"], row["trial_id"]) for row in val})
    if shared:
        suite, task_id, trial_id = shared[0]
        raise ValueError(
            f"split_mode='holdout' but manifests {train_path} and {val_path} share {len(shared)} init state(s) "
            f"(e.g. {suite} task {task_id} trial {trial_id}), so validation would run on trained init states: "
            "delete both files to have them generated together"
        )


class PromptStream:
    """Yields batches of manifest rows epoch after epoch (drop_last), reshuffled each epoch with ``seed``
    (``shuffle=False``: in manifest order every epoch).

    Its :meth:`state_dict` (epoch and position) goes into checkpoints so a resumed run continues with the
    same next prompts.

    Example:
        >>> train_rows, _ = generate_manifests(["libero_object"], num_trials_per_task=5)  # 10 tasks x 5
        >>> stream = PromptStream(train_rows, seed=0)
        >>> [len(stream.next(16)) for _ in range(4)]  # a new shuffled epoch when fewer than 16 are left
        [16, 16, 16, 16]
        >>> stream.state_dict()["epoch"]
        1
    """

    def __init__(self, rows: Sequence[dict], *, seed: int = 0, shuffle: bool = True) -> None:
        self.rows = list(rows)  # any iterable: an empty generator is empty here, not before
        if not self.rows:
            raise ValueError("PromptStream needs at least one manifest row")
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        generator = np.random.default_rng([self.seed, self.epoch])
        return generator.permutation(len(self.rows)).tolist()

    def next(self, count: int) -> list[dict]:
        """The next ``count`` rows; rows never repeat inside an epoch. ``count`` may exceed one epoch."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        out = []
        while len(out) < count:
            take = min(count - len(out), len(self.rows))
            if self.position + take > len(self.rows):
                self.epoch, self.position = self.epoch + 1, 0
            order = self._order()
            out += [self.rows[i] for i in order[self.position : self.position + take]]
            self.position += take
        return out

    def state_dict(self) -> dict:
        """Epoch and position: what a checkpoint keeps so that a resumed run draws the same next prompts."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
