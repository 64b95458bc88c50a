"""SRPO against GRPO on gymnasium's MuJoCo Reacher, on a CPU in minutes: the learning proof of the pipeline.

    python examples/srpo_reacher.py                                   # 3 seeds x {SRPO, GRPO}, writes docs/
    python examples/srpo_reacher.py seeds=[0] rewards=[srpo] iterations=10 output_dir=outputs/reacher

A small token-action policy (:class:`~srpo_rl.token_policy.StateTokenPolicy`, 8 x 2 action tokens in 256
bins per decision) is behaviour-cloned briefly from a scripted expert, so that it starts with some held-out
success, then fine-tuned by the LIBERO recipe's loop, part for part: prompts (init states) -> n rollouts
each on the env slots (:func:`~srpo_rl.rollout.collect_rollouts`, sampling at a temperature) -> accuracy
filter and refill (:class:`~srpo_rl.objectives.EmbodiedSampler`) -> SRPO progress reward on a frozen
V-JEPA 2 (tiny, fixed random weights) or the binary success reward (plain GRPO) -> group advantages ->
:class:`~srpo_rl.objectives.SRPOLoss` through :func:`~srpo_rl.trainer.update_policy`. Every
``eval_every`` iterations the greedy policy is evaluated on init states never used for training.
The script runs both rewards over the seeds and writes the learning curves (PNG) and a results table.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless MuJoCo rendering

import copy
import functools
import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import srpo_rl.rollout as rollout_module
from srpo_rl.envs.gym_slots import GymSlotEnv
from srpo_rl.evaluation import evaluate
from srpo_rl.examples.reacher_policy import (
    INSTRUCTION,
    SUCCESS_DISTANCE,
    behaviour_cloning,
    expert_demonstrations,
    make_reacher_env,
    reacher_success,
)
from srpo_rl.manifest import PromptStream
from srpo_rl.models.vjepa2 import VideoEmbedder, load_vjepa2, write_tiny_vjepa2_checkpoint
from srpo_rl.objectives import EmbodiedSampler, GroupAdvantage, SRPOLoss
from srpo_rl.rewards import SRPOProgressReward
from srpo_rl.rollout import collect_rollouts, group_requests
from srpo_rl.token_policy import POLICY_STATE_KEY, StateTokenPolicy
from srpo_rl.trainer import update_policy

REWARDS = ("srpo", "binary")
LABELS = {"srpo": "SRPO (progress reward)", "binary": "GRPO (binary reward)"}
# Held-out init states: ids far from the training ids 0..train_init_states-1.
EVAL_OFFSET = 1_000_000

# collect_rollouts keeps OpenVLA-OFT's stored inputs (policy_image, prompt_ids, prompt_mask) in its step
# records; this policy's stored input, which the loss reads back, is "policy_state".
if POLICY_STATE_KEY not in rollout_module.POLICY_KEYS:
    rollout_module.POLICY_KEYS = (*rollout_module.POLICY_KEYS, POLICY_STATE_KEY)


@dataclass
class ReacherConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rewards: list[str] = field(default_factory=lambda: ["srpo", "binary"])
    output_dir: str = "docs"
    threads: int = 1
    # env: Reacher-v5, success = fingertip within SUCCESS_DISTANCE of the target
    num_envs: int = 16
    success_distance: float = SUCCESS_DISTANCE
    max_steps: int = 48
    chunk_len: int = 8
    frame_stride: int = 4
    image_size: int = 64
    train_init_states: int = 512
    eval_init_states: int = 100
    # behaviour cloning: brief, so that the policy starts between 10 % and 50 % held-out success
    demos: int = 50
    bc_steps: int = 800
    bc_lr: float = 1e-3
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    # SRPO / GRPO
    iterations: int = 30
    eval_every: int = 5
    temperature: float = 1.0
    n: int = 8
    train_batch_size: int = 8
    ppo_mini_batch_size: int = 4
    ppo_epochs: int = 1
    max_rollout_rounds: int = 4
    lr: float = 3e-4
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    reward_coef: float = 5.0
    vjepa_img_size: int = 48
    vjepa_num_frames: int = 16
    vjepa_seed: int = 0


ConfigStore.instance().store(name="srpo_reacher", node=ReacherConfig)


def make_env(cfg: ReacherConfig) -> GymSlotEnv:
    return GymSlotEnv(
        lambda task_id: make_reacher_env(task_id, cfg.image_size), cfg.num_envs,
        success_fn=functools.partial(reacher_success, distance=cfg.success_distance),
        instructions=INSTRUCTION, max_steps=cfg.max_steps, chunk_len=cfg.chunk_len, frame_stride=cfg.frame_stride,
    )


def pretrain(cfg: ReacherConfig, seed: int, env: GymSlotEnv) -> StateTokenPolicy:
    """The SFT stage: behaviour cloning on expert chunks from the first ``demos`` training init states."""
    torch.manual_seed(seed)
    policy = StateTokenPolicy(env.state_dim, env.action_dim, cfg.chunk_len, hidden_sizes=cfg.hidden_sizes,
                              temperature=cfg.temperature)
    states, chunks = expert_demonstrations(range(cfg.demos), seed=0, max_steps=cfg.max_steps, chunk_len=cfg.chunk_len)
    behaviour_cloning(policy, states, chunks, steps=cfg.bc_steps, lr=cfg.bc_lr,
                      generator=torch.Generator().manual_seed(seed))
    return policy


def make_reward(cfg: ReacherConfig, reward: str, vjepa_path: Path) -> SRPOProgressReward:
    if reward == "binary":
        return SRPOProgressReward(binary=True, reward_coef=cfg.reward_coef)
    encoder = load_vjepa2(vjepa_path, img_size=cfg.vjepa_img_size, num_frames=cfg.vjepa_num_frames)
    embedder = VideoEmbedder(encoder, img_size=cfg.vjepa_img_size, num_frames=cfg.vjepa_num_frames,
                             enable_fp16=False, device="cpu")
    return SRPOProgressReward(embedder, reward_coef=cfg.reward_coef)


def held_out_success(cfg: ReacherConfig, env: GymSlotEnv, policy: StateTokenPolicy) -> float:
    rows = [{"suite": "reacher", "task_id": 0, "trial_id": EVAL_OFFSET + i, "task_name": INSTRUCTION}
            for i in range(cfg.eval_init_states)]
    return evaluate(env, policy, rows, progress=False).metrics()["val/success_rate"]


def train(cfg: ReacherConfig, seed: int, reward: str, policy: StateTokenPolicy, env: GymSlotEnv,
          vjepa_path: Path) -> dict:
    """Fine-tunes ``policy`` in place with the SRPO loop; returns the held-out learning curve and counters."""
    if reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
    torch.manual_seed(seed)
    # Reward, advantage, sampling filters, loss and optimizer, as in the LIBERO recipe
    reward_module = make_reward(cfg, reward, vjepa_path)
    advantage_module = GroupAdvantage(chunk_len=cfg.chunk_len, action_dim=env.action_dim)
    sampler = EmbodiedSampler(cfg.train_batch_size, accuracy_lower_bound=0.1, accuracy_upper_bound=0.9,
                              max_rounds=cfg.max_rollout_rounds)
    loss_module = SRPOLoss(policy, clip_epsilon=(cfg.clip_ratio_low, cfg.clip_ratio_high))
    optimizer = torch.optim.AdamW(policy.net.parameters(), lr=cfg.lr, weight_decay=0.0)
    prompts = PromptStream([{"task_id": 0, "trial_id": i} for i in range(cfg.train_init_states)], seed=seed)
    generator = torch.Generator().manual_seed(seed)

    curve = {"iteration": [0], "trajectories": [0], "success": [held_out_success(cfg, env, policy)]}
    print(f"[{reward} seed {seed}] iteration 0: held-out success {curve['success'][0]:.2f}", flush=True)
    trajectories, next_group, skipped, start = 0, 0, 0, time.perf_counter()
    for iteration in range(1, cfg.iterations + 1):
        # Rollouts until train_batch_size groups pass the accuracy filter (refill; surplus carried over)
        round_success = []
        for _ in range(cfg.max_rollout_rounds):
            rows = prompts.next(max(sampler.groups_to_request(), 1))
            requests = group_requests([(r["task_id"], r["trial_id"]) for r in rows], cfg.n, first_group_id=next_group)
            next_group += len(rows)
            batch, _ = collect_rollouts(env, policy, requests)
            trajectories += batch.batch_size[0]
            round_success.append(batch["success"])
            sampler.add(batch)
            if sampler.ready:
                break
        if not sampler.ready:
            skipped += 1
            continue
        # Progress (or binary) reward on the kept groups, GRPO advantages, clipped token loss
        batch = sampler.pop()
        # the env reports chunk_steps per slot as [N, 1], so the step records hold [N, T, 1]; the advantage
        # reads the trajectory layout's [N, T]
        batch.set(("steps", "next", "chunk_steps"), batch.get(("steps", "next", "chunk_steps")).reshape(batch["steps"].shape))
        batch = advantage_module(reward_module(batch))
        policy.train()
        losses = update_policy(loss_module, optimizer, batch, mini_batch_trajectories=cfg.ppo_mini_batch_size * cfg.n,
                      micro_batch_trajectories=cfg.ppo_mini_batch_size * cfg.n, traj_mini_batch_size=4096,
                      ppo_epochs=cfg.ppo_epochs, generator=generator)
        policy.eval()
        rollout_success = float(torch.cat(round_success).float().mean())
        print(f"[{reward} seed {seed}] iteration {iteration}: rollout success {rollout_success:.2f}, "
              f"reward {batch['reward'].mean():.2f}, approx_kl {losses['approx_kl']:.4f}, "
              f"clip {losses['clip_fraction']:.3f}", flush=True)
        if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
            curve["iteration"].append(iteration)
            curve["trajectories"].append(trajectories)
            curve["success"].append(held_out_success(cfg, env, policy))
            print(f"[{reward} seed {seed}] iteration {iteration}: held-out success {curve['success'][-1]:.2f} "
                  f"({trajectories} training rollouts, {time.perf_counter() - start:.0f} s)", flush=True)
    return {"reward": reward, "seed": seed, "curve": curve, "skipped_iterations": skipped,
            "gain": curve["success"][-1] - curve["success"][0], "train_time_s": time.perf_counter() - start}


def write_results(cfg: ReacherConfig, results: list[dict], out_dir: Path, command: str) -> None:
    """Learning curves (mean and min-max band over seeds) as a PNG, a markdown table and the raw JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "learning_results.json").write_text(json.dumps(results, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = [
        f"Held-out greedy success on Reacher-v5 (fingertip within {SUCCESS_DISTANCE * 100:.0f} cm of the target, "
        f"{cfg.max_steps} steps), {cfg.eval_init_states} init states never used for training; "
        f"seeds {list(cfg.seeds)}; mean ± std over seeds (min-max in brackets).",
        "",
        "| method | start (BC) | end | gain (pp) | per-seed gain (pp) |",
        "|---|---|---|---|---|",
    ]
    for reward in cfg.rewards:
        runs = [r for r in results if r["reward"] == reward]
        if not runs:
            continue
        x = runs[0]["curve"]["iteration"]
        y = np.array([r["curve"]["success"] for r in runs]) * 100
        ax.plot(x, y.mean(0), marker="o", label=LABELS[reward])
        ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
        start, end, gain = y[:, 0], y[:, -1], y[:, -1] - y[:, 0]
        lines.append(
            f"| {LABELS[reward]} | {start.mean():.1f} ± {start.std():.1f} | {end.mean():.1f} ± {end.std():.1f} "
            f"[{end.min():.0f}, {end.max():.0f}] | {gain.mean():+.1f} ± {gain.std():.1f} | "
            f"{', '.join(f'{g:+.0f}' for g in gain)} |"
        )
    ax.set_xlabel("RL iteration (8 groups x 8 rollouts kept per update)")
    ax.set_ylabel("held-out success (%)")
    ax.set_title("Reacher-v5: SRPO vs GRPO after brief behaviour cloning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curves.png", dpi=120)
    plt.close(fig)
    lines += ["", f"Command: `{command}`"]
    (out_dir / "learning_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


@hydra.main(config_path=None, config_name="srpo_reacher", version_base=None)
def main(cfg: ReacherConfig) -> None:
    unknown = [r for r in cfg.rewards if r not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; choose from {', '.join(REWARDS)}")
    torch.set_num_threads(cfg.threads)
    warnings.filterwarnings("ignore", message="A partial `'_reset'` key")  # the rollout's per-slot resets
    out_dir = Path(hydra.utils.to_absolute_path(cfg.output_dir))
    env = make_env(cfg)
    vjepa_path = Path(tempfile.mkdtemp()) / "tiny_vjepa2.pt"
    write_tiny_vjepa2_checkpoint(vjepa_path, seed=cfg.vjepa_seed, img_size=cfg.vjepa_img_size,
                                 num_frames=cfg.vjepa_num_frames)
    results = []
    for seed in cfg.seeds:
        # One behaviour-cloned policy per seed; every reward fine-tunes its own copy of it
        sft = pretrain(cfg, seed, env)
        for reward in cfg.rewards:
            results.append(train(cfg, seed, reward, copy.deepcopy(sft), env, vjepa_path))
    env.close()
    write_results(cfg, results, out_dir, "python examples/srpo_reacher.py " + " ".join(
        hydra.core.hydra_config.HydraConfig.get().overrides.task))
    print(OmegaConf.to_yaml(cfg), flush=True)


if __name__ == "__main__":
    main()
