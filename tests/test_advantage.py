"""Group advantages against numpy, their broadcast to tokens, set_keys refusing a typo before it renames
anything (GroupAdvantage's, and in the same parametrized test EmbodiedSampler's and SRPOProgressReward's),
and why torchrl's MCAdvantage is not used for them."""

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives.llm import MCAdvantage

from srpo_rl.objectives import (
    EmbodiedSampler,
    filter_groups,
    group_advantages,
    GroupAdvantage,
    token_mask_from_chunk_steps,
)
from srpo_rl.rewards import SRPOProgressReward

CHUNK, DIM = 8, 7


def numpy_grpo(reward, group_id, norm_by_std=True, eps=1e-6):
    reward = np.asarray(reward, np.float64)
    out = np.zeros_like(reward)
    for g in set(group_id.tolist()):
        idx = np.flatnonzero(np.asarray(group_id) == g)
        r = reward[idx]
        mean, std = (0.0, 1.0) if len(r) == 1 else (r.mean(), r.std(ddof=1))
        out[idx] = (r - mean) / (std + eps) if norm_by_std else r - mean
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_matches_numpy_on_shuffled_groups(norm_by_std):
    gen = torch.Generator().manual_seed(0)
    group_id = torch.arange(6).repeat_interleave(8)[torch.randperm(48, generator=gen)] * 10 + 3
    reward = torch.where(torch.rand(48, generator=gen) < 0.4, 5.0, 5 * 0.6 * torch.rand(48, generator=gen))
    got = group_advantages(reward, group_id, norm_by_std=norm_by_std)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), numpy_grpo(reward, group_id, norm_by_std), atol=1e-5)


