"""SRPOLoss against values computed independently here (numpy, plain loops, by hand); bad inputs (stored
log-probs or an advantage that require grad or have the wrong shape, an unknown aggregation) are named,
an all-masked batch gives zero loss, zero gradient and no diagnostics, and bf16 log-probs are computed in
fp32."""

import math

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules.vla import TinyVLA

from srpo_rl.objectives import SRPOLoss, clipped_token_loss

CHUNK, DIM, VOCAB = 8, 7, 256


class TokenTable(TensorDictModuleBase):
    """A policy whose logits are free parameters, one row per step, in ``dtype``: each token is independent,
    so its ratio can be set exactly and its gradient read off exactly."""

    in_keys = ["index"]
    out_keys = []

    def __init__(self, steps, seed=0, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(steps, CHUNK, DIM, VOCAB, generator=gen).to(dtype))

    def get_dist(self, td):
        return torch.distributions.Categorical(logits=self.logits[td["index"]])

    def forward(self, td):
        return td


def table_batch(actor, ratio, advantage, rollout_id, token_mask=None, seed=0):
    """Steps whose stored log-probs make the current/old ratio equal ``ratio`` [M, 8, 7]."""
    steps = ratio.shape[0]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (steps, CHUNK, DIM), generator=gen)
    td = TensorDict(index=torch.arange(steps), action_tokens=tokens, batch_size=[steps])
    with torch.no_grad():
        logp = actor.get_dist(td).log_prob(tokens)
    td["action_log_prob"] = logp - ratio.log()
    td["advantage"] = advantage
    td["rollout_id"] = rollout_id
    td["token_mask"] = (
        torch.ones(steps, CHUNK, DIM, dtype=torch.bool) if token_mask is None else token_mask
    )
    return td


def reference_token_loss(ratio, adv, low=0.8, high=1.28, c=None):
    """The reference formula, written out with numpy."""
    ratio, adv = np.asarray(ratio, np.float64), np.asarray(adv, np.float64)
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, low, high))
    if c is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
    return loss


# ---- the per-token formula ---------------------------------------------------------------------
CASES = [
    # ratio, advantage, expected loss, gradient flows
    (1.27, +1.0, -1.27, True),  # just inside the upper bound
    (1.29, +1.0, -1.28, False),  # just outside: clipped, no gradient
    (0.81, +1.0, -0.81, True),  # below 1 - eps with A > 0: pessimistic branch is unclipped
    (0.79, +1.0, -0.79, True),
    (0.81, -1.0, +0.81, True),  # just inside the lower bound
    (0.79, -1.0, +0.80, False),  # just outside: clipped, no gradient
    (1.27, -1.0, +1.27, True),  # above 1 + eps with A < 0: unclipped
    (1.29, -1.0, +1.29, True),
    (1.00, 0.0, 0.0, False),  # zero advantage: nothing to learn
]


@pytest.mark.parametrize("ratio,adv,expected,flows", CASES)
def test_clip_bounds_value_and_gradient(ratio, adv, expected, flows):
    r = torch.tensor(ratio, dtype=torch.float64, requires_grad=True)
    loss = clipped_token_loss(r, torch.tensor(adv, dtype=torch.float64), 0.8, 1.28)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert (r.grad.item() != 0) == flows
    if flows:
        assert r.grad.item() == pytest.approx(-adv)


def test_clipped_token_loss_matches_numpy_on_a_grid():
    ratio = torch.linspace(0.01, 20.0, 401, dtype=torch.float64)
    for adv in (-2.5, -1.0, 0.0, 0.3, 4.0):
        a = torch.full_like(ratio, adv)
        for c in (None, 3.0):
            got = clipped_token_loss(ratio, a, 0.8, 1.28, c).numpy()
            np.testing.assert_allclose(got, reference_token_loss(ratio, a, c=c), rtol=0, atol=1e-12)


