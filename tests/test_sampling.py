"""Group filters, oversampling, refill across rounds, carry-over and checkpointing."""

import pytest
import torch
from tensordict import TensorDict

from srpo_rl.objectives import EmbodiedSampler, filter_groups

N = 4  # rollouts per group


def make_batch(successes, first_group=0, horizon=3, truncated=None, failed=None, gen=None):
    """A trajectory batch: one group per entry of ``successes`` (a list of bools per group)."""
    rows = [s for group in successes for s in group]
    num = len(rows)
    group_id = torch.arange(first_group, first_group + len(successes)).repeat_interleave(
        torch.tensor([len(group) for group in successes], dtype=torch.long)
    )
    lengths = torch.arange(num) % horizon + 1
    mask = torch.arange(horizon) < lengths[:, None]
    batch = TensorDict(
        group_id=group_id,
        rollout_id=torch.arange(num) + 1000 * first_group,
        success=torch.tensor(rows),
        truncated=torch.tensor([False] * num if truncated is None else truncated),
        num_steps=lengths * 8,
        steps=TensorDict(
            mask=mask,
            action_tokens=torch.randint(0, 256, (num, horizon, 8, 7), generator=gen),
            next=TensorDict(chunk_steps=torch.where(mask, 8, 0), batch_size=[num, horizon]),
            batch_size=[num, horizon],
        ),
        batch_size=[num],
    )
    batch["instruction"] = [f"task of group {int(g)}" for g in group_id]
    if failed is not None:
        batch["failed"] = torch.tensor(failed)
    return batch


class Rollouts:
    """A seeded source of rollout rounds: each group succeeds with its own random rate; the
    horizon changes from round to round. Records the requests it receives."""

    def __init__(self, seed, rates=(0.0, 0.25, 0.5, 1.0)):
        self.gen = torch.Generator().manual_seed(seed)
        self.rates = torch.tensor(rates)
        self.requests = []
        self.next_group = 0

    def __call__(self, num_groups):
        self.requests.append(num_groups)
        rate = self.rates[torch.randint(len(self.rates), (num_groups,), generator=self.gen)]
        success = torch.rand(num_groups, N, generator=self.gen) < rate[:, None]
        batch = make_batch(
            success.tolist(), self.next_group, horizon=2 + len(self.requests) % 3, gen=self.gen
        )
        self.next_group += num_groups
        return batch


def group_rate(batch):
    return {
        g: batch["success"][batch["group_id"] == g].float().mean().item()
        for g in batch["group_id"].unique().tolist()
    }


