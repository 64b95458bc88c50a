"""update_policy and recompute_log_probs (srpo_rl/trainer.py) on one process, with a tiny OpenVLA-OFT on ragged
trajectories: the progress bar counts every epoch's executed steps, slices packed across trajectory ends give the
same update as one forward, the gradient is clipped to its norm and a non-finite step skipped, the filled-up last
slice adds nothing to the diagnostics, which are read back once, and stale trajectories get the updated policy's
log-probs (on a GPU too); non-positive batch sizes, no epochs and a negative clip are refused before any step."""

import pytest
import torch
from tensordict import TensorDict

from srpo_rl.models.openvla_oft import write_tiny_checkpoint
from srpo_rl.objectives import GroupAdvantage, SRPOLoss
from srpo_rl.policy import OpenVLAOFTPolicy
from srpo_rl.trainer import executed_steps, recompute_log_probs, update_policy
from test_srpo_loss import TokenTable, steps_batch

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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_openvla_oft"))
    write_tiny_checkpoint(path)
    return path


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


# ---- refusals, on a table of free logits (test_srpo_loss.py's) -------------------------------
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