def test_dual_clip_caps_negative_advantages():
    ratio = torch.tensor([5.0, 2.0, 5.0, 5.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    c = torch.tensor([3.0, 3.0, 3.0, 10000.0])
    loss = torch.stack(
        [clipped_token_loss(ratio[i], adv[i], 0.8, 1.28, float(c[i])) for i in range(4)]
    )
    # A < 0: min(max(5, 1.28), 3) = 3 (no gradient); 2 < 3 unaffected; A > 0 unaffected;
    # the recipe's 10000 never binds
    torch.testing.assert_close(loss, torch.tensor([3.0, 2.0, -1.28, 5.0], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))


# ---- through the loss module and a real actor --------------------------------------------------
def test_clipped_tokens_get_zero_gradient_through_the_actor():
    actor = TokenTable(steps=2)
    # step 0: A > 0, step 1: A < 0; each token gets its own ratio from the grid below
    grid = torch.tensor([1.27, 1.29, 0.79, 0.81, 1.0, 1.5, 0.5])
    ratio = grid.expand(2, CHUNK, DIM).clone()
    td = table_batch(actor, ratio, torch.tensor([1.0, -1.0]), torch.tensor([0, 1]))
    loss = SRPOLoss(actor)
    out = loss(td)
    out["loss_objective"].backward()
    moved = actor.logits.grad.abs().sum(-1) > 0  # [2, 8, 7]
    upper_clipped = grid > 1.28
    lower_clipped = grid < 0.8
    assert torch.equal(moved[0], (~upper_clipped).expand(CHUNK, DIM))
    assert torch.equal(moved[1], (~lower_clipped).expand(CHUNK, DIM))
    assert out["clip_fraction_high"].item() == pytest.approx(2 / 14)
    assert out["clip_fraction_low"].item() == pytest.approx(2 / 14)
    assert out["clip_fraction"].item() == pytest.approx(4 / 14)
    # value: two trajectories of 56 tokens each, mean over each then over both
    per_token = reference_token_loss(ratio.numpy(), np.array([1.0, -1.0])[:, None, None])
    expected = np.mean([per_token[0].mean(), per_token[1].mean()])
    assert out["loss_objective"].item() == pytest.approx(expected, rel=1e-5)


def test_dual_clip_through_the_loss():
    actor = TokenTable(steps=1)
    ratio = torch.full((1, CHUNK, DIM), 4.0)
    td = table_batch(actor, ratio, torch.tensor([-1.0]), torch.tensor([0]))
    off = SRPOLoss(actor)(td)
    on = SRPOLoss(actor, clip_ratio_c=3.0)(td)
    assert off["loss_objective"].item() == pytest.approx(4.0, rel=1e-5)
    assert on["loss_objective"].item() == pytest.approx(3.0, rel=1e-5)
    assert on["dual_clip_fraction"].item() == 1.0
    assert "dual_clip_fraction" not in off.keys()
    on["loss_objective"].backward()
    assert actor.logits.grad.abs().sum() == 0


def test_log_ratio_is_clamped_at_20():
    actor = TokenTable(steps=1)
    td = table_batch(actor, torch.ones(1, CHUNK, DIM), torch.tensor([-1.0]), torch.tensor([0]))
    td["action_log_prob"] = td["action_log_prob"] - 30.0  # log ratio +30
    out = SRPOLoss(actor)(td)
    assert out["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert out["loss_objective"].item() == pytest.approx(math.exp(20.0), rel=1e-5)


def make_ragged_batch(actor, seed=0):
    """3 trajectories (2, 3 and 1 steps), token masks with partial chunks, ratios in (0.5, 1.6)."""
    gen = torch.Generator().manual_seed(seed)
    rollout_id = torch.tensor([7, 7, 3, 3, 3, 11])
    ratio = torch.empty(6, CHUNK, DIM).uniform_(0.5, 1.6, generator=gen)
    chunk_steps = torch.tensor([8, 5, 8, 8, 2, 3])  # executed sub-steps of each decision
    mask = (torch.arange(CHUNK)[None, :] < chunk_steps[:, None])[..., None].expand(6, CHUNK, DIM)
    advantage = torch.tensor([1.5, 1.5, -0.5, -0.5, -0.5, 0.7])
    return table_batch(actor, ratio, advantage, rollout_id, mask.clone(), seed=seed), ratio


def hand_aggregate(ratio, td, aggregation):
    ratio = ratio.numpy().astype(np.float64)
    mask = td["token_mask"].numpy()
    adv = td["advantage"].numpy().astype(np.float64)
    per_token = reference_token_loss(ratio, adv[:, None, None])
    if aggregation == "token-mean":
        return per_token[mask].mean()
    means = []
    for rid in dict.fromkeys(td["rollout_id"].tolist()):
        rows = [i for i, r in enumerate(td["rollout_id"].tolist()) if r == rid]
        means.append(np.concatenate([per_token[i][mask[i]] for i in rows]).mean())
    return np.mean(means)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_aggregation_matches_hand_computation(aggregation):
    actor = TokenTable(steps=6)
    td, ratio = make_ragged_batch(actor)
    out = SRPOLoss(actor, aggregation=aggregation)(td)
    assert out["loss_objective"].item() == pytest.approx(
        hand_aggregate(ratio, td, aggregation), rel=1e-5
    )


def test_aggregations_differ_on_unequal_lengths():
    actor = TokenTable(steps=6)
    td, _ = make_ragged_batch(actor)
    seq = SRPOLoss(actor)(td)["loss_objective"]
    tok = SRPOLoss(actor, aggregation="token-mean")(td)["loss_objective"]
    assert not torch.isclose(seq, tok)


def test_invalid_tokens_do_not_count():
    actor = TokenTable(steps=6)
    td, _ = make_ragged_batch(actor)
    loss = SRPOLoss(actor)
    reference = loss(td)["loss_objective"].item()
    # garbage on masked tokens (a huge ratio) changes neither the loss nor the gradient there
    td["action_log_prob"] = torch.where(td["token_mask"], td["action_log_prob"], -1e4)
    out = loss(td)
    assert out["loss_objective"].item() == pytest.approx(reference, rel=1e-6)
    out["loss_objective"].backward()
    grad_rows = actor.logits.grad.abs().sum(-1)
    assert (grad_rows[~td["token_mask"]] == 0).all()
    assert out["ratio_max"].item() < 1.6


def test_diagnostics_match_numpy():
    actor = TokenTable(steps=6)
    td, ratio = make_ragged_batch(actor, seed=3)
    out = SRPOLoss(actor)(td)
    mask = td["token_mask"].numpy()
    r = ratio.numpy().astype(np.float64)
    adv = np.broadcast_to(td["advantage"].numpy()[:, None, None], r.shape)
    valid = r[mask]
    assert out["ratio_mean"].item() == pytest.approx(valid.mean(), rel=1e-5)
    assert out["ratio_min"].item() == pytest.approx(valid.min(), rel=1e-5)
    assert out["ratio_max"].item() == pytest.approx(valid.max(), rel=1e-5)
    k3 = (valid - 1) - np.log(valid)
    assert out["approx_kl"].item() == pytest.approx(k3.mean(), rel=1e-4)
    high = ((adv > 0) & (r > 1.28))[mask].mean()
    low = ((adv < 0) & (r < 0.8))[mask].mean()
    assert out["clip_fraction_high"].item() == pytest.approx(high)
    assert out["clip_fraction_low"].item() == pytest.approx(low)
    assert high > 0 and low > 0
    logits = actor.logits.detach()[td["index"]].numpy().astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    assert out["entropy"].item() == pytest.approx(entropy[mask].mean(), rel=1e-5)


def test_entropy_coefficient():
    actor = TokenTable(steps=6)
    td, _ = make_ragged_batch(actor)
    plain = SRPOLoss(actor)
    assert "loss_entropy" not in plain(td).keys()
    assert "loss_entropy" not in plain.out_keys
    bonus = SRPOLoss(actor, entropy_coeff=0.01)
    out = bonus(td)
    # the same aggregation as the objective: per trajectory, then across trajectories
    entropy = actor.get_dist(td).entropy().detach()
    mask = td["token_mask"]
    per_traj = [
        entropy[td["rollout_id"] == rid][mask[td["rollout_id"] == rid]].mean() for rid in (7, 3, 11)
    ]
    expected = -0.01 * torch.stack(per_traj).mean()
    assert out["loss_entropy"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss_entropy"].requires_grad


def test_ratio_is_one_before_the_first_update():
    actor = TokenTable(steps=6)
    td, _ = make_ragged_batch(actor)
    with torch.no_grad():
        td["action_log_prob"] = actor.get_dist(td).log_prob(td["action_tokens"])
    out = SRPOLoss(actor)(td)
    assert out["ratio_mean"].item() == pytest.approx(1.0)
    assert out["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["clip_fraction"].item() == 0.0
    # loss = -mean over trajectories of A
    assert out["loss_objective"].item() == pytest.approx(-(1.5 - 0.5 + 0.7) / 3, rel=1e-5)


# ---- micro-batch accumulation with a real TorchRL VLA head -------------------------------------
@pytest.fixture(scope="module")
def tiny_vla_batch():
    torch.manual_seed(0)
    actor = TinyVLA(
        action_dim=DIM,
        chunk_size=CHUNK,
        action_head="tokens",
        vocab_size=VOCAB,
        log_probs_mode="token",
        hidden_dim=32,
        return_vla_action_container=False,
    )
    steps = 9
    td = TensorDict(
        {
            ("observation", "image"): torch.randint(0, 255, (steps, 3, 16, 16), dtype=torch.uint8),
            ("observation", "state"): torch.randn(steps, 8),
            "language_instruction": ["open the drawer"] * steps,
        },
        [steps],
    )
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        td = actor(td)
    # three trajectories of 4, 2 and 3 steps; the last step of each partly executed
    td["rollout_id"] = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    chunk_steps = torch.tensor([8, 8, 8, 3, 8, 6, 8, 8, 1])
    td["token_mask"] = (
        (torch.arange(CHUNK) < chunk_steps[:, None])[..., None].expand(steps, CHUNK, DIM).clone()
    )
    td["advantage"] = torch.tensor([1.2, 1.2, 1.2, 1.2, -0.4, -0.4, -0.8, -0.8, -0.8])
    # move the policy away from the behaviour policy so some tokens clip
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return actor, td


def make_vla_loss(actor, aggregation):
    loss = SRPOLoss(actor, aggregation=aggregation)
    loss.set_keys(action=("vla_action", "tokens"), sample_log_prob=("vla_action", "log_probs"))
    return loss


def grads(actor):
    return [p.grad.clone() for p in actor.parameters()]


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize(
    "splits",
    [[4, 2, 3], [2, 2, 2, 2, 1], [5, 4], [1] * 9],
    ids=["whole-trajectories", "pairs", "cut-trajectories", "single-steps"],
)
def test_micro_batch_accumulation_equals_full_batch(tiny_vla_batch, aggregation, splits):
    actor, td = tiny_vla_batch
    loss = make_vla_loss(actor, aggregation)
    actor.zero_grad()
    full = loss(td)
    full["loss_objective"].backward()
    assert 0 < full["clip_fraction"].item() < 1
    expected = grads(actor)

    minibatch = loss.add_token_weights(td.clone())
    actor.zero_grad()
    total = 0.0
    for micro in minibatch.split(splits):
        out = loss(micro)
        out["loss_objective"].backward()
        total += out["loss_objective"].item()
    assert total == pytest.approx(full["loss_objective"].item(), rel=1e-5, abs=1e-7)
    for got, want in zip(grads(actor), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_micro_batches_without_weights_are_not_the_full_batch(tiny_vla_batch):
    # why the weights exist: a per-micro-batch mean weighs short slices like long ones
    actor, td = tiny_vla_batch
    loss = make_vla_loss(actor, "seq-mean-token-mean")
    full = loss(td)["loss_objective"].item()
    naive = sum(loss(micro)["loss_objective"].item() for micro in td.split([5, 4])) / 2
    assert naive != pytest.approx(full, rel=1e-3)


def test_token_weights_by_hand(tiny_vla_batch):
    _, td = tiny_vla_batch
    actor = TokenTable(steps=9)
    loss = SRPOLoss(actor)
    # valid tokens per trajectory: 3*56 + 21 = 189, 56 + 42 = 98, 112 + 7 = 119
    expected = torch.tensor([1 / (3 * 189)] * 4 + [1 / (3 * 98)] * 2 + [1 / (3 * 119)] * 3)
    torch.testing.assert_close(loss.token_weights(td), expected)
    token_mean = SRPOLoss(actor, aggregation="token-mean").token_weights(td)
    torch.testing.assert_close(token_mean, torch.full((9,), 1 / (189 + 98 + 119)))


# ---- keys and arguments ------------------------------------------------------------------------
def test_set_keys_renames_every_input():
    actor = TokenTable(steps=6)
    td, _ = make_ragged_batch(actor)
    reference = SRPOLoss(actor)(td)["loss_objective"]
    renamed = TensorDict(
        {
            "index": td["index"],
            ("chunk", "tokens"): td["action_tokens"],
            ("chunk", "old_lp"): td["action_log_prob"],
            "adv": td["advantage"],
            "valid": td["token_mask"],
            "traj": td["rollout_id"],
        },
        td.batch_size,
    )
    loss = SRPOLoss(actor)
    loss.set_keys(
        action=("chunk", "tokens"),
        sample_log_prob=("chunk", "old_lp"),
        advantage="adv",
        token_mask="valid",
        rollout_id="traj",
    )
    assert ("chunk", "tokens") in loss.in_keys and "traj" in loss.in_keys
    torch.testing.assert_close(loss(renamed)["loss_objective"], reference)
    # a misspelt name and a PPO key the loss inherits but never reads are both refused
    for name in ("action_token", "value_target"):
        with pytest.raises(ValueError, match=rf"SRPOLoss reads no '{name}' key .* the keys it reads are action, "):
            loss.set_keys(**{name: "x"})
    assert loss.tensor_keys.value_target == "value_target" and loss.tensor_keys.action == ("chunk", "tokens")


def test_default_clip_bounds_are_the_recipe():
    loss = SRPOLoss(TokenTable(steps=1))
    assert loss.clip_epsilon_low.item() == pytest.approx(0.2)
    assert loss.clip_epsilon_high.item() == pytest.approx(0.28)
    assert loss.clip_ratio_c is None
    assert loss.entropy_coeff.item() == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"aggregation": "token_sum"}, "unknown aggregation 'token_sum'"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c=1.0 must be > 1"),
        ({"clip_epsilon": (1.2, 0.28)}, "low must be < 1"),
        ({"clip_epsilon": (0.2, -0.1)}, "non-negative"),
        ({"entropy_coeff": -0.1}, "entropy_coeff=-0.1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SRPOLoss(TokenTable(steps=1), **kwargs)


def test_an_actor_without_a_distribution_is_refused():
    with pytest.raises(TypeError, match="actor_network must be a tensordict module with in_keys and get_dist.*Linear"):
        SRPOLoss(torch.nn.Linear(2, 2))


def test_a_value_estimator_is_refused_with_where_the_advantage_comes_from():
    # torchrl's PPO losses build a GAE estimator on request; this loss has no critic to feed one
    with pytest.raises(NotImplementedError, match=r"no critic .*srpo_rl.objectives.GroupAdvantage"):
        SRPOLoss(TokenTable(steps=1)).make_value_estimator()


def test_missing_inputs_are_named():
    actor = TokenTable(steps=6)
    td, ratio = make_ragged_batch(actor)
    with pytest.raises(KeyError, match="advantage"):
        SRPOLoss(actor)(td.exclude("advantage"))
    with pytest.raises(KeyError, match="rollout_id"):
        SRPOLoss(actor)(td.exclude("rollout_id"))
    with pytest.raises(KeyError, match=r"no sample_log_prob under 'action_log_prob'.*set_keys\(sample_log_prob="):
        SRPOLoss(actor)(td.exclude("action_log_prob"))
    with pytest.raises(KeyError, match=r"no action under 'action_tokens'"):
        SRPOLoss(actor)(td.exclude("action_tokens"))
    # token-mean does not need trajectory ids: the same loss without them
    out = SRPOLoss(actor, aggregation="token-mean")(td.exclude("rollout_id"))
    assert out["loss_objective"].item() == pytest.approx(hand_aggregate(ratio, td, "token-mean"), rel=1e-5)
    with pytest.raises(ValueError, match="token mask"):
        SRPOLoss(actor)(td.set("token_mask", td["token_mask"][..., :3]))


# ---- bad inputs, an all-masked batch, bf16 log-probs -------------------------------------------
def steps_batch(actor, rollout_id=(0, 0, 1), advantage=(1.0, 1.0, -1.0), shift=None):
    """Decision steps whose stored log-probs are the actor's own, minus ``shift`` (so the ratio is ``exp(shift)``)."""
    steps = len(rollout_id)
    tokens = torch.randint(0, VOCAB, (steps, CHUNK, DIM), generator=torch.Generator().manual_seed(1))
    td = TensorDict(index=torch.arange(steps), action_tokens=tokens, batch_size=[steps])
    with torch.no_grad():
        log_prob = actor.get_dist(td).log_prob(tokens)
    td["action_log_prob"] = log_prob if shift is None else (log_prob - shift).to(log_prob.dtype)
    td["advantage"] = torch.tensor(advantage)
    td["rollout_id"] = torch.tensor(rollout_id)
    td["token_mask"] = torch.ones(steps, CHUNK, DIM, dtype=torch.bool)
    return td


def test_stored_log_probs_that_require_grad_are_refused():
    # log-probs taken with grad at rollout time would let the loss differentiate through the "old" policy
    actor = TokenTable(steps=3)
    td = steps_batch(actor)
    td["action_log_prob"] = actor.get_dist(td).log_prob(td["action_tokens"])  # no torch.no_grad()
    with pytest.raises(RuntimeError, match="the stored log-probs 'action_log_prob' require grad"):
        SRPOLoss(actor)(td)


def test_an_advantage_that_requires_grad_is_refused():
    actor = TokenTable(steps=3)
    td = steps_batch(actor)
    td["advantage"] = torch.tensor([1.0, 1.0, -1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="the advantage requires grad; it must be a constant of the loss"):
        SRPOLoss(actor)(td)


def test_stored_log_probs_of_another_shape_are_named():
    # e.g. log-probs stored per step ([M, 8]) or for another action dimension: a broadcast would hide it
    actor = TokenTable(steps=3)
    td = steps_batch(actor)
    td["action_log_prob"] = td["action_log_prob"][..., :6].contiguous()
    with pytest.raises(ValueError, match=r"current log-probs have shape \(3, 8, 7\) but the stored "
                                         r"'action_log_prob' have \(3, 8, 6\)"):
        SRPOLoss(actor)(td)


def test_an_advantage_of_the_wrong_shape_is_named():
    actor = TokenTable(steps=3)
    td = steps_batch(actor)
    td["advantage"] = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"advantage has shape \(3, 2\); expected one value per step \(3,\) "
                                         r"or per token \(3, 8, 7\)"):
        SRPOLoss(actor)(td)


def test_an_unknown_aggregation_is_named_with_the_choices():
    with pytest.raises(ValueError, match="unknown aggregation 'seq-mean-token-sum'; choose one of "
                                         "seq-mean-token-mean, token-mean"):
        SRPOLoss(TokenTable(steps=1), aggregation="seq-mean-token-sum")


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_an_all_masked_batch_gives_zero_loss_zero_gradient_and_no_diagnostics(aggregation):
    # what update_policy feeds a rank that has run out of slices (trainer._without_tokens: "zero loss, zero
    # gradient, no diagnostics"); the stored log-probs are far off, so a leak of any masked token would show
    actor = TokenTable(steps=3)
    td = steps_batch(actor, shift=torch.full((3, CHUNK, DIM), 3.0))
    td["token_mask"] = torch.zeros_like(td["token_mask"])
    out = SRPOLoss(actor, aggregation=aggregation, clip_ratio_c=3.0)(td)
    out["loss_objective"].backward()
    assert out["loss_objective"].item() == 0.0
    assert torch.count_nonzero(actor.logits.grad) == 0
    for key in ("entropy", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "dual_clip_fraction",
                "approx_kl", "ratio_mean"):
        assert out[key].item() == 0.0, key  # means over no token: 0, not 0 / 0
    assert out["ratio_min"].isnan() and out["ratio_max"].isnan()  # no token, no extremum


def test_bf16_log_probs_are_computed_in_fp32():
    # the weights 1 / (G * n_traj) (here 1 / 224 and 1 / 112) do not survive bfloat16
    assert torch.tensor(1 / 224, dtype=torch.bfloat16).item() != 1 / 224
    actor = TokenTable(steps=3, dtype=torch.bfloat16)
    shift = torch.empty(3, CHUNK, DIM).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(2))
    td = steps_batch(actor, shift=shift)
    assert td["action_log_prob"].dtype == torch.bfloat16
    out = SRPOLoss(actor)(td)
    assert out["loss_objective"].dtype == torch.float32 and out["ratio_mean"].dtype == torch.float32

    # the same bf16 values, upcast by hand and aggregated in float64
    with torch.no_grad():
        current = actor.get_dist(td).log_prob(td["action_tokens"]).double()
    ratio = (current - td["action_log_prob"].double()).exp()
    advantage = torch.tensor([1.0, 1.0, -1.0]).double()[:, None, None]
    # PPO's clipped objective written out (the default dual clip, c = 1e4, bounds nothing here)
    token_loss = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(0.8, 1.28))
    weight = torch.tensor([1 / (2 * 2 * 56), 1 / (2 * 2 * 56), 1 / (2 * 56)]).double()[:, None, None]
    expected = (token_loss * weight).sum()
    assert out["loss_objective"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert out["ratio_mean"].item() == pytest.approx(ratio.mean().item(), rel=1e-5)