# ---- filters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [8, 10])
def test_accuracy_bounds_are_inclusive(n):
    groups = [[True] * k + [False] * (n - k) for k in range(n + 1)]
    kept, stats = filter_groups(make_batch(groups))
    kept_k = [int(rows[0]) // n for rows in kept]  # group index == k
    assert kept_k == [k for k in range(n + 1) if 0.1 <= k / n <= 0.9]
    if n == 10:
        assert kept_k[0] == 1 and kept_k[-1] == 9  # exactly 0.1 and 0.9 are kept
    assert stats["dropped_accuracy_low"] == 1 and stats["dropped_accuracy_high"] == 1
    assert stats["groups_seen"] == n + 1 and stats["groups_kept"] == n - 1


def test_custom_bounds_on_exact_fractions():
    groups = [[True] * k + [False] * (N - k) for k in range(N + 1)]
    batch = make_batch(groups)
    kept, _ = filter_groups(batch, accuracy_lower_bound=0.25, accuracy_upper_bound=0.75)
    assert [int(r[0]) // N for r in kept] == [1, 2, 3]
    kept, _ = filter_groups(batch, accuracy_lower_bound=0.0, accuracy_upper_bound=1.0)
    assert len(kept) == N + 1
    kept, _ = filter_groups(batch, filter_accuracy=False)
    assert len(kept) == N + 1


def test_truncated_filter_drops_the_whole_group():
    groups = [[True, False, False, False], [True, True, False, False]]
    truncated = [False, False, True, False] + [False] * 4
    batch = make_batch(groups, truncated=truncated)
    kept, stats = filter_groups(batch, filter_truncated=True)
    assert [r.tolist() for r in kept] == [[4, 5, 6, 7]]
    assert stats["dropped_truncated"] == 1 and stats["groups_dropped"] == 1
    kept, stats = filter_groups(batch, filter_truncated=False)
    assert len(kept) == 2 and stats["dropped_truncated"] == 0
    with pytest.raises(KeyError, match="truncated"):
        filter_groups(batch.exclude("truncated"), filter_truncated=True)


def test_truncated_filter_with_max_steps_counts_a_success_on_the_last_step():
    # the reference drops a prompt if any rollout has finish_step >= max_steps; the env's truncated flag
    # (Gymnasium's) is False for a success on the very last step, so only num_steps can tell
    groups = [[True, False, False, False], [True, True, False, False], [True, False, True, False]]
    batch = make_batch(groups)
    batch["num_steps"] = torch.tensor([12, 17, 40, 9] + [40, 24, 8, 16] + [39, 3, 12, 5])
    batch["truncated"][2] = True  # group 0: a failure at the limit, flagged by the env
    # group 1: row 4 succeeded on exactly step 40; group 2: row 8 one step before the limit
    kept, stats = filter_groups(batch, filter_truncated=True, max_steps=40)
    assert [int(r[0]) for r in kept] == [8] and stats["dropped_truncated"] == 2
    kept, stats = filter_groups(batch, filter_truncated=True)  # the flag alone: group 1 stays
    assert [int(r[0]) for r in kept] == [4, 8] and stats["dropped_truncated"] == 1
    kept, stats = filter_groups(batch, filter_truncated=False, max_steps=40)
    assert len(kept) == 3 and stats["dropped_truncated"] == 0
    sampler = EmbodiedSampler(8, filter_truncated=True, max_steps=40)
    assert [sampler.keeps(batch[4 * g : 4 * g + 4]) for g in range(3)] == [False, False, True]
    with pytest.raises(KeyError, match="num_steps"):
        filter_groups(batch.exclude("num_steps"), filter_truncated=True, max_steps=40)
    with pytest.raises(ValueError, match=r"max_steps=0 must be an integer >= 1"):
        EmbodiedSampler(8, max_steps=0)


def test_failed_worker_drops_the_group():
    groups = [[True, False, False, False], [True, True, False, False]]
    batch = make_batch(groups, failed=[False] * 4 + [False, False, False, True])
    kept, stats = filter_groups(batch)
    assert [r.tolist() for r in kept] == [[0, 1, 2, 3]] and stats["dropped_failed"] == 1
    kept, _ = filter_groups(batch, drop_failed=False)
    assert len(kept) == 2


def test_a_group_failing_two_filters_counts_under_both():
    batch = make_batch([[False] * N], truncated=[True] + [False] * (N - 1))
    _, stats = filter_groups(batch, filter_truncated=True)
    assert stats["dropped_accuracy_low"] == 1 and stats["dropped_truncated"] == 1
    assert stats["groups_dropped"] == 1


def test_interleaved_groups_are_gathered_in_order_of_appearance():
    batch = make_batch([[True, False, False, False], [True, True, True, False]])
    order = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])
    kept, _ = filter_groups(batch[order])
    assert [r.tolist() for r in kept] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_keeps_judges_one_group_as_add_does():
    # per group: all fail, 1 of 4, all succeed, 3 of 4 with a truncated rollout, 2 of 4 with a crashed worker
    successes = [[False] * 4, [True, False, False, False], [True] * 4, [True, True, True, False],
                 [True, True, False, False]]
    truncated = [False] * 15 + [True] + [False] * 4  # group 3's last rollout
    failed = [False] * 17 + [True] + [False] * 2  # in group 4
    batch = make_batch(successes, truncated=truncated, failed=failed)
    for sampler in (EmbodiedSampler(8), EmbodiedSampler(8, filter_truncated=True),
                    EmbodiedSampler(8, accuracy_lower_bound=0.5), EmbodiedSampler(8, filter_accuracy=False)):
        sampler.add(batch)
        kept = set(sampler.pop(sampler.num_groups)["group_id"].tolist()) if sampler.num_groups else set()
        judged = {g for g in range(5) if sampler.keeps(batch[batch["group_id"] == g])}
        assert judged == kept
    assert {g for g in range(5) if EmbodiedSampler(8).keeps(batch[batch["group_id"] == g])} == {1, 3}
    with pytest.raises(ValueError, match=r"one group; got group ids \[0, 1\]"):
        EmbodiedSampler(8).keeps(batch[:8])


