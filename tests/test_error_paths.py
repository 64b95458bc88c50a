"""Bad input to the public APIs fails early with a message that names the bad value; documented edge cases
(an all-masked batch, bf16 log-probs, ids across ranks, manifest order) behave as documented."""

import functools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from tensordict import TensorDict
from tensordict.nn import TensorDictModuleBase

from srpo_rl.distributed import init_distributed, reduce_scalar
from srpo_rl.envs.gym_slots import GymSlotEnv
from srpo_rl.examples.reacher_policy import make_reacher_env, reacher_success
from srpo_rl.loggers import MetricLogger
from srpo_rl.manifest import MANIFEST_SCHEMA, PromptStream, generate_manifests, load_manifest
from srpo_rl.objectives import EmbodiedSampler, GroupAdvantage, SRPOLoss
from srpo_rl.rewards import SRPOProgressReward
from srpo_rl.rollout import collect_rollouts, group_requests
from srpo_rl.token_policy import StateTokenPolicy
from srpo_rl.trainer import update_policy

CHUNK, DIM, VOCAB = 8, 7, 256


class TokenTable(TensorDictModuleBase):
    """Free logits, one row per step: the current log-probs are known exactly, in the table's dtype."""

    in_keys = ["index"]
    out_keys = []

    def __init__(self, steps, dtype=torch.float32, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(steps, CHUNK, DIM, VOCAB, generator=gen).to(dtype))

    def get_dist(self, td):
        return torch.distributions.Categorical(logits=self.logits[td["index"]])

    def forward(self, td):
        return td


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


# ---- SRPOLoss ----------------------------------------------------------------------------------
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


# ---- distributed -------------------------------------------------------------------------------
def test_init_distributed_names_an_unknown_device():
    with pytest.raises(ValueError, match="unknown device 'gpu'; choose one of auto, cpu, cuda"):
        init_distributed("gpu")
    assert not dist.is_initialized()  # refused before joining any group


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_init_distributed_refuses_cuda_without_a_cuda_device():
    with pytest.raises(RuntimeError, match="device=cuda but torch sees no CUDA device; use device=cpu or device=auto"):
        init_distributed("cuda")


def test_reduce_scalar_names_a_bad_op_in_a_process_group():
    # a one-process gloo group in this process: reduce_scalar only reaches its op check inside a group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="unknown op 'sum'; choose one of min, max"):
            reduce_scalar(2.5, "sum")
        assert reduce_scalar(2.5, "max") == 2.5 and reduce_scalar(-1.0, "min") == -1.0
    finally:
        dist.destroy_process_group()


def test_reduce_scalar_is_the_identity_without_a_process_group():
    assert not dist.is_initialized()
    assert reduce_scalar(3.0, "min") == 3.0 and reduce_scalar(3.0, "max") == 3.0
    with pytest.raises(ValueError, match="unknown op 'sum'; choose one of min, max"):  # a typo shows on one process
        reduce_scalar(3.0, "sum")


# ---- rollout -----------------------------------------------------------------------------------
def test_group_ids_are_unique_across_ranks_and_rounds():
    # the example's scheme: first_group_id = next_group * world_size + rank, stride world_size, where next_group
    # counts the prompts each rank has taken so far (the same on every rank)
    world_size, n = 2, 4
    requests = {0: [], 1: []}
    next_group = 0
    for prompts_per_rank in (3, 2):  # two refill rounds
        for rank in (0, 1):
            prompts = [(rank, 10 * next_group + i) for i in range(prompts_per_rank)]
            requests[rank] += group_requests(prompts, n, first_group_id=next_group * world_size + rank,
                                             group_id_stride=world_size)
        next_group += prompts_per_rank
    groups = {rank: [r.group_id for r in reqs] for rank, reqs in requests.items()}
    rollouts = {rank: [r.rollout_id for r in reqs] for rank, reqs in requests.items()}
    # rank 0 gets the even groups, rank 1 the odd ones, in order; together they count up without a gap
    assert sorted(set(groups[0])) == [0, 2, 4, 6, 8] and sorted(set(groups[1])) == [1, 3, 5, 7, 9]
    assert not set(rollouts[0]) & set(rollouts[1])
    assert sorted(rollouts[0] + rollouts[1]) == list(range(10 * n))
    # rollout ids g * n .. g * n + n - 1 of group g
    for r in requests[0] + requests[1]:
        assert r.rollout_id // n == r.group_id
    assert [r.rollout_id for r in requests[1][:n]] == [4, 5, 6, 7]  # rank 1's first group is group 1


def test_group_requests_refuses_empty_groups_and_a_stride_that_repeats_ids():
    with pytest.raises(ValueError, match="rollouts_per_group must be >= 1, got 0"):
        group_requests([(0, 0)], 0)
    with pytest.raises(ValueError, match=r"group_id_stride must be >= 1 \(the number of ranks\), got 0"):
        group_requests([(0, 0), (0, 1)], 2, group_id_stride=0)


