"""The recipe's builders and config helpers (examples/utils_srpo.py): check_config names every bad value (and
ConfigError a missing model path) before any work, siiRL's option names map onto ours (siirl_overrides), the
builders carry every value of the config, the evaluation rows, the host memory reserve, and the rollout and batch
metrics the recipe logs."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from srpo_rl.distributed import init_distributed
from srpo_rl.examples.utils_srpo import ConfigError, check_config, host_reserve_bytes, make_eval_rows

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "examples" / "config"


def _compose(overrides, name="config"):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides)


VALID_7B = ["model.path=.", "model.vjepa_path=."]


# siiRL's embodied SRPO command line, every option of it, with values away from our defaults where it has a knob
SIIRL_COMMAND_LINE = """
data.train_files=/d/train.parquet data.val_files=/d/val.parquet data.train_batch_size=32 data.val_batch_size=100
data.max_prompt_length=128 data.max_response_length=128 algorithm.workflow_type=embodied algorithm.adv_estimator=grpo
algorithm.gamma=0.99 algorithm.lam=0.95 algorithm.norm_adv_by_std_in_grpo=False
algorithm.embodied_sampling.filter_accuracy=False algorithm.embodied_sampling.accuracy_lower_bound=0.2
algorithm.embodied_sampling.accuracy_upper_bound=0.8 algorithm.embodied_sampling.filter_truncated=True
algorithm.embodied_sampling.oversample_factor=2 actor_rollout_ref.model.path=/m/sft
actor_rollout_ref.model.enable_gradient_checkpointing=False actor_rollout_ref.actor.optim.lr=1e-5
actor_rollout_ref.actor.optim.weight_decay=0.01 actor_rollout_ref.actor.ppo_mini_batch_size=8
actor_rollout_ref.actor.ppo_epochs=2 actor_rollout_ref.actor.grad_clip=0.5 actor_rollout_ref.actor.clip_ratio_high=0.3
actor_rollout_ref.actor.clip_ratio_low=0.1 actor_rollout_ref.actor.entropy_coeff=0.001 actor_rollout_ref.actor.shuffle=False
actor_rollout_ref.actor.fsdp_config.param_offload=True actor_rollout_ref.actor.fsdp_config.grad_offload=True
actor_rollout_ref.actor.fsdp_config.optimizer_offload=True actor_rollout_ref.rollout.name=hf
actor_rollout_ref.rollout.n=4 actor_rollout_ref.rollout.temperature=1.2 actor_rollout_ref.rollout.do_sample=False
actor_rollout_ref.rollout.response_length=512 actor_rollout_ref.embodied.embodied_type=openvla-oft
actor_rollout_ref.embodied.action_token_len=7 actor_rollout_ref.embodied.action_chunks_len=8
actor_rollout_ref.embodied.video_embedding_model_path=/m/vitg-384.pt actor_rollout_ref.embodied.embedding_img_size=256
actor_rollout_ref.embodied.embedding_enable_fp16=False actor_rollout_ref.embodied.embedding_model_offload=True
actor_rollout_ref.embodied.center_crop=False actor_rollout_ref.embodied.num_images_in_input=2
actor_rollout_ref.embodied.unnorm_key=libero_goal actor_rollout_ref.embodied.env.env_type=libero
actor_rollout_ref.embodied.env.env_name=libero_goal actor_rollout_ref.embodied.env.num_envs=8
actor_rollout_ref.embodied.env.max_steps=300 actor_rollout_ref.embodied.env.num_steps_wait=5
actor_rollout_ref.embodied.env.num_trials_per_task=20 actor_rollout_ref.embodied.env.model_family=openvla
critic.use_critic_model=False trainer.total_epochs=10 trainer.save_freq=2 trainer.test_freq=3
trainer.max_actor_ckpt_to_keep=2 trainer.logger=[console] trainer.project_name=p trainer.experiment_name=e
trainer.nnodes=1 trainer.n_gpus_per_node=1 trainer.default_local_dir=/c trainer.resume_mode=disable
trainer.val_before_train=False
""".split()


def test_a_siirl_command_line_sets_the_same_knobs_under_our_names():
    from srpo_rl.examples.utils_srpo import siirl_overrides

    ours = _compose(siirl_overrides(SIIRL_COMMAND_LINE))
    expected = {
        "data.train_batch_size": 32, "data.val_batch_size": 100, "data.max_prompt_length": 128,
        "algorithm.gamma": 0.99, "algorithm.norm_adv_by_std_in_grpo": False,
        "algorithm.embodied_sampling.filter_truncated": True, "algorithm.embodied_sampling.oversample_factor": 2,
        "model.path": "/m/sft", "model.vjepa_path": "/m/vitg-384.pt", "actor.enable_gradient_checkpointing": False,
        "actor.lr": 1e-5, "actor.weight_decay": 0.01, "actor.ppo_mini_batch_size": 8, "actor.ppo_epochs": 2,
        "actor.grad_clip": 0.5, "actor.clip_ratio_high": 0.3, "actor.clip_ratio_low": 0.1, "actor.shuffle": False,
        "actor.fsdp.param_offload": True, "actor.fsdp.grad_offload": True, "actor.fsdp.optimizer_offload": True,
        "rollout.n": 4, "rollout.temperature": 1.2, "rollout.do_sample": False, "embodied.embedding_img_size": 256,
        "embodied.embedding_enable_fp16": False, "embodied.embedding_model_offload": True,
        "embodied.center_crop": False, "embodied.num_images_in_input": 2, "embodied.unnorm_key": "libero_goal",
        "env.env_name": "libero_goal", "env.num_envs": 8, "env.max_steps": 300, "env.num_steps_wait": 5,
        "env.num_trials_per_task": 20, "trainer.total_epochs": 10, "trainer.save_freq": 2, "trainer.test_freq": 3,
        "trainer.max_ckpt_keep": 2, "trainer.logger": ["console"], "trainer.default_local_dir": "/c",
        "trainer.resume_mode": "disable", "trainer.val_before_train": False,
    }
    from omegaconf import OmegaConf

    assert {k: OmegaConf.select(ours, k) for k in expected} == expected
    assert ours.env == _compose(["env=libero_goal", "env.num_envs=8", "env.max_steps=300", "env.num_steps_wait=5",
                                 "env.num_trials_per_task=20"]).env  # the suite's group, then its options
    with pytest.raises(ValueError, match=r"siiRL's critic.use_critic_model=True has no counterpart here; accepted: "
                                         r"False, false"):
        siirl_overrides(["critic.use_critic_model=True"])
    with pytest.raises(ValueError, match="siiRL's actor_rollout_ref.rollout.name=vllm has no counterpart"):
        siirl_overrides(["actor_rollout_ref.rollout.name=vllm"])
    with pytest.raises(ValueError, match="deprecated global micro-batch; ours is per GPU"):
        siirl_overrides(["actor_rollout_ref.actor.ppo_micro_batch_size=16"])


def test_siirl_s_config_name_comment_names_and_yaml_defaults_are_read():
    from omegaconf import OmegaConf

    from srpo_rl.examples.utils_srpo import siirl_overrides

    assert siirl_overrides(["--config-name=embodied_srpo_trainer", "-cn", "embodied_srpo_trainer"]) == \
        ["--config-name=config", "-cn", "config"]
    ours = _compose(siirl_overrides([
        "actor_rollout_ref.embodied.img_size=256", "actor_rollout_ref.embodied.enable_fp16=False",
        "reward_model.reward_kwargs.reward_coef=3.0", "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.kl_loss_coef=0.001", "actor_rollout_ref.rollout.top_k=-1",
        "actor_rollout_ref.actor.optim.warmup_style=constant", "trainer.val_only=False",
    ]))
    assert (OmegaConf.select(ours, "embodied.embedding_img_size"), OmegaConf.select(ours, "embodied.embedding_enable_fp16"),
            OmegaConf.select(ours, "algorithm.reward_coef")) == (256, False, 3.0)
    with pytest.raises(ValueError, match="siiRL's actor_rollout_ref.actor.use_kl_loss=True has no counterpart"):
        siirl_overrides(["actor_rollout_ref.actor.use_kl_loss=True"])
    check_config(_compose(VALID_7B + ["trainer.logger=console", "trainer.max_ckpt_keep=null"]), world_size=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["env.env_name=libero_lng"], "env.env_name: unknown suite 'libero_lng'; choose one of"),
        (["algorithm.embodied_sampling.accuracy_lower_bound=0.95"], "accuracy_lower_bound 0.95 > accuracy_upper_bound 0.9"),
        (["algorithm.embodied_sampling.accuracy_upper_bound=1.5"], r"accuracy bounds must lie in \[0, 1\]"),
        (["data.train_batch_size=10"], "train_batch_size=10 is not a multiple of actor.ppo_mini_batch_size=4"),
        (["env.num_envs=0"], "env.num_envs must be an int >= 1, got 0"),
        (["actor.grad_clip=-1"], "actor.grad_clip must be a number > 0, got -1"),
        (["actor.ppo_epochs=0"], "actor.ppo_epochs must be an int >= 1, got 0"),
        (["actor.ppo_micro_batch_size=0"], "actor.ppo_micro_batch_size must be an int >= 1, got 0"),
        (["actor.traj_mini_batch_size=2.5"], "actor.traj_mini_batch_size must be an int >= 1, got 2.5"),
        (["data.train_batch_size=-4"], "data.train_batch_size must be an int >= 1, got -4"),
        (["algorithm.reward_coef=-5"], "algorithm.reward_coef must be a number > 0, got -5"),
        (["actor.weight_decay=-0.1"], "actor.weight_decay must be a number >= 0, got -0.1"),
        (["algorithm.embodied_sampling.filter_accuracy=maybe"],
         "algorithm.embodied_sampling.filter_accuracy must be true or false, got 'maybe'"),
        (["rollout.do_sample=1"], "rollout.do_sample must be true or false, got 1"),
        (["embodied.action_chunks_len=4"], "action_chunks_len x action_token_len = 4 x 7, but OpenVLA-OFT's LIBERO head "
         "decodes chunks of 8 actions x 7 dims"),
        (["trainer.total_training_steps=0"], "trainer.total_training_steps must be null .* or an int >= 1, got 0"),
        (["env.num_envs=1000"], "env.num_envs=1000 slots cannot all be used"),
        (["rollout.temperature=0"], "rollout.temperature must be a number > 0, got 0"),
        (["embodied.embed_during_rollout=sometimes"], "embodied.embed_during_rollout must be true or false, got 'sometimes'"),
        (["actor.fsdp.mixed_precision=int8"], "unknown actor.fsdp.mixed_precision 'int8'; choose one of bf16, fp16, fp32"),
        (["actor.fsdp.optimizer_state_dtype=fp8"], "unknown actor.fsdp.optimizer_state_dtype 'fp8'; choose one of fp32, bf16"),
        (["actor.fsdp.optimizer_state_dtype=bf16"], "optimizer_state_dtype=bf16 applies to the host optimizer only"),
        (["actor.lora_rank=-1"], "actor.lora_rank must be an int >= 0, got -1"),
        (["actor.lora_rank=32", "actor.fsdp.optimizer_offload=true"], "optimizer_offload .* does not apply"),
        (["mode=serve"], "unknown mode 'serve'; choose one of train, eval"),
        (["trainer.resume_mode=maybe"], "unknown trainer.resume_mode 'maybe'"),
        (["model.path=/nonexistent/ckpt"], r"model.path='/nonexistent/ckpt' does not exist \(expected the OpenVLA-OFT "
         r"SFT checkpoint folder \(config.json, .*`--config-name tiny` runs the recipe"),
        (["rollout.n=1"], r"rollout.n must be an int >= 2, got 1 \(GRPO compares the rollouts of a group"),
        # Hydra refuses a misspelled option but advises "+": added that way it would do nothing
        (["+trainer.save_freqq=3"], r"unknown option trainer.save_freqq \(did you mean trainer.save_freq\?\)"),
        (["+actor.lr.value=1", "+foo=2"], r"unknown options actor.lr.value \(did you mean actor.lr\?\), foo: nothing"),
        (["trainer.logger=[console,mlflow]"], "unknown trainer.logger 'mlflow'; choose from console, tensorboard, wandb"),
        (["trainer.logger=mlflow"], "unknown trainer.logger 'mlflow'; choose from"),  # one name, not a list
        (["env.num_trials_per_task=0"], "env.num_trials_per_task must be an int >= 1, got 0"),
        (["eval.num_trials_per_task=2.5"], "eval.num_trials_per_task must be an int >= 1, got 2.5"),
        (["env.env_name=libero_goal"], "env.env_name=libero_goal but embodied.unnorm_key=libero_10 .* select the "
         "suite as env=libero_goal"),
        (["trainer.max_ckpt_keep=-1"], r"trainer.max_ckpt_keep must be null or 0 \(keep every checkpoint, as siiRL\)"),
        (["trainer.resume_mode=resume_path"], "resume_mode=resume_path needs trainer.resume_from_path="),
        (["trainer.resume_mode=resume_path", "trainer.resume_from_path=/nonexistent/global_step_3"],
         "trainer.resume_from_path: no checkpoint folder /nonexistent/global_step_3"),
        (["actor.loss_agg_mode=mean"], "unknown actor.loss_agg_mode 'mean'; choose one of seq-mean-token-mean, token-mean"),
        (["algorithm.video_key_by=task"], "unknown algorithm.video_key_by 'task'; choose one of rollout, group"),
        (["algorithm.progress_formula=linear"], "unknown algorithm.progress_formula 'linear'; choose one of reference"),
        (["rollout.overlap=maybe"], "unknown rollout.overlap 'maybe'; choose one of true, false, halves"),
        (["data.split_mode=foo"], "unknown data.split_mode 'foo'; choose one of shared, holdout"),
        (["env.env_type=maniskill"], "unknown env.env_type 'maniskill'; choose one of libero"),
        (["algorithm.workflow_type=dapo"], "unknown algorithm.workflow_type 'dapo'; choose one of embodied"),
        (["env.max_steps=0"], r"env.max_steps must be an int >= 1, None \(512\) or 'suite', got 0"),
        (["env.max_steps=2.5"], r"env.max_steps must be an int >= 1, None \(512\) or 'suite', got 2.5"),
        (["embodied.frame_stride=0"], "embodied.frame_stride must be null .* or an int >= 1, got 0"),
        (["actor.clip_ratio_low=1.2"], "actor.clip_ratio_low must lie in"),
        (["trainer.n_gpus_per_node=8"], "n_gpus_per_node = 8 but this is one process: launch one per GPU with torchrun"),
        (["embodied.embed_during_rollout=true", "algorithm.reward=binary"], "needs algorithm.reward=srpo and "
         "algorithm.video_key_by=rollout, got binary and rollout"),
        (["embodied.embed_during_rollout=true", "algorithm.video_key_by=group"], "got srpo and group"),
        # 4 groups x 1.5 -> 6 requested a round, x 8 rollouts: 48 slots can be used, not 49
        (["data.train_batch_size=4", "actor.ppo_mini_batch_size=1", "algorithm.embodied_sampling.oversample_factor=1.5",
          "env.num_envs=49"], "env.num_envs=49 slots cannot all be used: a rollout round of this process has only 48"),
    ],
)
def test_config_errors_name_the_bad_value(overrides, message):
    cfg = _compose(VALID_7B + overrides)
    with pytest.raises(ValueError, match=message):
        check_config(cfg, world_size=1)


def test_the_builders_carry_every_value_of_the_config(tmp_path):
    # values away from every default, so that a knob the builders drop or mix up shows
    from srpo_rl.examples.utils_srpo import (make_advantage, make_loss, make_optimizer, make_policy, make_reward,
                                             make_sampler)

    cfg = _compose([f"output_dir={tmp_path}", "actor.clip_ratio_low=0.15", "actor.clip_ratio_high=0.3",
                    "actor.clip_ratio_c=3.0", "actor.entropy_coeff=0.01", "actor.loss_agg_mode=token-mean",
                    "actor.lr=1e-4", "actor.weight_decay=0.01", "algorithm.reward_coef=4.0",
                    "algorithm.progress_formula=paper", "algorithm.video_key_by=group",
                    "algorithm.norm_adv_by_std_in_grpo=false", "algorithm.embodied_sampling.accuracy_lower_bound=0.2",
                    "algorithm.embodied_sampling.accuracy_upper_bound=0.8",
                    "algorithm.embodied_sampling.filter_truncated=true", "algorithm.embodied_sampling.oversample_factor=1.5",
                    "algorithm.embodied_sampling.max_rollout_rounds=3", "rollout.temperature=1.3", "env.max_steps=40",
                    "data.max_prompt_length=96", "embodied.center_crop=false"], name="tiny")
    info = init_distributed("cpu")
    policy = make_policy(cfg, info)
    assert (policy.temperature, policy.center_crop, policy.max_prompt_length) == (1.3, False, 96)
    loss = make_loss(cfg, policy)
    assert (float(loss.clip_epsilon_low), float(loss.clip_epsilon_high)) == pytest.approx((0.15, 0.3))
    assert (loss.clip_ratio_c, float(loss.entropy_coeff), loss.aggregation) == (3.0, pytest.approx(0.01), "token-mean")
    optimizer = make_optimizer(cfg, policy)
    assert {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(1e-4, 0.01)}
    assert make_advantage(cfg).norm_adv_by_std_in_grpo is False
    reward = make_reward(cfg, info)
    assert (reward.reward_coef, reward.formula, reward.video_key_by, reward.binary) == (4.0, "paper", "group", False)
    assert reward.embedder.center_crop  # the policy's crop only: V-JEPA's input is always center-cropped (siiRL)
    sampler = make_sampler(cfg, info)
    assert (sampler.accuracy_lower_bound, sampler.accuracy_upper_bound, sampler.filter_truncated, sampler.max_steps,
            sampler.oversample_factor, sampler.max_rounds) == (0.2, 0.8, True, 40, 1.5, 3)
    assert sampler.train_batch_size == cfg.data.train_batch_size


def test_a_logger_that_is_not_installed_fails_before_any_work(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # hidden where it is installed, as a bare install lacks it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else find_spec(name, *args))
    with pytest.raises(ValueError, match=r"wandb, which is not installed: pip install 'srpo-rl\[wandb\]'"):
        check_config(_compose(VALID_7B + ["trainer.logger=[console,wandb]"]), world_size=1)


def test_videos_without_an_mp4_writer_fail_before_any_work(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # this machine has imageio-ffmpeg: hide it, as a bare install lacks it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "imageio_ffmpeg" else find_spec(name, *args))
    with pytest.raises(ValueError, match=r"need imageio-ffmpeg.*or set trainer.num_val_videos=0"):
        check_config(_compose(VALID_7B), world_size=1)
    with pytest.raises(ValueError, match=r"or set eval.num_videos=0"):
        check_config(_compose(VALID_7B + ["mode=eval"]), world_size=1)
    check_config(_compose(VALID_7B + ["trainer.num_val_videos=0"]), world_size=1)
    check_config(_compose(VALID_7B + ["trainer.test_freq=0", "trainer.val_before_train=false"]), world_size=1)


def test_config_errors_that_need_the_process_count():
    with pytest.raises(ValueError, match="train_batch_size=64 groups do not divide over 3 processes"):
        check_config(_compose(VALID_7B), world_size=3)
    check_config(_compose(VALID_7B + ["trainer.n_gpus_per_node=8"]), world_size=8)
    check_config(_compose(VALID_7B + ["data.train_batch_size=4", "actor.ppo_mini_batch_size=1", "env.num_envs=48",
                                      "algorithm.embodied_sampling.oversample_factor=1.5"]), world_size=1)
    check_config(_compose(VALID_7B + ["mode=eval", "env.num_envs=1000"]), world_size=1)  # eval rolls out no groups


def test_a_fresh_run_into_an_earlier_runs_checkpoints_fails_before_any_work(tmp_path):
    from srpo_rl.checkpoint import CheckpointManager

    model = torch.nn.Linear(2, 1)
    CheckpointManager(tmp_path).save(30, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                     trainer_state={})
    cfg = _compose(VALID_7B + [f"trainer.default_local_dir={tmp_path}", "trainer.resume_mode=disable"])
    with pytest.raises(ValueError, match=r"holds an earlier run's checkpoints \(steps 30\).*trainer.resume_mode=auto"):
        check_config(cfg, world_size=1)
    check_config(_compose(VALID_7B + [f"trainer.default_local_dir={tmp_path}"]), world_size=1)  # auto resumes it


def test_a_resume_with_other_run_settings_fails_before_any_work(tmp_path):
    from srpo_rl.checkpoint import CheckpointManager
    from srpo_rl.examples.utils_srpo import checkpoint_run_config

    model = torch.nn.Linear(2, 1)
    saved = checkpoint_run_config(_compose(VALID_7B + ["rollout.n=4", "seed=3"]))
    CheckpointManager(tmp_path, run_config=saved).save(30, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                       trainer_state={})
    cfg = _compose(VALID_7B + [f"trainer.default_local_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"config error: checkpoint .*global_step_30 was written by a run with other "
                                         r"settings \(rollout.n: 4 there, 8 here; seed: 3 there, 0 here\)"):
        check_config(cfg, world_size=1)
    check_config(_compose(VALID_7B + [f"trainer.default_local_dir={tmp_path}", "rollout.n=4", "seed=3"]), world_size=1)


def test_missing_model_path_and_unknown_groups():
    # both missing paths in one message, with what each should hold
    with pytest.raises(ConfigError, match=r"model.path is required for model=openvla_oft_7b: pass model.path=<the "
                       r"OpenVLA-OFT SFT checkpoint folder .*; model.vjepa_path is required .*vitg-384.pt"):
        check_config(_compose([]), world_size=1)
    with pytest.raises(Exception, match="Could not find 'env/libero_lng'"):
        _compose(["env=libero_lng"])
    assert _compose(["env=libero_10"]).env == _compose(["env=libero_long"]).env  # the reference's name for it
    with pytest.raises(Exception, match="Could not find 'model/llama'"):
        _compose(["model=llama"])
    check_config(_compose([], name="tiny"), world_size=1)  # the README's main job is valid
    check_config(_compose(["mode=eval", "model.path=."]), world_size=1)  # greedy evaluation needs no V-JEPA
    with pytest.raises(ValueError, match="model.vjepa_path is required"):
        check_config(_compose(["model.path=."]), world_size=1)


def test_eval_rows_are_the_chosen_tasks_and_trials_of_the_suite():
    rows = make_eval_rows(_compose(["env=libero_goal", "eval.task_ids=[3,0]", "eval.num_trials_per_task=2"]))
    assert [(r["suite"], r["task_id"], r["trial_id"]) for r in rows] == [
        ("libero_goal", 0, 0), ("libero_goal", 0, 1), ("libero_goal", 3, 0), ("libero_goal", 3, 1)]
    assert len(make_eval_rows(_compose(["env=libero_goal", "eval.num_trials_per_task=1"]))) == 10  # every task
    with pytest.raises(ValueError, match=r"eval.task_ids \[10\] are not tasks of libero_goal: choose from 0 to 9"):
        make_eval_rows(_compose(["env=libero_goal", "eval.task_ids=[2,10]"]))
    for bad in ("3", "[]"):  # a bare id, an empty selection
        with pytest.raises(ValueError, match=r"eval.task_ids must be null \(every task\) or a non-empty list"):
            make_eval_rows(_compose(["env=libero_goal", f"eval.task_ids={bad}"]))


def test_host_reserve_counts_env_growth_and_two_copies_of_a_batch_of_policy_images():
    # the recipe: 16 envs growing by up to 0.5 GiB each; 64 groups x 8 rollouts x 64 chunks of one 224x224 RGB image,
    # twice (a round's stacked trajectories beside the sampler's copy of the kept groups)
    assert host_reserve_bytes(_compose(VALID_7B), 224) == 16 * 2**29 + 2 * 64 * 8 * (512 // 8) * 224 * 224 * 3
    two_images = _compose(VALID_7B + ["env.num_envs=4", "env.max_steps=100", "embodied.num_images_in_input=2"])
    assert host_reserve_bytes(two_images, 224) == 4 * 2**29 + 2 * 64 * 8 * 13 * 2 * 224 * 224 * 3  # 13 chunks
    # the per-suite horizon: libero_goal's 300 steps, 38 chunks
    per_suite = _compose(VALID_7B + ["env=libero_goal", "env.max_steps=suite"])
    assert host_reserve_bytes(per_suite, 224) == 16 * 2**29 + 2 * 64 * 8 * 38 * 224 * 224 * 3


def test_host_reserve_counts_every_process_of_the_host(monkeypatch):
    # two nodes of 8 processes: 8 here, each with 16 envs and 64 / 16 = 4 groups of the batch
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert host_reserve_bytes(_compose(VALID_7B), 224) == 8 * 16 * 2**29 + 2 * (8 * 4) * 8 * 64 * 224 * 224 * 3


def test_batch_metrics_are_the_shaped_reward_and_advantage_statistics():
    from tensordict import TensorDict

    from srpo_rl.examples.utils_srpo import batch_metrics

    success = [True, False, False, True, False]
    progress = [1.0, 0.25, 0.5, 1.0, 0.125]
    advantage = [1.5, -0.5, 0.0, 1.0, -2.0]
    batch = TensorDict(success=torch.tensor(success), progress=torch.tensor(progress),
                       reward=5.0 * torch.tensor(progress), advantage=torch.tensor(advantage), batch_size=[5])
    metrics = batch_metrics(batch)
    rewards = [5.0 * p for p in progress]
    mean = sum(rewards) / 5
    assert metrics["train/reward_mean"] == pytest.approx(mean)
    assert metrics["train/reward_std"] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / 5) ** 0.5)
    assert metrics["train/failure_progress_mean"] == pytest.approx((0.25 + 0.5 + 0.125) / 3)
    assert metrics["train/failure_progress_max"] == pytest.approx(0.5)
    assert metrics["train/advantage_abs_mean"] == pytest.approx(5.0 / 5)
    assert (metrics["train/advantage_min"], metrics["train/advantage_max"]) == (-2.0, 1.5)
    assert "train/failure_progress_mean" not in batch_metrics(batch[[0, 3]])  # no failure: no progress to show


def test_rollout_metrics_add_up_the_rounds_and_give_the_rows_a_policy_call():
    from tensordict import TensorDict

    from srpo_rl.examples.utils_srpo import rollout_metrics
    from srpo_rl.objectives import EmbodiedSampler
    from srpo_rl.rollout import RolloutStats

    def round_(success, steps, **counts):
        trajectories = TensorDict(success=torch.tensor(success), num_steps=torch.tensor(steps), batch_size=[len(steps)])
        return trajectories, RolloutStats(**counts)

    collected = [round_([True, False], [160, 512], env_steps=672, decisions=84, policy_calls=20, wall_time=2.0,
                        env_time=1.5, policy_time=1.0, policy_gpu_time=1.5),
                 round_([False], [512], env_steps=512, decisions=64, policy_calls=12, wall_time=1.0, env_time=0.5,
                        policy_time=0.75, reset_time=0.25, policy_gpu_time=0.6)]
    metrics = rollout_metrics(collected, EmbodiedSampler(2), rounds=2)
    assert metrics["rollout/success_rate"] == pytest.approx(1 / 3)
    assert metrics["rollout/episode_length"] == pytest.approx((160 + 512 + 512) / 3)
    assert metrics["rollout/env_steps_per_s"] == pytest.approx((672 + 512) / 3.0)
    assert metrics["rollout/policy_calls"] == 32
    assert metrics["rollout/mean_batch"] == pytest.approx((84 + 64) / 32)
    assert (metrics["time/rollout_env"], metrics["time/rollout_policy"], metrics["time/rollout_reset"]) == \
        (2.0, 1.75, 0.25)
    assert metrics["rollout/policy_gpu_share"] == pytest.approx((1.5 + 0.6) / 3.0)
    assert metrics["sampling/groups_carried"] == 0.0
    # a step that trains on carried groups runs no round: counts only, no rates over nothing
    idle = rollout_metrics([], EmbodiedSampler(2), 0)
    assert idle["rollout/rounds"] == 0.0 and idle["rollout/trajectories"] == 0.0
    assert idle["sampling/groups_carried"] == 0.0 and not any(k.startswith("time/") for k in idle)


def test_compile_blocks_compiles_the_reward_encoders_layers_too(tmp_path):
    from srpo_rl.distributed import DistInfo
    from srpo_rl.examples.utils_srpo import make_reward
    from srpo_rl.models.vjepa2 import write_tiny_vjepa2_checkpoint

    write_tiny_vjepa2_checkpoint(tmp_path / "vjepa.pt", layout="original")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    for compiled in (False, True):
        cfg = _compose([f"model.vjepa_path={tmp_path / 'vjepa.pt'}", f"model.compile_blocks={compiled}"], name="tiny")
        layers = make_reward(cfg, info).embedder.encoder.encoder.layer
        assert all(("forward" in layer.__dict__) == compiled for layer in layers)