# ---- oversampling and refill -------------------------------------------------------------------
@pytest.mark.parametrize(
    "factor,cached,expected", [(1.0, 0, 10), (1.5, 3, 15), (1.1, 0, 11), (2.0, 10, 0), (0.5, 7, 5), (1.0, 9, 10)]
)
def test_groups_to_request_is_a_whole_batch_until_the_batch_is_cached(factor, cached, expected):
    sampler = EmbodiedSampler(10, oversample_factor=factor, filter_accuracy=False)
    sampler.add(make_batch([[True] * N] * cached))
    assert sampler.num_groups == cached
    assert sampler.groups_to_request() == expected


def test_refill_across_rounds_and_carry_surplus():
    source = Rollouts(seed=0)  # 2 rounds, the last one leaves a surplus
    sampler = EmbodiedSampler(6, oversample_factor=1.5)
    result = sampler.sample(source)
    assert result.batch is not None and result.reason == "full"
    # 6 groups of N rows, each group's rows consecutive, each inside the bounds
    assert result.batch.batch_size == (6 * N,)
    rates = group_rate(result.batch)
    assert len(rates) == 6 and all(0.1 <= r <= 0.9 for r in rates.values())
    assert result.batch["group_id"].unique_consecutive().numel() == 6
    # each round asked for a whole batch, ceil(1.5 * 6) = 9 groups, until 6 had passed: replay the rounds by hand
    replay, kept = Rollouts(seed=0), 0
    for request in source.requests:
        assert kept < 6 and request == 9
        kept += len(filter_groups(replay(request))[0])
    assert kept >= 6 and kept - 6 == sampler.num_groups
    assert result.rounds == len(source.requests) >= 2
    assert result.stats["groups_requested"] == sum(source.requests)
    assert result.stats["groups_seen"] == sum(source.requests)
    assert result.stats["groups_kept"] == 6 + sampler.num_groups
    assert result.stats["groups_carried"] == sampler.num_groups > 0
    assert (
        result.stats["groups_seen"]
        == result.stats["groups_kept"] + result.stats["groups_dropped"]
    )
    # the next step starts from the carried groups, oldest first
    carried_first = sampler._cache[0]["group_id"][0].item()
    requests_before = len(source.requests)
    second = sampler.sample(source)
    assert second.batch["group_id"][0].item() == carried_first
    assert source.requests[requests_before] == 9  # the carried groups do not fill the batch: a whole batch again


def test_a_loop_owned_by_the_trainer_matches_sample():
    # the same refill written with add / ready / pop, as a trainer that reduces ``ready``
    # across ranks would write it
    sampler, source = EmbodiedSampler(6, oversample_factor=1.5), Rollouts(seed=1)
    rounds = 0
    while not sampler.ready and rounds < sampler.max_rounds:
        sampler.add(source(sampler.groups_to_request()))
        rounds += 1
    manual = sampler.pop()
    expected = EmbodiedSampler(6, oversample_factor=1.5).sample(Rollouts(seed=1))
    assert rounds == expected.rounds
    assert (manual.exclude("instruction") == expected.batch.exclude("instruction")).all()


