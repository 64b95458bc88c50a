"""FSDP2 over two CPU processes (gloo): the same SRPO update as one process on the whole batch, and
rollout forwards on weights gathered once."""

import pytest
import torch
from conftest import spawn_gloo
from tensordict import TensorDict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from srpo_rl.distributed import DistInfo, gathered, shard_actor
from srpo_rl.models.openvla_oft import write_tiny_checkpoint
from srpo_rl.objectives import GroupAdvantage, SRPOLoss
from srpo_rl.policy import OpenVLAOFTPolicy
from srpo_rl.trainer import executed_steps, recompute_log_probs, update_policy

NUM_TRAJ, T = 8, 3


def _batch(policy: OpenVLAOFTPolicy) -> TensorDict:
    """Four groups of two trajectories with stored policy outputs, mixed outcomes and ragged lengths."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (NUM_TRAJ * T, 3, 256, 256), dtype=torch.uint8, generator=g)
    obs = TensorDict({("observation", "image"): image}, [NUM_TRAJ * T])
    obs.set_non_tensor("instruction", "put the bowl on the plate")
    with torch.no_grad():
        steps = policy(obs).exclude("observation", "instruction").reshape(NUM_TRAJ, T)
    lengths = torch.tensor([3, 2, 3, 1, 2, 3, 3, 2])
    steps.set("mask", torch.arange(T)[None] < lengths[:, None])
    steps.set(("next", "chunk_steps"), torch.full((NUM_TRAJ, T), 8))
    batch = TensorDict(
        {"rollout_id": torch.arange(NUM_TRAJ), "group_id": torch.arange(NUM_TRAJ) // 2,
         "reward": torch.tensor([5.0, 0.0, 1.3, 5.0, 0.2, 5.0, 2.0, 0.0]), "steps": steps},
        [NUM_TRAJ],
    )
    return GroupAdvantage()(batch)


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_openvla_oft"))
    write_tiny_checkpoint(path)
    return path


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


def test_update_progress_bar_counts_every_epochs_executed_steps(checkpoint, capsys):
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.0)
    metrics = update_policy(SRPOLoss(policy), optimizer, batch, mini_batch_trajectories=4, traj_mini_batch_size=2,
                            ppo_epochs=2, progress="update")
    executed = 3 + 2 + 3 + 1 + 2 + 3 + 3 + 2  # the ragged lengths _batch sets
    bar = capsys.readouterr().err
    assert "update:" in bar and f"/{2 * executed} " in bar, bar
    assert metrics["optimizer_steps"] == 4  # 2 epochs x 2 mini-batches of 4 trajectories
    assert metrics["samples"] == 2 * executed
    quiet = update_policy(SRPOLoss(policy), optimizer, batch, mini_batch_trajectories=8, traj_mini_batch_size=2)
    assert quiet["samples"] == executed and capsys.readouterr().err == ""  # no bar unless asked


def _sgd_update(checkpoint: str, **slicing) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One SGD step of update_policy over _batch's 8 trajectories; the updated weights and each forward's size."""
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    sizes = []
    loss.register_forward_pre_hook(lambda module, args: sizes.append(args[0].batch_size[0]))
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    update_policy(loss, optimizer, batch, mini_batch_trajectories=NUM_TRAJ, shuffle=False, grad_clip=None, **slicing)
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, sizes


def test_slices_are_packed_across_trajectories_and_the_update_is_exact(checkpoint):
    whole, sizes = _sgd_update(checkpoint, traj_mini_batch_size=64)
    assert sizes == [19]  # every executed step of the ragged lengths 3, 2, 3, 1, 2, 3, 3, 2 in one forward
    packed, sizes = _sgd_update(checkpoint, micro_batch_trajectories=2, traj_mini_batch_size=2)
    # 4 steps a forward (2 trajectories' worth of 2-step slices), cut across trajectory ends: 5 forwards,
    # where cutting each trajectory on its own would take 12; the last one's 3 steps filled up to 4 (one shape)
    assert sizes == [4, 4, 4, 4, 4]
    initial = OpenVLAOFTPolicy.from_pretrained(checkpoint, "libero_goal", dtype=torch.float32).model.state_dict()
    assert sum(not torch.equal(whole[k], initial[k]) for k in whole) > 50  # the step really moved the weights
    for key in whole:
        torch.testing.assert_close(packed[key], whole[key], rtol=1e-4, atol=1e-6, msg=key)


def test_grad_clip_rescales_the_step_to_the_clip_norm_and_a_non_finite_step_is_skipped(checkpoint):
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    # the plain gradient of the whole mini-batch, in one forward, and its total norm
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    out = loss(loss.add_token_weights(executed_steps(batch)))
    torch.autograd.backward([v for k, v in out.items() if k.startswith("loss_")])
    grads = [p.grad.detach().clone() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    clip, lr = norm / 10, 0.5
    for p in params:
        p.grad = None

    optimizer = torch.optim.SGD(params, lr=lr)
    metrics = update_policy(loss, optimizer, batch, mini_batch_trajectories=NUM_TRAJ, traj_mini_batch_size=64,
                            shuffle=False, grad_clip=clip)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4) and metrics["skipped_nonfinite_grad"] == 0
    for p, w0, g in zip(params, initial, grads):  # SGD on the gradient scaled to norm `clip`
        torch.testing.assert_close(p.detach(), w0 - lr * g * (clip / norm), rtol=1e-4, atol=1e-6)

    # a NaN advantage makes the gradient NaN: the step is skipped, counted, and the weights stay as they were
    after = [p.detach().clone() for p in params]
    batch["steps", "advantage"][0] = float("nan")
    metrics = update_policy(loss, optimizer, batch, mini_batch_trajectories=NUM_TRAJ, traj_mini_batch_size=64,
                            shuffle=False, grad_clip=clip)
    assert metrics["skipped_nonfinite_grad"] == 1.0 and metrics["optimizer_steps"] == 1
    assert all(torch.equal(p, w) for p, w in zip(params, after))


