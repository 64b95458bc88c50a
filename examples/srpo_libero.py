"""SRPO (Self-Referential Policy Optimization) of OpenVLA-OFT on LIBERO.

    python examples/srpo_libero.py env=libero_long model.path=<sft checkpoint> model.vjepa_path=<vitg-384.pt>
    torchrun --nproc_per_node=8 examples/srpo_libero.py env=libero_long ...    # one process per GPU, FSDP2
    python examples/srpo_libero.py --config-name tiny                          # tiny random model, CPU
    python examples/srpo_libero.py mode=eval model.path=<checkpoint>           # greedy evaluation only

One iteration: prompts (task x init state) from the manifest -> n rollouts each on the env slots ->
accuracy / truncation filter and refill to train_batch_size groups -> V-JEPA 2 progress reward ->
GRPO advantages -> clipped token loss over mini-batches -> the rollout policy acts with the new weights.
Installed as the ``srpo-libero`` console script.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import closing, ExitStack
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torchrl.envs.utils import ExplorationType
from tqdm.auto import tqdm

from srpo_rl.checkpoint import CheckpointManager
from srpo_rl.distributed import DistInfo, close_distributed, gathered, init_distributed, reduce_scalar
from srpo_rl.evaluation import evaluate
from srpo_rl.examples.utils_srpo import (
    batch_metrics,
    check_config,
    checkpoint_run_config,
    config_errors_reported,
    log_evaluation,
    make_advantage,
    make_background_embedder,
    make_env,
    make_eval_rows,
    make_logger,
    make_loss,
    make_manifests,
    make_optimizer,
    make_policy,
    make_reward,
    make_sampler,
    memory_metrics,
    rollout_metrics,
    siirl_overrides,
    update_metrics,
)
from srpo_rl.lora import merged_adapters
from srpo_rl.manifest import PromptStream
from srpo_rl.rollout import collect_rollouts, group_requests
from srpo_rl.trainer import recompute_log_probs, update_policy


# The folder beside this file, as a path: as the console script (the package installed as a wheel or editable)
# Hydra would look for a ``srpo_rl.examples.config`` module, which an editable install does not map.
CONFIG_DIR = str(Path(__file__).resolve().parent / "config")


def run_eval(cfg: DictConfig, info: DistInfo, resources: ExitStack) -> None:
    """Greedy rollouts of ``model.path`` on ``eval.task_ids`` x ``eval.num_trials_per_task`` of the env's suite."""
    rows = make_eval_rows(cfg)
    policy = make_policy(cfg, info)
    env = resources.enter_context(closing(make_env(cfg)))
    logger = resources.enter_context(closing(make_logger(cfg)))
    with merged_adapters(policy.model):
        result = evaluate(env, policy, rows, rank=info.rank, world_size=info.world_size,
                          num_videos=cfg.eval.num_videos, device=info.device)
    log_evaluation(logger, result, step=0, out_dir=cfg.output_dir, prefix="eval")


def main() -> None:
    """The ``srpo-libero`` entry point: training (``mode=train``) or greedy evaluation (``mode=eval``); siiRL's
    option names are read as ours (``siirl_overrides``), so a siiRL SRPO command line runs as it is."""
    with config_errors_reported():
        sys.argv[1:] = siirl_overrides(sys.argv[1:])
    hydra_main()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    """Hydra's entry: the composed config checked, then :func:`run` on this process."""
    # Config errors fail here, before any work
    with config_errors_reported():
        check_config(cfg)
    info = init_distributed(cfg.device)
    run(cfg, info)
    close_distributed()  # after run's models are released


def run(cfg: DictConfig, info: DistInfo) -> None:
    """The recipe (``mode=train``) or the evaluation (``mode=eval``) on this process (one rank of the job)."""
    for seed in (torch.manual_seed, random.seed, np.random.seed):  # checkpoints keep and restore all three
        seed(cfg.seed + info.rank)
    # on any exit, an error included: the logger flushed, the embedder's thread and the env workers stopped
    with ExitStack() as resources:
        (run_eval if cfg.mode == "eval" else run_train)(cfg, info, resources)


