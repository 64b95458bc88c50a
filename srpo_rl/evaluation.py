"""Greedy evaluation: success rate per task and per suite over manifest rows.

Every row (one task, one init state) is rolled out once with the argmax policy, as LIBERO's evaluation does,
for the env's ``max_steps``: the SRPO recipe's 512 for every suite, or OpenVLA-OFT's per-suite horizons with
``make_libero_env(..., max_steps="suite")`` (``env.max_steps=suite`` in the example). With several ranks each
takes every ``world_size``-th row and the counts are summed.

Example (a tiny random policy, which succeeds nowhere):
    >>> import tempfile, torch
    >>> from srpo_rl.envs import make_libero_env
    >>> from srpo_rl.manifest import generate_manifests
    >>> from srpo_rl.models.openvla_oft import write_tiny_checkpoint
    >>> from srpo_rl.policy import OpenVLAOFTPolicy
    >>> path = tempfile.mkdtemp()
    >>> _ = write_tiny_checkpoint(path)
    >>> policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_object", dtype=torch.float32)
    >>> _, val_rows = generate_manifests(["libero_object"], num_trials_per_task=1)
    >>> env = make_libero_env("libero_object", num_envs=2, max_steps=16)
    >>> result = evaluate(env, policy, val_rows[:2], progress=False)
    >>> result.suite_success, result.metrics()["val/success_rate"]
    ({'libero_object': 0.0}, 0.0)
    >>> env.close()
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType

from srpo_rl.distributed import all_reduce_sum, gathered
from srpo_rl.envs.suites import canonical_suite
from srpo_rl.rollout import RolloutRequest, RolloutStats, collect_rollouts

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Successes and trials per (suite, task), the task names, and the videos recorded on this rank.

    ``failed`` counts the trials per (suite, task) whose simulation crashed twice (counted as failures, as the
    env could not finish them); ``settings`` the env's episode settings (``max_steps``, ``num_steps_wait``), which
    the JSON report keeps beside the rates.
    """

    successes: dict[tuple[str, int], int]
    trials: dict[tuple[str, int], int]
    task_names: dict[tuple[str, int], str]
    stats: RolloutStats | None = None
    videos: dict[int, torch.Tensor] = field(default_factory=dict)
    failed: dict[tuple[str, int], int] = field(default_factory=dict)
    settings: dict[str, int | str] = field(default_factory=dict)

    @property
    def task_success(self) -> dict[tuple[str, int], float]:
        """Success rate of each ``(suite, task_id)`` over its trials."""
        return {key: self.successes[key] / self.trials[key] for key in self.trials}

    @property
    def suite_success(self) -> dict[str, float]:
        """Success rate of each suite over all its trials (tasks weighted by their trial counts)."""
        suites = sorted({suite for suite, _ in self.trials})
        return {
            s: sum(v for (su, _), v in self.successes.items() if su == s)
            / sum(v for (su, _), v in self.trials.items() if su == s)
            for s in suites
        }

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        """Flat scalars for the logger: overall, per suite and per task success rates."""
        out = {f"{prefix}/success_rate": sum(self.successes.values()) / sum(self.trials.values()),
               f"{prefix}/failed_rollouts": sum(self.failed.values())}
        out.update({f"{prefix}/{suite}/success_rate": rate for suite, rate in self.suite_success.items()})
        out.update({f"{prefix}/{s}/task_{t}/success_rate": rate for (s, t), rate in self.task_success.items()})
        return out

    def table(self) -> str:
        """A human-readable per-task table."""
        lines = [f"{'suite':<15} {'task':>4} {'success':>9}  name"]
        for key in sorted(self.trials):
            rate = self.successes[key] / self.trials[key]
            lines.append(f"{key[0]:<15} {key[1]:>4} {self.successes[key]:>3}/{self.trials[key]:<3} {rate:6.1%}  {self.task_names[key]}")
        lines += [f"{suite:<15} {'all':>4} {rate:>9.1%}" for suite, rate in self.suite_success.items()]
        if sum(self.failed.values()):
            lines.append(f"{sum(self.failed.values())} trial(s) crashed twice in the simulation: counted as failures")
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> Path:
        """Writes the per-task and per-suite rates as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "settings": self.settings,
            "suites": self.suite_success,
            "tasks": [
                {"suite": s, "task_id": t, "task_name": self.task_names[(s, t)], "successes": self.successes[(s, t)],
                 "trials": self.trials[(s, t)], "success_rate": self.successes[(s, t)] / self.trials[(s, t)],
                 "failed_rollouts": self.failed.get((s, t), 0)}
                for s, t in sorted(self.trials)
            ],
        }
        path.write_text(json.dumps(report, indent=2))
        return path


def evaluate(
    env: EnvBase,
    policy: TensorDictModuleBase,
    rows: Sequence[dict],
    *,
    rank: int = 0,
    world_size: int = 1,
    num_videos: int = 0,
    progress: bool = True,
    device: torch.device | None = None,
) -> EvalResult:
    """Rolls out each row once with the greedy policy and counts successes per task (summed over ranks).

    Args:
        env: the batched env (e.g. :class:`~srpo_rl.envs.LiberoVecEnv`); its slots take the rows as they free up.
        policy: the policy, run with ``ExplorationType.DETERMINISTIC`` (argmax tokens).
        rows: manifest rows with ``suite``, ``task_id``, ``trial_id`` (the init state) and ``task_name``
            (:func:`srpo_rl.manifest.ensure_manifests`); every rank passes all of them (at least one; fewer
            than ``world_size`` leaves some ranks none, which still join the collectives).

    Keyword Args:
        rank, world_size: this process's share is ``rows[rank::world_size]``; the counts are all-reduced.
        num_videos: videos to record, on rank 0 only: its first ``num_videos`` rows.
        progress: show a progress bar.
        device: where the all-reduce's tensor lives (the process group's device; CPU by default).

    Returns:
        An :class:`EvalResult`: successes and trials per ``(suite, task_id)`` over all ranks, the task
        names, this rank's rollout stats and rank 0's videos.
    """
    if not rows:
        raise ValueError("evaluate needs at least one manifest row; got none (an empty task selection?)")
    env_suite = getattr(env, "suite", None)  # a LIBERO env runs one suite's task ids
    others = sorted({canonical_suite(r["suite"]) for r in rows} - {canonical_suite(env_suite)}) if env_suite else []
    if others:
        raise ValueError(f"rows of {', '.join(others)} cannot run on this env of {env_suite}: its task ids are "
                         f"{env_suite}'s; evaluate each suite's rows on an env of that suite")
    mine = list(rows)[rank::world_size]
    requests = [RolloutRequest(r["task_id"], r["trial_id"], i, i) for i, r in enumerate(mine)]
    stats = None
    outcome = {}
    if requests:
        trajs, stats = collect_rollouts(
            env, policy, requests, exploration_type=ExplorationType.DETERMINISTIC, keep_steps=False,
            record_videos=num_videos if rank == 0 else 0, progress="validation" if progress else False,
        )
        outcome = dict(zip(trajs["rollout_id"].tolist(), zip(trajs["success"].tolist(), trajs["failed"].tolist())))
    elif isinstance(policy, torch.nn.Module):  # no rows here: the same all-gathers as the ranks that roll out
        with gathered(policy):
            pass
    counts = {f"{r['suite']}|{r['task_id']}|{c}": 0 for r in rows for c in "snf"}  # every key on every rank
    for i, row in enumerate(mine):
        key = f"{row['suite']}|{row['task_id']}"
        success, failed = outcome[i]
        counts[f"{key}|s"] += int(success)
        counts[f"{key}|n"] += 1
        counts[f"{key}|f"] += int(failed)
    totals = all_reduce_sum(counts, device or torch.device("cpu"))
    names = {(r["suite"], r["task_id"]): r["task_name"] for r in rows}
    successes, trials, failed = ({k: int(totals[f"{k[0]}|{k[1]}|{c}"]) for k in names} for c in "snf")
    settings = {name: getattr(env, name) for name in ("max_steps", "num_steps_wait") if hasattr(env, name)}
    return EvalResult(successes, trials, names, stats, stats.videos if stats else {}, failed, settings)