def test_served_from_carried_groups_without_a_rollout():
    sampler = EmbodiedSampler(2, filter_accuracy=False)
    sampler.add(make_batch([[True] * N] * 5))
    source = Rollouts(seed=0)
    result = sampler.sample(source)
    assert result.rounds == 0 and source.requests == []
    assert result.reason == "full, from carried groups only"
    assert result.batch["group_id"].unique().tolist() == [0, 1]
    assert sampler.num_groups == 3


def test_rounds_of_different_horizons_are_padded():
    sampler = EmbodiedSampler(2, filter_accuracy=False)
    sampler.add(make_batch([[True] * N], first_group=0, horizon=2))
    sampler.add(make_batch([[True] * N], first_group=1, horizon=5))
    batch = sampler.pop()
    assert batch["steps"].batch_size == (2 * N, 5)
    assert not batch["steps", "mask"][:N, 2:].any()
    assert (batch["steps", "next", "chunk_steps"][:N, 2:] == 0).all()
    longest = make_batch([[True] * N], horizon=5)
    assert batch["steps", "mask"][N:].sum() == longest["steps", "mask"].sum()
    assert batch["instruction"][N] == "task of group 1"


def test_nothing_passes_stops_after_max_rounds():
    source = Rollouts(seed=0, rates=(0.0, 1.0))  # every group all-fail or all-success
    sampler = EmbodiedSampler(4, max_rounds=3)
    result = sampler.sample(source)
    assert result.batch is None and result.rounds == 3 and len(source.requests) == 3
    assert result.reason.startswith("skipped: 0 of 4 groups") and "max_rounds=3" in result.reason
    assert result.stats["steps_skipped"] == 1 and result.stats["groups_kept"] == 0
    assert result.stats["dropped_accuracy_low"] + result.stats["dropped_accuracy_high"] == 12


def test_too_few_groups_skip_or_partial():
    def one_good_group(num_groups):
        return make_batch([[True, False, False, False]] + [[False] * N] * (num_groups - 1))

    sampler = EmbodiedSampler(4, max_rounds=2)
    result = sampler.sample(one_good_group)
    assert result.batch is None and sampler.num_groups == 2  # kept for the next step
    assert "they stay carried" in result.reason
    partial = EmbodiedSampler(4, max_rounds=2, allow_partial=True)
    result = partial.sample(one_good_group)
    assert result.batch.batch_size == (2 * N,) and result.reason.startswith("partial: 2 of 4")
    assert partial.num_groups == 0


def test_empty_rounds_count_as_rounds():
    sampler = EmbodiedSampler(1, max_rounds=2)
    result = sampler.sample(lambda n: None)
    assert result.batch is None and result.rounds == 2 and result.stats["groups_seen"] == 0


def test_clear_drops_carried_groups():
    sampler = EmbodiedSampler(1, filter_accuracy=False)
    sampler.add(make_batch([[True] * N] * 3))
    sampler.clear()
    assert sampler.num_groups == 0 and sampler.stats()["groups_carried"] == 0


def test_pop_bounds():
    sampler = EmbodiedSampler(2, filter_accuracy=False)
    sampler.add(make_batch([[True] * N]))
    with pytest.raises(ValueError, match="cannot pop 2 groups: 1 are cached"):
        sampler.pop()


def test_deterministic_given_the_seed():
    def run(seed):
        sampler = EmbodiedSampler(5, oversample_factor=1.3)
        source = Rollouts(seed)
        return [sampler.sample(source).batch for _ in range(3)], source.requests

    (a, req_a), (b, req_b) = run(7), run(7)
    assert req_a == req_b
    for x, y in zip(a, b):
        assert (x.exclude("instruction") == y.exclude("instruction")).all()
        assert x["instruction"] == y["instruction"]


