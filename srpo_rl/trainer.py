"""The SRPO policy update: ppo epochs x mini-batches of trajectories, exact gradient accumulation.

A mini-batch is ``ppo_mini_batch_size`` groups (x ``rollout.n`` trajectories, the recipe's convention) split
over the ranks. Each forward/backward takes ``micro_batch_trajectories x traj_mini_batch_size`` decision steps,
the recipe's micro-batch of trajectories times its slice of chunk-steps. The loss of every token is weighted once
for the whole mini-batch (:meth:`SRPOLoss.add_token_weights`), so the sum of the slices' gradients is exactly the
mini-batch gradient of the recipe's aggregation, however the steps are sliced: the slices are packed across
trajectory boundaries. Cutting each trajectory on its own would end most of them in a short slice (a success
after 150-400 env steps is 19-50 decisions), which costs nearly a full forward/backward for a few samples and
gives the compiled blocks another shape. The mini-batch's last slice is filled up to the same size with steps
whose tokens are masked out, so every forward/backward has one shape. Then one gradient clip and one optimizer
step per mini-batch.

With FSDP every rank must run the same number of forward/backward passes (each one is a collective), but
trajectory lengths differ between ranks: a rank with fewer slices repeats its last slice with every token
masked out (zero gradient). Gradients are reduced across ranks only on the last slice of a mini-batch.

Example: four trajectories of a tiny token policy, five decisions each (two of them ended after three), with
their group advantages; in the recipe ``batch`` comes from :func:`~srpo_rl.rollout.collect_rollouts`, the reward
and :class:`~srpo_rl.objectives.GroupAdvantage` (the README's "Using the parts" example).

    >>> import torch
    >>> from tensordict import TensorDict
    >>> from torchrl.envs.utils import ExplorationType, set_exploration_type
    >>> from srpo_rl.objectives import SRPOLoss
    >>> from srpo_rl.token_policy import StateTokenPolicy
    >>> _ = torch.manual_seed(0)
    >>> policy = StateTokenPolicy(state_dim=3, action_dim=2, chunk_len=4)
    >>> steps = TensorDict({("observation", "state"): torch.randn(4, 5, 3)}, [4, 5])
    >>> with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
    ...     steps = policy(steps)  # the rollout's sampled tokens and their log-probs
    >>> steps["mask"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2] * 2)  # executed decisions
    >>> steps["token_mask"] = steps["mask"][..., None, None].expand(4, 5, 4, 2)
    >>> steps["advantage"] = torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None].expand(4, 5)
    >>> batch = TensorDict(steps=steps, rollout_id=torch.arange(4), batch_size=[4])
    >>> executed_steps(batch).batch_size
    torch.Size([16])
    >>> loss_module = SRPOLoss(policy, clip_epsilon=(0.2, 0.28))
    >>> optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    >>> metrics = update_policy(loss_module, optimizer, batch, mini_batch_trajectories=2)
    >>> metrics["optimizer_steps"], metrics["samples"]
    (2, 16)
    >>> recompute_log_probs(loss_module, batch, stale=torch.tensor([True, False, False, True]))  # carried groups
    8
    >>> fresh = loss_module(executed_steps(batch[torch.tensor([0, 3])]))  # their stored log-probs are the policy's
    >>> round(float(fresh["ratio_mean"]), 4)
    1.0
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from tensordict import TensorDict, TensorDictBase
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

from srpo_rl.distributed import reduce_scalar

if TYPE_CHECKING:
    from srpo_rl.objectives import SRPOLoss

__all__ = ["executed_steps", "recompute_log_probs", "update_policy"]


def executed_steps(batch: TensorDictBase) -> TensorDictBase:
    """Flattens a trajectory batch ``[N]`` into its executed decision steps ``[M]`` with their rollout ids.

    Reads ``("steps", "mask")`` and copies ``rollout_id`` to every step (the loss aggregates per trajectory).
    """
    steps = batch.get("steps")
    ids = batch.get("rollout_id").unsqueeze(-1).expand(steps.batch_size)
    steps = steps.clone(False)
    steps.set("rollout_id", ids)
    return steps[steps.get("mask")]


def update_policy(
    loss_module: SRPOLoss,
    optimizer: torch.optim.Optimizer,
    batch: TensorDictBase,
    *,
    mini_batch_trajectories: int,
    micro_batch_trajectories: int = 1,
    traj_mini_batch_size: int = 16,
    ppo_epochs: int = 1,
    grad_clip: float | None = 1.0,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    progress: bool | str = False,
) -> dict[str, float]:
    """Runs ``ppo_epochs`` passes over this rank's trajectories and returns averaged diagnostics.

    ``batch`` must carry the group advantages (``("steps", "advantage")`` and ``("steps", "token_mask")``).
    ``mini_batch_trajectories`` trajectories make one optimizer step; each forward/backward takes
    ``micro_batch_trajectories * traj_mini_batch_size`` of their executed decision steps (or all of them, if
    fewer), packed across trajectory ends, the last slice filled up with masked-out steps (the module docstring
    says why the gradient is the same).

    Keyword Args:
        mini_batch_trajectories: trajectories per optimizer step (``ppo_mini_batch_size x n`` / ranks).
        micro_batch_trajectories, traj_mini_batch_size: a forward/backward takes their product of decision steps.
        ppo_epochs: passes over the batch.
        grad_clip: the gradients' total norm is clipped to it; ``None`` or 0 only measures the norm. A step whose
            norm is not finite is skipped (no optimizer step), and counted.
        shuffle: visit the trajectories in a random order each epoch (else in batch order).
        generator: the shuffle's random stream (pass one per rank for reproducible runs).
        device: where the loss runs (the slices move there); ``None`` leaves them where they are.
        progress: ``True`` or the bar's label shows a bar of the decision steps: its rate is the update's samples/s.

    Returns:
        The mean over optimizer steps of every scalar the loss reports, plus ``grad_norm``,
        ``skipped_nonfinite_grad`` (the fraction of steps skipped for a non-finite norm), ``optimizer_steps`` and
        ``samples`` (the decision steps trained on, over every epoch).
    """
    if mini_batch_trajectories < 1 or micro_batch_trajectories < 1 or traj_mini_batch_size < 1:
        raise ValueError(
            "mini_batch_trajectories, micro_batch_trajectories and traj_mini_batch_size must be >= 1, got "
            f"{mini_batch_trajectories}, {micro_batch_trajectories}, {traj_mini_batch_size}"
        )
    if ppo_epochs < 1:
        raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
    if grad_clip is not None and grad_clip < 0:  # clip_grad_norm_ would scale the gradients by a negative factor
        raise ValueError(f"grad_clip must be > 0 (or None / 0: measure the norm only), got {grad_clip}")
    params = [p for p in loss_module.parameters() if p.requires_grad]
    sums: dict[str, float | torch.Tensor] = defaultdict(float)
    steps_done = samples = 0
    num_trajectories = batch.batch_size[0]
    bar = tqdm(total=ppo_epochs * int(batch.get(("steps", "mask")).sum()), unit="sample", leave=False,
               desc=progress if isinstance(progress, str) else "update", disable=not progress)
    for _ in range(ppo_epochs):
        order = torch.randperm(num_trajectories, generator=generator) if shuffle else torch.arange(num_trajectories)
        for start in range(0, num_trajectories, mini_batch_trajectories):
            mini = executed_steps(batch[order[start : start + mini_batch_trajectories]])
            mini = loss_module.add_token_weights(mini)
            optimizer.zero_grad(set_to_none=True)
            pieces, rows = _slices(mini, micro_batch_trajectories * traj_mini_batch_size, loss_module.tensor_keys)
            # FSDP: a rank with fewer slices repeats its last one without tokens (every forward is a collective)
            extra = int(reduce_scalar(len(pieces), "max")) - len(pieces)
            pieces += [_without_tokens(pieces[-1], loss_module.tensor_keys)] * extra
            rows += [0] * extra
            for i, (piece, real_rows) in enumerate(zip(pieces, rows)):
                _sync_gradients(loss_module, last=i == len(pieces) - 1)
                out = loss_module(_to_device(piece, device))
                loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                loss.backward()
                if real_rows:
                    _accumulate(sums, out, weight=real_rows / mini.batch_size[0])
                    samples += real_rows
                    bar.update(real_rows)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if math.isfinite(norm):
                optimizer.step()
            sums["grad_norm"] += norm
            sums["skipped_nonfinite_grad"] += float(not math.isfinite(norm))
            steps_done += 1
    bar.close()
    metrics = {k: float(v) / max(steps_done, 1) for k, v in sums.items()}  # the diagnostics' one read-back
    metrics["optimizer_steps"] = steps_done
    metrics["samples"] = samples
    return metrics


@torch.no_grad()
def recompute_log_probs(
    loss_module: SRPOLoss,
    batch: TensorDictBase,
    stale: torch.Tensor,
    *,
    slice_steps: int = 16,
    device: torch.device | None = None,
) -> int:
    """Replaces the stored log-probs of the trajectories ``stale`` marks with the current policy's, in place.

    A group the sampler carries into a later step was sampled before that step's optimizer updates: its
    stored log-probs belong to an older policy, so its ratios would start away from 1 and the clip would
    act on the wrong interval. The reference recomputes every trajectory's log-probs before the update;
    fresh ones equal what the rollout stored, so only ``stale`` (bool ``[N]``) ones are recomputed here, in
    forwards of ``slice_steps`` executed decision steps (the last one filled up, so every forward has one
    shape). With FSDP every rank runs as many forwards as the rank with the most. Returns the number of
    decision steps recomputed on this rank.
    """
    keys = loss_module.tensor_keys
    stale = stale.reshape(-1).bool().cpu()
    stored = batch.get(("steps", keys.sample_log_prob))
    flat = executed_steps(batch[stale])
    count = flat.batch_size[0]
    source = flat if count else executed_steps(batch[:1])  # what a rank with nothing to do runs
    width = max(1, min(slice_steps, source.batch_size[0]))
    starts = range(0, count, width)
    fresh = []
    for i in range(int(reduce_scalar(len(starts), "max"))):
        start = starts[i] if i < len(starts) else 0
        rows = torch.arange(start, start + width) % source.batch_size[0]
        log_prob = loss_module.log_prob(_to_device(source[rows], device))
        if i < len(starts):
            fresh.append(log_prob[: min(width, count - start)].to(stored))
    if fresh:
        where = batch.get(("steps", "mask")).bool() & stale.unsqueeze(-1).to(stored.device)
        stored[where] = torch.cat(fresh)
        batch.set(("steps", keys.sample_log_prob), stored)
    return count


def _to_device(piece: TensorDictBase, device: torch.device | str | None) -> TensorDictBase:
    if device is None:
        return piece
    if torch.device(device).type != "cuda" or piece.device != torch.device("cpu"):
        return piece.to(device)
    # from pinned memory the copy queues behind the GPU's work; from pageable memory it waits for that work to end
    # (pin_memory on this thread: its default spawns a thread pool)
    return piece.pin_memory(num_threads=0).to(device, non_blocking=True)


def _slices(mini: TensorDictBase, size: int, keys) -> tuple[list[TensorDictBase], list[int]]:
    """Cuts ``mini`` into slices of ``min(size, len(mini))`` steps and says how many steps of each are real.

    The last slice is filled up with steps whose tokens are masked out: they add nothing to the loss, its
    gradient or the diagnostics, and every forward/backward keeps one shape. A short last slice is a new shape
    for the compiled blocks: on an H100 the one-step tail of a 12 481-step update took 30 s, a full 16-step slice
    0.45 s. The filler costs at most one slice's compute.
    """
    steps = mini.batch_size[0]
    width = min(size, steps)
    pieces = [mini[start : start + width] for start in range(0, steps, width)]
    rows = [piece.batch_size[0] for piece in pieces]
    if rows[-1] < width:
        filler = _without_tokens(mini[torch.arange(width - rows[-1]) % steps], keys)
        pieces[-1] = torch.cat([pieces[-1], filler])
    return pieces, rows


def _without_tokens(piece: TensorDictBase, keys) -> TensorDictBase:
    """A copy of ``piece`` whose tokens are all masked out (zero loss, zero gradient, no diagnostics)."""
    empty = piece.clone()
    empty.set(keys.token_mask, torch.zeros_like(empty.get(keys.token_mask)))
    empty.set(keys.token_weight, torch.zeros_like(empty.get(keys.token_weight)))
    return empty


def _sync_gradients(loss_module: torch.nn.Module, last: bool) -> None:
    """FSDP2: reduce-scatter gradients only after the last backward of a mini-batch."""
    for module in loss_module.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(last)


def _accumulate(sums: dict, out: TensorDict, weight: float) -> None:
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            # Losses are already weighted for the whole mini-batch: they add up; diagnostics are averaged.
            # The sums stay on the device: reading each slice's values back would make the host wait for its
            # backward before it launches the next slice's forward, and leave the GPU idle in between.
            sums[key] = sums[key] + value.detach().reshape(()).double() * (1.0 if key.startswith("loss_") else weight)