def test_by_hand():
    # one success in four, binary reward x5: mean 1.25, unbiased std 2.5
    got = group_advantages(torch.tensor([5.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(got, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-6, rtol=0)
    # a biased std (sqrt(75/16) = 2.165) would give 1.732 for the success
    got = group_advantages(
        torch.tensor([5.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), norm_by_std=False
    )
    torch.testing.assert_close(got, torch.tensor([3.75, -1.25, -1.25, -1.25]))
    # where the std is of the order of epsilon (1e-6), epsilon shows: rewards 0 and 1e-6 have mean 5e-7 and std
    # 1e-6 / sqrt(2), so the advantages are +-0.5 / (1 / sqrt(2) + 1) = +-0.29289, and +-1 / sqrt(2) without it
    tiny = torch.tensor([0.0, 1e-6])
    half = 0.5 / (2**-0.5 + 1)
    torch.testing.assert_close(group_advantages(tiny, torch.zeros(2, dtype=torch.long)),
                               torch.tensor([-half, half]), atol=1e-4, rtol=0)
    torch.testing.assert_close(group_advantages(tiny, torch.zeros(2, dtype=torch.long), epsilon=0.0),
                               torch.tensor([-(2**-0.5), 2**-0.5]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("value", [0.0, 5.0, 0.3, 1.7])
def test_zero_variance_group_gives_exactly_zero(value):
    reward = torch.full((8,), value)
    got = group_advantages(reward, torch.zeros(8, dtype=torch.long))
    assert torch.equal(got, torch.zeros(8))
    # the naive float32 (r - mean) / (std + 1e-6) leaks rounding noise / 1e-6
    naive = (reward - reward.mean()) / (reward.std() + 1e-6)
    if value == 1.7:
        assert naive.abs().max() > 0.05


def test_size_one_groups_use_mean_zero_std_one():
    reward = torch.tensor([5.0, 1.2, 0.0, 4.0, 2.0])
    group_id = torch.tensor([0, 1, 2, 3, 3])
    got = group_advantages(reward, group_id)
    expected = [5.0 / (1 + 1e-6), 1.2 / (1 + 1e-6), 0.0, 1 / (2**0.5 + 1e-6), -1 / (2**0.5 + 1e-6)]
    torch.testing.assert_close(got, torch.tensor(expected))
    torch.testing.assert_close(
        group_advantages(reward, group_id, norm_by_std=False),
        torch.tensor([5.0, 1.2, 0.0, 1.0, -1.0]),
    )


def test_bad_shapes():
    with pytest.raises(ValueError, match="one value per trajectory"):
        group_advantages(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


# ---- broadcast to steps and tokens -------------------------------------------------------------
def trajectory_batch():
    # 2 groups x 3 trajectories, T = 4 decisions; trajectory i executed num_chunks[i] decisions,
    # the last one stopped after last_chunk_steps[i] sub-steps (success inside the chunk)
    num_chunks = torch.tensor([4, 2, 1, 3, 4, 4])
    last_chunk_steps = torch.tensor([8, 5, 1, 8, 3, 8])
    mask = torch.arange(4) < num_chunks[:, None]
    chunk_steps = torch.where(mask, 8, 0)
    chunk_steps[torch.arange(6), num_chunks - 1] = last_chunk_steps
    return TensorDict(
        reward=torch.tensor([5.0, 0.0, 2.0, 5.0, 5.0, 5.0]),
        group_id=torch.tensor([4, 4, 4, 9, 9, 9]),
        success=torch.tensor([True, False, False, True, True, True]),
        steps=TensorDict(
            mask=mask,
            next=TensorDict(chunk_steps=chunk_steps, batch_size=[6, 4]),
            batch_size=[6, 4],
        ),
        batch_size=[6],
    )


def test_module_broadcasts_to_executed_tokens():
    batch = GroupAdvantage()(trajectory_batch())
    adv = numpy_grpo(batch["reward"], batch["group_id"])
    np.testing.assert_allclose(batch["advantage"].numpy(), adv, atol=1e-6)
    mask = batch["steps", "mask"]
    chunk_steps = batch["steps", "next", "chunk_steps"]
    token_mask = batch["steps", "token_mask"]
    assert token_mask.shape == (6, 4, CHUNK, DIM) and token_mask.dtype == torch.bool
    for i in range(6):
        for t in range(4):
            expected_adv = adv[i] if mask[i, t] else 0.0
            assert batch["steps", "advantage"][i, t].item() == pytest.approx(expected_adv, abs=1e-6)
            for j in range(CHUNK):
                valid = bool(mask[i, t]) and j < int(chunk_steps[i, t])
                assert token_mask[i, t, j].tolist() == [valid] * DIM
    # 3 full chunks + 3 sub-steps for trajectory 4
    assert token_mask[4].sum().item() == (3 * 8 + 3) * DIM
    # the all-success group has zero advantage everywhere
    assert (batch["steps", "advantage"][3:] == 0).all()


def test_token_mask_function_by_hand():
    got = token_mask_from_chunk_steps(
        torch.tensor([[True, True], [False, False]]), torch.tensor([[8, 2], [8, 0]]), 8, 7
    )
    assert got[0, 0].all() and not got[1].any()
    assert got[0, 1, :2].all() and not got[0, 1, 2:].any()


def test_gamma_lam_have_no_effect():
    reference = GroupAdvantage()(trajectory_batch())
    other = GroupAdvantage(gamma=0.9, lam=0.95)(trajectory_batch())
    assert torch.equal(reference["steps", "advantage"], other["steps", "advantage"])


def test_mean_only_option():
    batch = GroupAdvantage(norm_adv_by_std_in_grpo=False)(trajectory_batch())
    np.testing.assert_allclose(
        batch["advantage"].numpy(),
        numpy_grpo(batch["reward"], batch["group_id"], norm_by_std=False),
        atol=1e-6,
    )


def test_set_keys():
    batch = trajectory_batch().rename_key_("reward", "shaped_reward")
    module = GroupAdvantage().set_keys(reward="shaped_reward", step_advantage=("steps", "adv"))
    assert "shaped_reward" in module.in_keys and ("steps", "adv") in module.out_keys
    out = module(batch)
    assert ("steps", "adv") in out.keys(True)
    with pytest.raises(ValueError, match="unknown key name 'rewards'"):
        module.set_keys(rewards="r")


# one test over the three modules with tensor_keys (their common set_keys body is srpo_rl.keys.rename_keys):
# GroupAdvantage here, EmbodiedSampler (test_sampling.py) and SRPOProgressReward (test_rewards.py)
@pytest.mark.parametrize("make", [lambda: GroupAdvantage(), lambda: EmbodiedSampler(train_batch_size=1),
                                  lambda: SRPOProgressReward(binary=True)], ids=["advantage", "sampler", "reward"])
def test_set_keys_with_a_typo_renames_nothing(make):
    # every name is checked before any is set: a call that fails leaves the module reading its old keys
    module = make()
    before = dict(vars(module.tensor_keys))
    with pytest.raises(ValueError, match="unknown key name 'grup_id'; choose one of .*group_id"):
        module.set_keys(group_id="prompt_id", grup_id="x")
    assert dict(vars(module.tensor_keys)) == before
    module.set_keys(group_id="prompt_id")
    assert module.tensor_keys.group_id == "prompt_id"


def test_missing_and_misshapen_inputs_are_named():
    batch = trajectory_batch()
    with pytest.raises(KeyError, match=r"no reward under 'reward'; rename the key with set_keys\(reward=...\)"):
        GroupAdvantage()(batch.exclude("reward"))
    with pytest.raises(KeyError, match=r"no step_mask under \('steps', 'mask'\)"):
        GroupAdvantage()(batch.exclude(("steps", "mask")))
    wide = batch.clone().set("reward", batch["reward"].unsqueeze(-1).expand(-1, 3).clone())
    with pytest.raises(ValueError, match=r"reward has shape \(\d+, 3\): one value per trajectory"):
        GroupAdvantage()(wide)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gamma": 1.5}, "gamma=1.5"),
        ({"lam": -0.1}, "lam=-0.1"),
        ({"epsilon": -1.0}, "epsilon=-1.0"),
        ({"chunk_len": 0}, "chunk_len=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupAdvantage(**kwargs)


# ---- why not torchrl's MCAdvantage -------------------------------------------------------------
def per_step_trajectory(group_id, final_reward, steps=3):
    """A trajectory as MCAdvantage wants it: per-step rows, reward on the last step, done."""
    reward = torch.zeros(steps, 1)
    reward[-1] = final_reward
    done = torch.zeros(steps, 1, dtype=torch.bool)
    done[-1] = True
    return TensorDict(
        group_id=torch.full((steps,), group_id),
        next=TensorDict(reward=reward, done=done, batch_size=[steps]),
        batch_size=[steps],
    )


def run_mcadvantage(transform, group_id, rewards):
    written = [transform.inv(per_step_trajectory(group_id, r)) for r in rewards]
    return [w for w in written if w is not None]


def srpo_keeps(success):
    batch = TensorDict(
        group_id=torch.zeros(len(success), dtype=torch.long),
        success=torch.tensor(success),
        batch_size=[len(success)],
    )
    kept, _ = filter_groups(batch)
    return bool(kept)


def test_mcadvantage_filters_on_the_shaped_return_not_the_success_rate():
    # SRPO's bounds (0.1, 0.9) on the success rate, as RLinf's (0.5, 4.5) on the 5x return
    bounds = (0.5, 4.5)
    # all four failed; the progress reward still ranks them: 5 * (0.1, 0.2, 0.3, 0.4)
    failed_group = [0.5, 1.0, 1.5, 2.0]
    mc = MCAdvantage(4, prompt_key="group_id", trajectory_return="max", keep_return_bounds=bounds)
    written = run_mcadvantage(mc, 0, failed_group)
    assert len(written) == 1  # MCAdvantage trains on a group with no success at all ...
    assert not srpo_keeps([False] * 4)  # ... which the recipe drops before the reward

    # 1 success in 10 with binary failures: rate 0.1, inside SRPO's inclusive bounds, but a mean
    # return of exactly 0.5 is outside MCAdvantage's exclusive ones
    mc = MCAdvantage(10, prompt_key="group_id", trajectory_return="max", keep_return_bounds=bounds)
    assert run_mcadvantage(mc, 1, [5.0] + [0.0] * 9) == []
    assert srpo_keeps([True] + [False] * 9)


def test_mcadvantage_normalisation_agrees_where_it_applies():
    rewards = [5.0, 1.0, 2.5, 5.0]
    mc = MCAdvantage(4, prompt_key="group_id", trajectory_return="max")
    (written,) = run_mcadvantage(mc, 0, rewards)
    mc_adv = written["advantage"].reshape(4, 3)[:, -1]  # one value per trajectory
    ours = group_advantages(torch.tensor(rewards), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mc_adv.reshape(-1), ours, atol=1e-5, rtol=1e-5)
    # but it refuses the reference's size-1 groups
    with pytest.raises(ValueError, match="grpo_size >= 2"):
        MCAdvantage(1, prompt_key="group_id", trajectory_return="max")


def test_mcadvantage_oversampling_leaves_candidates_queued():
    # 8 candidates for a group of 4: failures first, then successes
    mc = MCAdvantage(
        4,
        prompt_key="group_id",
        trajectory_return="max",
        keep_return_bounds=(0.5, 4.5),
        candidate_group_size=8,
    )
    written = run_mcadvantage(mc, 0, [0.0] * 4 + [5.0] * 4)
    assert len(written) == 1
    # the 3 candidates after the written subset start a new queue for the same group id and
    # stay there: they leak into whatever is collected next under that id
    assert mc.get_stats()["queued_trajectories"] == 3