def test_state_dict_round_trip(tmp_path):
    sampler = EmbodiedSampler(6, oversample_factor=1.5)
    source = Rollouts(seed=0)  # leaves groups carried
    sampler.sample(source)
    assert sampler.num_groups > 0
    path = tmp_path / "sampler.pt"
    torch.save(sampler.state_dict(), path)
    # the rollout source at the same point, to replay the same rounds
    replay = Rollouts(seed=0)
    replay.gen.set_state(source.gen.get_state())
    replay.requests, replay.next_group = list(source.requests), source.next_group

    restored = EmbodiedSampler(6, oversample_factor=1.5)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.stats() == sampler.stats()
    expected, got = sampler.sample(source), restored.sample(replay)
    assert got.reason == expected.reason and got.rounds == expected.rounds
    assert (got.batch.exclude("instruction") == expected.batch.exclude("instruction")).all()
    assert got.batch["instruction"] == expected.batch["instruction"]
    assert restored.stats() == sampler.stats()
    with pytest.raises(ValueError, match="unknown sampler counters"):
        restored.load_state_dict({"cache": [], "stats": {"groups_eaten": 1}})


def test_carried_groups_of_another_layout_are_dropped_on_the_next_round(tmp_path):
    # a checkpoint written when the steps had no per-frame timing, resumed by a rollout that has it
    old = EmbodiedSampler(2, filter_accuracy=False)
    old.add(make_batch([[True, False, False, False]] * 3))
    old.pop()  # one group stays carried
    path = tmp_path / "sampler.pt"
    torch.save(old.state_dict(), path)
    resumed = EmbodiedSampler(2, filter_accuracy=False)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.num_groups == 1

    same = make_batch([[True] * N], first_group=10, horizon=5)  # another horizon only: still batchable
    resumed.add(same)
    assert resumed.num_groups == 2
    resumed.pop()

    resumed.load_state_dict(torch.load(path, weights_only=True))
    new = make_batch([[True] * N] * 2, first_group=20)
    new["steps", "next", "frames_step"] = torch.zeros(*new["steps"].batch_size, 1, dtype=torch.long)
    with pytest.warns(UserWarning, match="dropping 1 carried groups"):
        resumed.add(new)
    served = resumed.pop()
    assert served["group_id"].unique().tolist() == [20, 21]
    assert ("steps", "next", "frames_step") in served.keys(True)


# ---- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"accuracy_lower_bound": 0.9, "accuracy_upper_bound": 0.1},
            "accuracy_lower_bound=0.9 is above",
        ),
        ({"accuracy_lower_bound": -0.1}, r"accuracy_lower_bound=-0.1 must lie in \[0, 1\]"),
        ({"accuracy_upper_bound": 1.5}, r"accuracy_upper_bound=1.5 must lie in \[0, 1\]"),
        ({"oversample_factor": 0}, "oversample_factor=0 must be"),
        ({"oversample_factor": -2.0}, "oversample_factor=-2.0 must be"),
        ({"oversample_factor": float("inf")}, "oversample_factor=inf must be"),
        ({"oversample_factor": float("nan")}, "oversample_factor=nan must be"),
        ({"max_rounds": 0}, "max_rounds=0 must be"),
        ({"train_batch_size": 0}, "train_batch_size=0 must be"),
        ({"train_batch_size": -4}, "train_batch_size=-4 must be"),
        ({"train_batch_size": 2.5}, "train_batch_size=2.5 must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"train_batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        EmbodiedSampler(**kwargs)


def test_bad_keys_and_batches():
    sampler = EmbodiedSampler(2)
    with pytest.raises(ValueError, match="unknown key name 'group'"):
        sampler.set_keys(group="gid")
    sampler.set_keys(group_id="gid")
    batch = make_batch([[True, False, False, False]]).rename_key_("group_id", "gid")
    sampler.add(batch)
    assert sampler.num_groups == 1
    with pytest.raises(ValueError, match=r"batch_size \[N\]"):
        sampler.add(batch.unsqueeze(0))
    with pytest.raises(ValueError, match="accuracy_lower_bound=0.5 is above"):
        filter_groups(batch, accuracy_lower_bound=0.5, accuracy_upper_bound=0.2)