def test_the_filled_up_last_slice_adds_nothing_to_the_diagnostics(checkpoint):
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    key = ("steps", loss.tensor_keys.sample_log_prob)
    # old log-probs shifted by a different amount at each step: each step has its own ratio
    shift = torch.linspace(-0.3, 0.3, NUM_TRAJ * T).reshape(NUM_TRAJ, T, *[1] * (batch.get(key).dim() - 2))
    batch.set(key, batch.get(key) + shift)
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.0)
    metrics = update_policy(loss, optimizer, batch, mini_batch_trajectories=NUM_TRAJ, micro_batch_trajectories=2,
                            traj_mini_batch_size=2, shuffle=False, grad_clip=None)
    # expected: each slice's token-mean ratio over its real steps, averaged with the slices' step counts
    steps = loss.add_token_weights(executed_steps(batch))
    with torch.no_grad():
        ratio = torch.stack([loss(steps[j : j + 1])["ratio_mean"] for j in range(steps.batch_size[0])]).double()
    tokens = steps["token_mask"].flatten(1).sum(-1).double()
    slices = [range(0, 4), range(4, 8), range(8, 12), range(12, 16), range(16, 19)]  # the 19 steps by 4
    expected = sum(len(s) / 19 * (tokens[list(s)] * ratio[list(s)]).sum() / tokens[list(s)].sum() for s in slices)
    assert metrics["samples"] == 19
    assert metrics["ratio_mean"] == pytest.approx(float(expected), rel=1e-6)


def test_the_update_reads_its_diagnostics_back_once_not_per_slice(checkpoint, monkeypatch):
    # a read-back per slice would make the host wait for each backward before launching the next forward
    reads = []
    # every way a value comes to the host but int(), which each forward takes its prompt's width with (a shape)
    for name in ("__float__", "item", "tolist", "__bool__"):
        read = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _read=read, _name=name: reads.append(_name)
                            or _read(self, *a))
    reads_by_forwards = {}
    for steps in (64, 1):  # one forward over the 19 steps, then 19 forwards of one step
        reads.clear()
        _, sizes = _sgd_update(checkpoint, traj_mini_batch_size=steps)
        reads_by_forwards[len(sizes)] = sorted(reads)
    assert reads_by_forwards[1] == reads_by_forwards[19] and reads_by_forwards[1], reads_by_forwards


def _stale_batch(checkpoint: str) -> tuple[OpenVLAOFTPolicy, SRPOLoss, TensorDict, TensorDict]:
    """_batch sampled, then one SGD step: the policy, its loss, the batch as stored and a copy to refresh."""
    torch.manual_seed(0)
    policy = OpenVLAOFTPolicy.from_pretrained(checkpoint, unnorm_key="libero_goal", dtype=torch.float32)
    batch = _batch(policy)
    loss = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    update_policy(loss, optimizer, batch, mini_batch_trajectories=NUM_TRAJ, shuffle=False, grad_clip=None)
    return policy, loss, batch, batch.clone()


STALE = torch.tensor([True, False, False, True, False, True, False, False])  # 3 + 1 + 3 executed steps


def test_recomputed_log_probs_are_the_updated_policys_on_the_stale_trajectories_only(checkpoint):
    policy, loss, stored, batch = _stale_batch(checkpoint)
    assert recompute_log_probs(loss, batch, STALE, slice_steps=2) == 7  # 4 forwards, the last one filled up
    key = ("steps", loss.tensor_keys.sample_log_prob)
    mask = batch["steps", "mask"]
    for i in range(NUM_TRAJ):
        steps = batch["steps"][i][mask[i]]
        if STALE[i]:  # the updated policy's log-probs of the stored tokens, all steps in one forward
            with torch.no_grad():
                expected = policy.get_dist(steps).log_prob(steps["action_tokens"])
            torch.testing.assert_close(batch.get(key)[i][mask[i]], expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(expected, stored.get(key)[i][mask[i]], atol=1e-3)  # the step moved them
        else:
            assert torch.equal(batch.get(key)[i], stored.get(key)[i])  # fresh rows untouched, bit for bit
        assert torch.equal(batch.get(key)[i][~mask[i]], stored.get(key)[i][~mask[i]])  # unexecuted steps too
    # the point: the stale trajectories' ratios start at 1 again, under the clip's real interval
    with torch.no_grad():
        ratio = loss(loss.add_token_weights(executed_steps(batch[STALE])))["ratio_mean"]
        before = loss(loss.add_token_weights(executed_steps(stored[STALE])))["ratio_mean"]
    assert abs(float(ratio) - 1.0) < 1e-5 and abs(float(before) - 1.0) > 1e-3


@pytest.mark.gpu
def test_log_probs_recomputed_on_the_gpu_land_in_the_host_batch(checkpoint):
    _, loss, _, on_cpu = _stale_batch(checkpoint)
    on_gpu = on_cpu.clone()
    recompute_log_probs(loss, on_cpu, STALE, slice_steps=2)
    loss.to("cuda")
    assert recompute_log_probs(loss, on_gpu, STALE, slice_steps=2, device=torch.device("cuda")) == 7
    key = ("steps", loss.tensor_keys.sample_log_prob)
    assert on_gpu.get(key).device.type == "cpu"  # written back into the batch where it lives
    torch.testing.assert_close(on_gpu.get(key), on_cpu.get(key), rtol=1e-4, atol=1e-4)


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
