"""FSDP2 over two CPU processes (gloo): the same SRPO update as one process on the whole batch, log-probs
recomputed together by ranks with and without stale trajectories, rollout forwards on weights gathered once, an
evaluation that a rank without rows still joins, and metrics combined over the ranks; on one process,
init_distributed and reduce_scalar name a bad device or op (and reduce_scalar is the identity without a group)."""

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_gloo
from tensordict import TensorDict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from srpo_rl.distributed import DistInfo, gathered, init_distributed, reduce_scalar, shard_actor
from srpo_rl.objectives import SRPOLoss
from srpo_rl.policy import OpenVLAOFTPolicy
from srpo_rl.trainer import recompute_log_probs, update_policy
from test_trainer import NUM_TRAJ, STALE, _batch, _stale_batch, checkpoint  # noqa: F401 (checkpoint: a fixture)


def _update(checkpoint: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    info = DistInfo(rank, world_size, rank, torch.device("cpu"))
    shard_actor(policy.model, info, mixed_precision="fp32")
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    # SGD: the update is linear in the gradient. (Adam's first step is about lr * sign(g), which turns float
    # rounding differences of near-zero gradients into lr-sized differences.)
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    mine = batch[rank::world_size]  # each rank one rollout of every group: equal trajectory counts per rank
    for _ in range(2):  # two optimizer steps, so the second sees updated weights and Adam state
        update_policy(loss, optimizer, mine, mini_batch_trajectories=NUM_TRAJ // world_size,
                      traj_mini_batch_size=2, shuffle=False, grad_clip=1.0)
    return get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank: int, world_size: int, checkpoint: str, out: str) -> None:
    state = _update(checkpoint, rank, world_size)
    if rank == 0:
        torch.save(state, out)


@pytest.mark.slow
def test_two_gloo_processes_match_one(checkpoint, tmp_path):
    spawn_gloo(_worker, 2, checkpoint, str(tmp_path / "fsdp.pt"))
    sharded = torch.load(tmp_path / "fsdp.pt")
    single = _update(checkpoint, 0, 1)
    initial = OpenVLAOFTPolicy.from_pretrained(checkpoint, "libero_goal", dtype=torch.float32).model.state_dict()
    changed = [k for k in single if not torch.equal(single[k], initial[k])]
    assert len(changed) > 50  # the update really moved the trained weights
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-6, msg=key)


def _recompute_worker(rank: int, world_size: int, checkpoint: str, out: str) -> None:
    """Rank 0 holds every stale trajectory, rank 1 none: both must run the same number of sharded forwards."""
    _, loss, _, batch = _stale_batch(checkpoint)
    shard_actor(loss.actor_network.model, DistInfo(rank, world_size, rank, torch.device("cpu")),
                mixed_precision="fp32")
    stale = STALE if rank == 0 else torch.zeros_like(STALE)
    assert recompute_log_probs(loss, batch, stale, slice_steps=2) == (7 if rank == 0 else 0)
    if rank == 0:
        torch.save(batch.get(("steps", loss.tensor_keys.sample_log_prob)), out)


@pytest.mark.slow
def test_ranks_with_and_without_stale_trajectories_recompute_together(checkpoint, tmp_path):
    spawn_gloo(_recompute_worker, 2, checkpoint, str(tmp_path / "log_prob.pt"))
    _, loss, _, batch = _stale_batch(checkpoint)
    recompute_log_probs(loss, batch, STALE, slice_steps=2)
    torch.testing.assert_close(torch.load(tmp_path / "log_prob.pt"),
                               batch.get(("steps", loss.tensor_keys.sample_log_prob)), rtol=1e-5, atol=1e-6)


def _observations() -> TensorDict:
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (NUM_TRAJ, 3, 256, 256), dtype=torch.uint8, generator=g)
    obs = TensorDict({("observation", "image"): image}, [NUM_TRAJ])
    obs.set_non_tensor("instruction", "put the bowl on the plate")
    return obs


def _logits(policy: OpenVLAOFTPolicy, obs: TensorDict) -> torch.Tensor:
    td = policy.preprocess(obs.clone())
    return policy.model.action_logits(td["prompt_ids"], td["prompt_mask"], policy.pixel_values(td["policy_image"]))


def _gathered_worker(rank: int, world_size: int, checkpoint: str, out: str) -> None:
    """Inside ``gathered`` the ranks run different numbers of forwards (as rollouts do), without collectives."""
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    shard_actor(policy.model, DistInfo(rank, world_size, rank, torch.device("cpu")), mixed_precision="fp32")
    obs = _observations()
    logits = []
    with torch.no_grad(), gathered(policy.model):
        for _ in range(3 if rank == 0 else 1):  # rank 1 stops early: a per-forward all-gather would hang
            logits.append(_logits(policy, obs))
        assert not isinstance(policy.model.language_model.model.layers[0].mlp.up_proj.weight, DTensor)
    assert isinstance(policy.model.language_model.model.layers[0].mlp.up_proj.weight, DTensor)  # resharded
    if rank == 0:
        torch.save(logits, out)
    # training after it still runs the sharded update (the same collectives on both ranks)
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    update_policy(loss, optimizer, batch[rank::world_size], mini_batch_trajectories=NUM_TRAJ // world_size,
                  traj_mini_batch_size=2, shuffle=False)