@pytest.fixture(scope="module")
def reacher():
    """One Reacher slot and a small token policy: a real env that is never reset or stepped here."""
    env = GymSlotEnv(functools.partial(make_reacher_env, image_size=32), 1, success_fn=reacher_success,
                     instructions="reach", max_steps=16, chunk_len=CHUNK)
    policy = StateTokenPolicy(env.state_dim, env.action_dim, CHUNK, hidden_sizes=(8,))
    yield env, policy
    env.close()


@pytest.mark.parametrize("overlap", ["pool", None, "true", 1, 0.0])  # 1 == True, but no mode
def test_collect_rollouts_names_an_invalid_overlap(reacher, overlap):
    env, policy = reacher
    with pytest.raises(ValueError, match=rf"overlap must be False, True \(asynchronous pool\) or 'halves'; "
                                         rf"got {overlap!r}"):
        collect_rollouts(env, policy, group_requests([(0, 0)], 1), overlap=overlap)


@pytest.mark.parametrize("overlap", [True, "halves"])
def test_collect_rollouts_refuses_overlap_on_an_env_without_send_and_receive(reacher, overlap):
    env, policy = reacher
    with pytest.raises(ValueError, match=rf"overlap={overlap!r} needs an env with step_send/step_recv_ready .* "
                                         "GymSlotEnv has none: pass overlap=False"):
        collect_rollouts(env, policy, group_requests([(0, 0)], 1), overlap=overlap)


def test_collect_rollouts_refuses_no_requests(reacher):
    # an empty prompt list expands to no requests, which the rollout refuses rather than returning an empty batch
    env, policy = reacher
    assert group_requests([], 8) == []
    with pytest.raises(ValueError, match="collect_rollouts needs at least one request"):
        collect_rollouts(env, policy, group_requests([], 8))


# ---- loggers -----------------------------------------------------------------------------------
def test_metric_logger_names_an_unknown_logger(tmp_path):
    with pytest.raises(ValueError, match="unknown logger 'tensorbord'; choose from console, tensorboard, wandb"):
        MetricLogger(["console", "tensorbord"], log_dir=tmp_path / "run", experiment_name="typo")
    assert not (tmp_path / "run").exists()  # refused before any backend wrote its folder
    # one name as a string is that logger, not its letters
    assert MetricLogger("console", log_dir=tmp_path / "one", experiment_name="one").types == ["console"]


# ---- manifests ---------------------------------------------------------------------------------
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


# ---- trainer -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sizes, got",
    [
        ({"mini_batch_trajectories": 0}, "got 0, 1, 16"),
        ({"mini_batch_trajectories": 4, "micro_batch_trajectories": 0}, "got 4, 0, 16"),
        ({"mini_batch_trajectories": 4, "traj_mini_batch_size": -2}, "got 4, 1, -2"),
    ],
)
def test_update_policy_names_a_non_positive_batch_size(sizes, got):
    actor = TokenTable(steps=3)
    loss = SRPOLoss(actor)
    optimizer = torch.optim.SGD(actor.parameters(), lr=1.0)
    before = actor.logits.detach().clone()
    steps = steps_batch(actor).unsqueeze(1)  # three one-step trajectories
    steps["mask"] = torch.ones(3, 1, dtype=torch.bool)
    batch = TensorDict(rollout_id=torch.arange(3), steps=steps, batch_size=[3])
    with pytest.raises(ValueError, match="mini_batch_trajectories, micro_batch_trajectories and "
                                         f"traj_mini_batch_size must be >= 1, {got}"):
        update_policy(loss, optimizer, batch, **sizes)
    assert torch.equal(actor.logits.detach(), before)  # refused before any step


@pytest.mark.parametrize("option, message", [({"ppo_epochs": 0}, "ppo_epochs must be >= 1, got 0"),
                                             ({"grad_clip": -1.0}, r"grad_clip must be > 0 \(or None / 0")])
def test_update_policy_refuses_no_epochs_and_a_negative_clip(option, message):
    # a negative clip would scale the gradients by a negative factor: the step would go the wrong way
    actor = TokenTable(steps=3)
    loss = SRPOLoss(actor)
    optimizer = torch.optim.SGD(actor.parameters(), lr=1.0)
    before = actor.logits.detach().clone()
    steps = steps_batch(actor).unsqueeze(1)
    steps["mask"] = torch.ones(3, 1, dtype=torch.bool)
    batch = TensorDict(rollout_id=torch.arange(3), steps=steps, batch_size=[3])
    with pytest.raises(ValueError, match=message):
        update_policy(loss, optimizer, batch, mini_batch_trajectories=3, **option)
    assert torch.equal(actor.logits.detach(), before)


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