def run_train(cfg: DictConfig, info: DistInfo, resources: ExitStack) -> None:
    """SRPO training: rollouts, reward, update, validation and checkpoints, resumed from the latest checkpoint."""
    # Task manifests (generated on first use) and models
    train_rows, val_rows = make_manifests(cfg, info)
    policy = make_policy(cfg, info)
    env = resources.enter_context(closing(make_env(cfg)))

    # Reward, advantage, sampling filters, loss and optimizer
    reward_module = make_reward(cfg, info)
    advantage_module = make_advantage(cfg)
    sampler = make_sampler(cfg, info)
    background = make_background_embedder(cfg, reward_module, sampler, info)  # None: V-JEPA after the rollout
    if background is not None:
        resources.callback(background.close)
    loss_module = make_loss(cfg, policy)
    optimizer = make_optimizer(cfg, policy)

    # Checkpoints, resume, logger (a resumed run goes on logging into its wandb run)
    checkpoints = CheckpointManager(cfg.trainer.default_local_dir, keep=cfg.trainer.max_ckpt_keep or None,  # 0: all
                                    run_config=checkpoint_run_config(cfg))
    prompts = PromptStream(train_rows, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + info.rank)  # the update's shuffling
    step, next_group = 0, 0
    state = None
    if cfg.trainer.resume_mode == "auto":
        state = checkpoints.load_latest(model=policy.model, optimizer=optimizer)
        if state is None and info.is_main:  # a mistyped folder would otherwise start afresh unnoticed
            print(f"no complete checkpoint in {checkpoints.root}: starting at step 0", flush=True)
    elif cfg.trainer.resume_mode == "resume_path":
        state = checkpoints.load(cfg.trainer.resume_from_path, model=policy.model, optimizer=optimizer)
    if state is not None:
        step, next_group = state["step"], state["next_group"]
        prompts.load_state_dict(state["prompts"])
        sampler.load_state_dict(state["sampler"])
        if "generator" in state:
            generator.set_state(state["generator"])
        for group in optimizer.param_groups:  # the settings of this run, not the checkpoint's
            group.update(lr=cfg.actor.lr, weight_decay=cfg.actor.weight_decay)
        print(f"resumed from {state['checkpoint_path']} at step {step}", flush=True)
    logger = resources.enter_context(closing(make_logger(cfg, wandb_run_id=state and state.get("wandb_run_id"),
                                                         resume_step=state and step + 1)))
    steps_per_epoch = len(train_rows) // cfg.data.train_batch_size
    total_steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * max(1, steps_per_epoch)
    mini_batch_trajectories = cfg.actor.ppo_mini_batch_size * cfg.rollout.n // info.world_size
    exploration = ExplorationType.RANDOM if cfg.rollout.do_sample else ExplorationType.DETERMINISTIC

    if cfg.trainer.val_before_train and step == 0:
        with merged_adapters(policy.model):
            result = evaluate(env, policy, val_rows, rank=info.rank, world_size=info.world_size,
                              num_videos=cfg.trainer.num_val_videos, device=info.device)
        log_evaluation(logger, result, step=0, out_dir=cfg.output_dir)

    bar = resources.enter_context(tqdm(total=total_steps, initial=step, desc="srpo", disable=not info.is_main))
    while step < total_steps:
        step += 1

        # Rollouts until train_batch_size groups pass the filters (refill; surplus carried over): none while the groups
        # carried from earlier rounds fill the batch on every rank (every rank trains, or none does)
        t0 = time.perf_counter()
        collected, rounds = [], 0
        while rounds < cfg.algorithm.embodied_sampling.max_rollout_rounds and not reduce_scalar(sampler.ready, "min"):
            rounds += 1
            count = int(reduce_scalar(max(sampler.groups_to_request(), 1), "max"))  # same prompts on every rank
            rows = prompts.next(count * info.world_size)[info.rank :: info.world_size]
            requests = group_requests([(r["task_id"], r["trial_id"]) for r in rows], cfg.rollout.n,
                                      first_group_id=next_group * info.world_size + info.rank,
                                      group_id_stride=info.world_size)
            next_group += len(rows)
            if sampler.ready:  # full already (its surplus would pile up, round after round, while another rank fills):
                with gathered(policy.model):  # it joins only the collectives of the others' rollout
                    pass
                continue
            with merged_adapters(policy.model):  # LoRA: the rollout runs the plain model on the merged weights
                trajectories, stats = collect_rollouts(env, policy, requests, exploration_type=exploration,
                                                       overlap=cfg.rollout.overlap, on_finished=background,
                                                       progress=info.is_main and "rollout")
            if background is not None:  # waits only for the last embeddings (NaN: a group the sampler drops)
                trajectories.set("video_embedding", background.pop(trajectories["rollout_id"]))
            trajectories.set("policy_version", torch.full(trajectories.batch_size, step))  # the step sampled at
            sampler.add(trajectories)  # copies the groups it keeps
            # the metrics need no steps: a round's policy images (4.6 GiB at the recipe's batch) go once it is taken in
            collected.append((trajectories.exclude("steps"), stats))
            del trajectories
        batch = sampler.pop() if reduce_scalar(sampler.ready, "min") else None
        # each phase's figures are logged as it ends: a long update that fails still leaves them
        logger.log({**rollout_metrics(collected, sampler, rounds), "time/rollout": time.perf_counter() - t0}, step)
        if batch is None:
            print(f"step {step}: no batch of {cfg.data.train_batch_size} groups passed the filters after {rounds} "
                  "rollout rounds; skipping the update (raise max_rollout_rounds or check the policy)", flush=True)
            logger.log({"train/skipped": 1.0}, step)
        else:
            # SRPO progress reward on the kept groups, then GRPO advantages
            t0 = time.perf_counter()
            batch = advantage_module(reward_module(batch))
            metrics = batch_metrics(batch)  # over every rank's batch
            logger.log({**metrics, "time/reward_and_advantage": time.perf_counter() - t0}, step)
            if info.is_main and metrics["train/advantage_abs_mean"] == 0:
                print(f"step {step}: every advantage is 0 (no group mixes outcomes): this update has zero gradient",
                      flush=True)

            # Policy update: groups carried from an earlier step first get the current policy's log-probs
            # (their stored ones are an older policy's; after a skipped step the same, recomputed needlessly),
            # then epochs x mini-batches, exact accumulation over micro-batches
            t0 = time.perf_counter()
            policy.train()
            slice_steps = cfg.actor.ppo_micro_batch_size * cfg.actor.traj_mini_batch_size  # the update's shape
            recomputed = recompute_log_probs(loss_module, batch, batch["policy_version"] < step,
                                             slice_steps=slice_steps, device=info.device)
            losses = update_policy(
                loss_module, optimizer, batch,
                mini_batch_trajectories=mini_batch_trajectories,
                micro_batch_trajectories=cfg.actor.ppo_micro_batch_size,
                traj_mini_batch_size=cfg.actor.traj_mini_batch_size,
                ppo_epochs=cfg.actor.ppo_epochs, grad_clip=cfg.actor.grad_clip, shuffle=cfg.actor.shuffle,
                generator=generator, device=info.device, progress=info.is_main and "update",
            )
            policy.eval()
            logger.log({**update_metrics(losses, recomputed), "train/lr": optimizer.param_groups[0]["lr"],
                        "time/update": time.perf_counter() - t0, **memory_metrics(info.device)}, step)

        # Validation and checkpoints
        if cfg.trainer.test_freq > 0 and (step % cfg.trainer.test_freq == 0 or step == total_steps):  # as siiRL
            t0 = time.perf_counter()
            with merged_adapters(policy.model):
                result = evaluate(env, policy, val_rows, rank=info.rank, world_size=info.world_size,
                                  num_videos=cfg.trainer.num_val_videos, device=info.device)
            log_evaluation(logger, result, step=step, out_dir=cfg.output_dir)
            logger.log({"time/validation": time.perf_counter() - t0}, step)
        if cfg.trainer.save_freq > 0 and (step % cfg.trainer.save_freq == 0 or step == total_steps):
            t0 = time.perf_counter()
            path = checkpoints.save(step, model=policy.model, optimizer=optimizer, trainer_state={
                "step": step, "next_group": next_group, "prompts": prompts.state_dict(), "sampler": sampler.state_dict(),
                "generator": generator.get_state(), "wandb_run_id": logger.wandb_run_id,
            }, extra=lambda folder: policy.save_pretrained(folder / "huggingface"))  # the published format
            logger.log({"time/checkpoint": time.perf_counter() - t0}, step)
            if info.is_main:
                print(f"saved checkpoint {path}", flush=True)
        bar.update(1)

    bar.close()
    if info.is_main:
        print(f"done: {step} steps; logs in {cfg.output_dir}, checkpoints in {cfg.trainer.default_local_dir}")


if __name__ == "__main__":
    main()