@pytest.mark.slow
def test_gathered_weights_let_ranks_run_different_forwards(checkpoint, tmp_path):
    spawn_gloo(_gathered_worker, 2, checkpoint, str(tmp_path / "logits.pt"))
    logits = torch.load(tmp_path / "logits.pt")
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    obs = _observations()
    with torch.no_grad():
        expected = _logits(policy, obs)
    assert len(logits) == 3
    for got in logits:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _eval_worker(rank: int, world_size: int, checkpoint: str, out: str) -> None:
    """One row for two ranks: rank 1 rolls out nothing, yet must join rank 0's all-gathers of the weights."""
    from srpo_rl.envs import make_libero_env
    from srpo_rl.evaluation import evaluate
    from srpo_rl.manifest import generate_manifests

    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_object", dtype=torch.float32)
    shard_actor(policy.model, DistInfo(rank, world_size, rank, torch.device("cpu")), mixed_precision="fp32")
    _, rows = generate_manifests(["libero_object"], num_trials_per_task=1)
    env = make_libero_env("libero_object", num_envs=1, max_steps=8)
    try:
        result = evaluate(env, policy, rows[:1], rank=rank, world_size=world_size, progress=False)
    finally:
        env.close()
    torch.save((result.trials, result.failed, result.settings), f"{out}.{rank}")


@pytest.mark.slow
def test_ranks_without_rows_join_the_evaluation_s_collectives(checkpoint, tmp_path):
    spawn_gloo(_eval_worker, 2, checkpoint, str(tmp_path / "eval"), timeout_s=120)  # it hung before
    for rank in range(2):
        trials, failed, settings = torch.load(tmp_path / f"eval.{rank}")
        assert trials == {("libero_object", 0): 1} and failed == {("libero_object", 0): 0}  # summed over ranks
        assert settings == {"max_steps": 8, "num_steps_wait": 10}


def _metrics_worker(rank: int, world_size: int, out: str) -> None:
    from tensordict import TensorDict

    from srpo_rl.distributed import combine_metrics
    from srpo_rl.examples.utils_srpo import batch_metrics

    mine = {"rollout/success_rate": [0.5, 0.25][rank], "rollout/trajectories": [4.0, 12.0][rank],
            "time/rollout_env": [3.0, 5.0][rank], "train/ratio_min": [0.9, 0.8][rank]}
    if rank == 0:
        mine["train/failure_progress_mean"] = 0.75  # a figure only one rank has
    combined = combine_metrics(mine, weight=mine["rollout/trajectories"], summed=["rollout/trajectories"])
    rewards = [[5.0, 1.0, 0.5], [5.0, 2.5]][rank]
    batch = TensorDict(reward=torch.tensor(rewards), advantage=torch.tensor(rewards) - 2.0,
                       success=torch.tensor([r == 5.0 for r in rewards]), progress=torch.tensor(rewards) / 5.0,
                       batch_size=[len(rewards)])
    torch.save((combined, batch_metrics(batch)), f"{out}.{rank}")


def test_metrics_are_combined_over_the_ranks():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        spawn_gloo(_metrics_worker, 2, f"{folder}/metrics", timeout_s=60)
        results = [torch.load(f"{folder}/metrics.{rank}") for rank in range(2)]
    assert results[0] == results[1]  # every rank logs the same figures
    combined, batch = results[0]
    assert combined["rollout/success_rate"] == pytest.approx((0.5 * 4 + 0.25 * 12) / 16)  # weighted by trajectories
    assert combined["rollout/trajectories"] == 16.0
    assert combined["time/rollout_env"] == 5.0 and combined["train/ratio_min"] == 0.8  # slowest rank; smallest
    assert combined["train/failure_progress_mean"] == 0.75  # the one rank that reports it
    rewards = [5.0, 1.0, 0.5, 5.0, 2.5]  # both ranks' batches together
    mean = sum(rewards) / 5
    assert batch["train/reward_mean"] == pytest.approx(mean)
    assert batch["train/reward_std"] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / 5) ** 0.5)
    assert batch["train/failure_progress_mean"] == pytest.approx((0.2 + 0.1 + 0.5) / 3)
    assert (batch["train/advantage_min"], batch["train/advantage_max"]) == (-1.5, 3.0)


# ---- init_distributed and reduce_scalar on one process -----------------------------------------
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
