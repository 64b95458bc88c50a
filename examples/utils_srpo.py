"""Builders for examples/srpo_libero.py: config checks, models, env, reward, objectives, logging.

Example (the tiny config checked, then a bad value named before any work):
    >>> from pathlib import Path
    >>> from hydra import compose, initialize_config_dir
    >>> import srpo_rl.examples
    >>> from srpo_rl.examples.utils_srpo import check_config
    >>> config_dir = str(Path(srpo_rl.examples.__file__).parent / "config")
    >>> with initialize_config_dir(config_dir=config_dir, version_base=None):
    ...     cfg = compose("tiny", overrides=["rollout.temperature=0"])
    >>> check_config(cfg, world_size=1)
    Traceback (most recent call last):
    ...
    srpo_rl.examples.utils_srpo.ConfigError: config error: rollout.temperature must be a number > 0, got 0
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensordict import TensorDictBase

from srpo_rl.checkpoint import CheckpointManager, checkpoint_step
from srpo_rl.distributed import DTYPES, DistInfo, combine_metrics, gather_objects, shard_actor
from srpo_rl.envs import LiberoVecEnv, make_libero_env
from srpo_rl.evaluation import EvalResult
from srpo_rl.loggers import LOGGER_TYPES, MetricLogger
from srpo_rl.envs import canonical_suite, resolve_max_steps
from srpo_rl.manifest import SPLIT_MODES, ensure_manifests, generate_manifests
from srpo_rl.objectives import AGGREGATIONS, EmbodiedSampler, GroupAdvantage, SRPOLoss
from srpo_rl.optim import HostAdamW, check_gpu_update_fits
from srpo_rl.jpeg import JPEG_QUALITY
from srpo_rl.lora import add_lora
from srpo_rl.models.openvla_oft import OpenVLAOFTConfig
from srpo_rl.policy import OpenVLAOFTPolicy
from srpo_rl.rewards import FORMULAS, VIDEO_KEY_BY, BackgroundEmbedder, SRPOProgressReward
from srpo_rl.rollout import RolloutStats

__all__ = [
    "ConfigError", "batch_metrics", "check_config", "checkpoint_run_config", "config_errors_reported",
    "host_optimizer", "host_reserve_bytes", "known_options", "log_evaluation", "make_advantage",
    "make_background_embedder", "make_env", "make_eval_rows", "make_logger", "make_loss", "make_manifests",
    "make_optimizer", "make_policy", "make_reward", "make_sampler", "memory_metrics", "rollout_metrics",
    "siirl_overrides", "update_metrics",
]

MODES = ("train", "eval")
OPTIMIZER_STATE_DTYPES = ("fp32", "bf16")
RESUME_MODES = ("auto", "disable", "resume_path")
# options with a fixed set of values, checked before any work (the library checks them again where it uses them)
_CHOICES = {
    "algorithm.workflow_type": ("embodied",),
    "env.env_type": ("libero",),
    "env.model_family": ("openvla",),
    "data.split_mode": SPLIT_MODES,
    "actor.loss_agg_mode": AGGREGATIONS,
    "algorithm.progress_formula": FORMULAS,
    "algorithm.video_key_by": VIDEO_KEY_BY,
    "rollout.overlap": (True, False, "halves"),
}


# options that take true / false only (YAML's words): Hydra reads any other word as a string, which would pass as true
_BOOLEANS = (
    "algorithm.norm_adv_by_std_in_grpo", "algorithm.embodied_sampling.filter_accuracy",
    "algorithm.embodied_sampling.filter_truncated", "actor.shuffle", "actor.enable_gradient_checkpointing",
    "actor.fsdp.param_offload", "actor.fsdp.grad_offload", "actor.fsdp.optimizer_offload", "rollout.do_sample",
    "rollout.jpeg_in_workers", "embodied.embedding_enable_fp16", "embodied.embedding_model_offload",
    "embodied.center_crop", "embodied.embed_during_rollout", "trainer.val_before_train", "env.legacy_look",
    "model.compile_blocks",
)
# integer options and the least value each may take
_AT_LEAST = {
    "data.train_batch_size": 1, "actor.ppo_mini_batch_size": 1, "rollout.n": 2, "actor.ppo_micro_batch_size": 1,
    "actor.traj_mini_batch_size": 1, "actor.ppo_epochs": 1, "env.num_envs": 1, "env.num_steps_wait": 0,
    "algorithm.embodied_sampling.max_rollout_rounds": 1, "trainer.total_epochs": 1, "trainer.num_val_videos": 0,
    "embodied.embedding_num_frames": 1, "embodied.num_images_in_input": 1, "actor.lora_rank": 0,
    "env.num_trials_per_task": 1, "eval.num_trials_per_task": 1,
}
_WHY_AT_LEAST = {"rollout.n": " (GRPO compares the rollouts of a group: a group of one has no advantage)"}
# numeric options that must be > 0 (and >= 0 for the second group)
_POSITIVE = ("actor.lr", "actor.grad_clip", "algorithm.reward_coef", "rollout.temperature",
             "algorithm.embodied_sampling.oversample_factor", "actor.lora_alpha")
_NON_NEGATIVE = ("actor.weight_decay", "actor.entropy_coeff")


# siiRL's option names (its embodied SRPO script's) -> ours, whole names or prefixes (the longest match wins); the
# suite's name selects the env group, which carries the suite's settings (unnorm_key, max_steps)
SIIRL_NAMES = {
    "actor_rollout_ref.model.path": "model.path",
    "actor_rollout_ref.model.enable_gradient_checkpointing": "actor.enable_gradient_checkpointing",
    "actor_rollout_ref.actor.optim.": "actor.",
    "actor_rollout_ref.actor.fsdp_config.": "actor.fsdp.",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "actor.ppo_micro_batch_size",
    "actor_rollout_ref.actor.": "actor.",
    "actor_rollout_ref.rollout.": "rollout.",
    "actor_rollout_ref.embodied.video_embedding_model_path": "model.vjepa_path",
    "actor_rollout_ref.embodied.env.env_name": "env",
    "actor_rollout_ref.embodied.env.": "env.",
    "actor_rollout_ref.embodied.": "embodied.",
    "trainer.max_actor_ckpt_to_keep": "trainer.max_ckpt_keep",
    "actor_rollout_ref.embodied.img_size": "embodied.embedding_img_size",  # the names in the recipe's comments
    "actor_rollout_ref.embodied.enable_fp16": "embodied.embedding_enable_fp16",
    "reward_model.reward_kwargs.reward_coef": "algorithm.reward_coef",  # siiRL's yaml
}
# siiRL options that set nothing here, accepted at the values that describe this library: the response is always
# the 56 action tokens, the rollout runs the training module itself, the model is OpenVLA-OFT, there is no critic
SIIRL_FIXED = {
    "data.max_response_length": None,
    "actor_rollout_ref.rollout.response_length": None,
    "actor_rollout_ref.rollout.name": ("hf",),
    "actor_rollout_ref.embodied.embodied_type": ("openvla-oft", "openvla_oft"),
    "critic.use_critic_model": ("False", "false"),
    # siiRL's yaml defaults, which the embodied actor leaves at no effect: no KL term, no top-k / top-p, a constant lr
    "actor_rollout_ref.actor.use_kl_loss": ("False", "false"),
    "actor_rollout_ref.actor.kl_loss_coef": None,
    "actor_rollout_ref.actor.kl_loss_type": None,
    "actor_rollout_ref.rollout.top_k": ("-1", "0"),
    "actor_rollout_ref.rollout.top_p": ("1", "1.0"),
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": None,
    "actor_rollout_ref.actor.optim.lr_warmup_steps": ("-1", "0"),
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": ("0", "0.0"),
    "actor_rollout_ref.actor.optim.warmup_style": ("constant",),
    "trainer.val_only": ("False", "false"),
}
# siiRL options whose value would mean something else here
SIIRL_REFUSED = {
    "actor_rollout_ref.actor.ppo_micro_batch_size": "siiRL's deprecated global micro-batch; ours is per GPU: pass "
                                                    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
}
SIIRL_CONFIG_NAME = "embodied_srpo_trainer"  # siiRL's config: ours is config.yaml


def siirl_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with siiRL's option names written as ours, so that a siiRL SRPO command line runs
    here as it is; the options that set nothing here are dropped at the values that describe this library.

    Examples:
        >>> siirl_overrides(["actor_rollout_ref.actor.optim.lr=1e-5", "actor_rollout_ref.embodied.env.env_name=libero_10",
        ...                  "critic.use_critic_model=False", "rollout.n=4", "--config-name", "tiny"])
        ['actor.lr=1e-5', 'env=libero_10', 'rollout.n=4', '--config-name', 'tiny']
    """
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if override == SIIRL_CONFIG_NAME and out and out[-1] in ("--config-name", "-cn"):
            out.append("config")
        elif key in ("--config-name", "-cn") and value == SIIRL_CONFIG_NAME:
            out.append(f"{key}=config")
        elif not sep or key.startswith("-"):
            out.append(override)
        elif key in SIIRL_REFUSED:
            _fail(f"{key}: {SIIRL_REFUSED[key]}")
        elif key in SIIRL_FIXED:
            accepted = SIIRL_FIXED[key]
            if accepted is not None and value not in accepted:
                _fail(f"siiRL's {key}={value} has no counterpart here; accepted: {', '.join(accepted)} (README: "
                      "Configuration)")
        else:
            prefix = max((p for p in SIIRL_NAMES if key == p or (p.endswith(".") and key.startswith(p))),
                         key=len, default=None)
            out.append(override if prefix is None else f"{SIIRL_NAMES[prefix]}{key[len(prefix):]}={value}")
    return out


class ConfigError(ValueError):
    """A bad configuration, found before any work: the message names the bad value, the valid ones and the fix.
    ``srpo-libero`` prints it without a traceback and exits with status 2."""


@contextlib.contextmanager
def config_errors_reported() -> Iterator[None]:
    """A :class:`ConfigError` raised inside printed as its message alone (no traceback), then exit status 2."""
    try:
        yield
    except ConfigError as error:
        print(f"srpo-libero: {error}", file=sys.stderr)
        sys.exit(2)


def _fail(message: str) -> None:
    raise ConfigError(f"config error: {message}") from None  # the message says it all, also inside an except


def _leaf_keys(node: object, prefix: str = "") -> set[str]:
    """The dotted names of a YAML tree's leaves (a list is a leaf)."""
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(_leaf_keys(value, f"{prefix}{key}.") for key, value in node.items())) if node else {prefix}


def known_options() -> set[str]:
    """Every option the packaged configs define (``config.yaml``, ``tiny.yaml``, ``env/*.yaml``, ``model/*.yaml``)."""
    config_dir = Path(__file__).resolve().parent / "config"
    names: set[str] = set()
    for path, prefix in [(p, "") for p in config_dir.glob("*.yaml")] + [
            (p, f"{p.parent.name}.") for p in config_dir.glob("*/*.yaml")]:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        names |= {name.rstrip(".") for name in _leaf_keys({k: v for k, v in tree.items() if k not in ("defaults",
                                                                                                    "hydra")}, prefix)}
    return names


def _check_known_options(cfg: DictConfig) -> None:
    # Hydra refuses a misspelled option but advises "+key=value", which would add an option nothing reads
    known = known_options()
    tree = OmegaConf.to_container(cfg, resolve=False)
    unknown = sorted(name.rstrip(".") for name in _leaf_keys({k: v for k, v in tree.items() if k != "hydra"})
                     if name.rstrip(".") not in known)
    if unknown:
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1)) else name
                 for name in unknown]
        _fail(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: nothing here reads "
              f"{'them' if len(unknown) > 1 else 'it'} (README: Configuration lists every option)")


def _check_types_and_ranges(cfg: DictConfig) -> None:
    for name in _BOOLEANS:
        value = OmegaConf.select(cfg, name)
        if not isinstance(value, bool):
            _fail(f"{name} must be true or false, got {value!r}")
    for name, least in _AT_LEAST.items():
        value = OmegaConf.select(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            _fail(f"{name} must be an int >= {least}, got {value!r}" + _WHY_AT_LEAST.get(name, ""))
    for name in _POSITIVE + _NON_NEGATIVE:
        value = OmegaConf.select(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                value <= 0 if name in _POSITIVE else value < 0):
            _fail(f"{name} must be a number {'> 0' if name in _POSITIVE else '>= 0'}, got {value!r}")
    keep = cfg.trainer.max_ckpt_keep
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        _fail(f"trainer.max_ckpt_keep must be null or 0 (keep every checkpoint, as siiRL) or an int >= 1, got {keep!r}")
    steps = cfg.trainer.total_training_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        _fail(f"trainer.total_training_steps must be null (trainer.total_epochs decides) or an int >= 1, got {steps!r}")


def _check_unnorm_key(cfg: DictConfig, suite: str) -> None:
    """``env.env_name`` set alone keeps the env group's statistics key: another suite's, which would un-normalise the
    actions with the wrong statistics (silently, for a checkpoint that holds both)."""
    try:
        key_suite = canonical_suite(cfg.embodied.unnorm_key)
    except ValueError:  # a dataset key of the user's own, not a suite name: theirs to choose
        return
    if key_suite != suite:
        _fail(f"env.env_name={cfg.env.env_name} but embodied.unnorm_key={cfg.embodied.unnorm_key} (the action "
              f"statistics; env.unnorm_key by default): select the suite as env={cfg.env.env_name}, whose group sets "
              "both, or set embodied.unnorm_key too")


def _check_resume_path(path: str | None, save_dir: str, earlier: list[int]) -> None:
    """``resume_mode=resume_path`` needs a ``global_step_<k>`` folder, and a save folder without later steps (the next
    ``auto`` resume would take those: another branch of the run)."""
    if not path:
        _fail("trainer.resume_mode=resume_path needs trainer.resume_from_path=<a global_step_<k> folder>")
    try:
        chosen = checkpoint_step(path)
    except (FileNotFoundError, ValueError) as error:
        _fail(f"trainer.resume_from_path: {error}")
    later = [step for step in earlier if step > chosen]
    if later:
        _fail(f"trainer.default_local_dir={save_dir} holds checkpoints after {Path(path).name} (steps "
              f"{', '.join(map(str, later))}), which the next resume would take over this run's: save into another "
              "output_dir / trainer.default_local_dir")


def _check_checkpoints(cfg: DictConfig, world_size: int) -> None:
    """What the training's start will do with ``trainer.default_local_dir``'s checkpoints, checked before any model is
    built (the 7B, 84 GiB of host state): no fresh run into an earlier run's folder, and a resumed checkpoint written
    with this run's settings."""
    manager = CheckpointManager(cfg.trainer.default_local_dir, keep=None, run_config=checkpoint_run_config(cfg))
    earlier = manager.complete_steps()
    mode = cfg.trainer.resume_mode
    if mode == "disable" and earlier:
        _fail(f"trainer.default_local_dir={cfg.trainer.default_local_dir} holds an earlier run's checkpoints (steps "
              f"{', '.join(map(str, earlier))}), which a fresh run's would mix with: resume it "
              "(trainer.resume_mode=auto), or start afresh in another output_dir / trainer.default_local_dir")
    resumed = None
    if mode == "resume_path":
        _check_resume_path(cfg.trainer.resume_from_path, cfg.trainer.default_local_dir, earlier)
        resumed = cfg.trainer.resume_from_path
    elif mode == "auto" and earlier:
        resumed = manager.path(earlier[-1])
    if resumed is not None:
        try:
            manager.check_run(resumed, world_size)
        except ValueError as error:
            _fail(str(error))


# what each model path holds, for the message that names a missing one
_MODEL_PATHS = {
    "path": "the OpenVLA-OFT SFT checkpoint folder (config.json, model*.safetensors, dataset_statistics.json, the "
            "tokenizer), e.g. Sylvest/OpenVLA-AC-PD-1traj-libero-long",
    "vjepa_path": "V-JEPA 2 ViT-g/384: the release's vitg-384.pt or a Hugging Face V-JEPA 2 folder",
}


def _check_model_paths(cfg: DictConfig) -> None:
    problems = []
    for key in ("path", "vjepa_path") if cfg.mode == "train" else ("path",):  # eval needs no reward model
        value = cfg.model.get(key)  # None also where the config leaves OmegaConf's missing value, ???
        if value is None:
            problems.append(f"model.{key} is required for model={cfg.model.name}: pass model.{key}=<{_MODEL_PATHS[key]}>")
        elif cfg.model.name != "tiny" and not Path(value).exists():
            problems.append(f"model.{key}={value!r} does not exist (expected {_MODEL_PATHS[key]})")
    if problems:
        _fail("; ".join(problems) + ". Without weights, `--config-name tiny` runs the recipe with a tiny random model")


def check_config(cfg: DictConfig, world_size: int | None = None) -> None:
    """Fails before any work with a message naming the bad value and the valid ones."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mode not in MODES:
        _fail(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    _check_known_options(cfg)
    try:
        suite = canonical_suite(cfg.env.env_name)
    except ValueError as error:  # the env's own check, named as the config's option
        _fail(f"env.env_name: {error}")
    _check_unnorm_key(cfg, suite)
    _check_model_paths(cfg)
    _check_types_and_ranges(cfg)
    for name, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, name)
        if value not in choices:  # written as in YAML: true / false
            shown = [str(c).lower() if isinstance(c, bool) else c for c in choices]
            _fail(f"unknown {name} {value!r}; choose one of {', '.join(shown)}")
    try:
        resolve_max_steps(cfg.env.max_steps, cfg.env.env_name)
    except ValueError as error:  # the env's own check, named as the config's option
        _fail(f"env.{error}")
    model_chunk = (OpenVLAOFTConfig.num_actions_chunk, OpenVLAOFTConfig.action_dim)
    if (cfg.embodied.action_chunks_len, cfg.embodied.action_token_len) != model_chunk:
        _fail(f"embodied.action_chunks_len x action_token_len = {cfg.embodied.action_chunks_len} x "
              f"{cfg.embodied.action_token_len}, but OpenVLA-OFT's LIBERO head decodes chunks of {model_chunk[0]} "
              f"actions x {model_chunk[1]} dims: set {model_chunk[0]} and {model_chunk[1]}")
    stride = cfg.embodied.frame_stride
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        _fail(f"embodied.frame_stride must be null (one frame per chunk) or an int >= 1, got {stride!r}")
    low, high, c = cfg.actor.clip_ratio_low, cfg.actor.clip_ratio_high, cfg.actor.clip_ratio_c
    if not 0 < low < 1 or high <= 0 or c <= 1:
        _fail(f"actor.clip_ratio_low must lie in (0, 1), clip_ratio_high be > 0 and clip_ratio_c > 1; got {low}, "
              f"{high}, {c}")
    sampling = cfg.algorithm.embodied_sampling
    low, high = sampling.accuracy_lower_bound, sampling.accuracy_upper_bound
    if not 0.0 <= low <= 1.0 or not 0.0 <= high <= 1.0:
        _fail(f"accuracy bounds must lie in [0, 1], got lower={low}, upper={high}")
    if low > high:
        _fail(f"accuracy_lower_bound {low} > accuracy_upper_bound {high}")
    train_bs, mini, n = cfg.data.train_batch_size, cfg.actor.ppo_mini_batch_size, cfg.rollout.n
    if train_bs % world_size:
        _fail(f"data.train_batch_size={train_bs} groups do not divide over {world_size} processes")
    if train_bs % mini:
        _fail(f"data.train_batch_size={train_bs} is not a multiple of actor.ppo_mini_batch_size={mini}")
    if (mini * n) % world_size:
        _fail(f"actor.ppo_mini_batch_size x rollout.n = {mini * n} trajectories do not divide over {world_size} processes")
    first_request = EmbodiedSampler(  # the first round's groups, by the sampler's own rule
        train_bs // world_size, oversample_factor=sampling.oversample_factor).groups_to_request()
    rollouts_per_round = first_request * n
    if cfg.mode == "train" and cfg.env.num_envs > rollouts_per_round:
        _fail(f"env.num_envs={cfg.env.num_envs} slots cannot all be used: a rollout round of this process has only "
              f"{rollouts_per_round} rollouts (train_batch_size / processes x oversample_factor, rounded up, x "
              "rollout.n); lower env.num_envs")
    if cfg.embodied.embed_during_rollout and (cfg.algorithm.reward, cfg.algorithm.video_key_by) != ("srpo", "rollout"):
        _fail("embodied.embed_during_rollout embeds each rollout's own video for the srpo reward: it needs "
              f"algorithm.reward=srpo and algorithm.video_key_by=rollout, got {cfg.algorithm.reward} and "
              f"{cfg.algorithm.video_key_by}")
    if cfg.actor.fsdp.mixed_precision not in DTYPES:
        _fail(f"unknown actor.fsdp.mixed_precision {cfg.actor.fsdp.mixed_precision!r}; choose one of "
              f"{', '.join(DTYPES)}")
    if cfg.actor.fsdp.optimizer_state_dtype not in OPTIMIZER_STATE_DTYPES:
        _fail(f"unknown actor.fsdp.optimizer_state_dtype {cfg.actor.fsdp.optimizer_state_dtype!r}; choose one of "
              f"{', '.join(OPTIMIZER_STATE_DTYPES)}")
    if cfg.actor.fsdp.optimizer_state_dtype != "fp32" and not host_optimizer(cfg):
        _fail(f"actor.fsdp.optimizer_state_dtype={cfg.actor.fsdp.optimizer_state_dtype} applies to the host optimizer "
              f"only: set actor.fsdp.optimizer_offload=true (without param_offload / grad_offload)")
    if cfg.actor.lora_rank and host_optimizer(cfg):
        _fail("actor.lora_rank trains fp32 adapters with AdamW on the GPU (108 M parameters for the 7B at rank 32): "
              "actor.fsdp.optimizer_offload (the host optimizer for the full model) does not apply; set it false")
    if cfg.trainer.resume_mode not in RESUME_MODES:
        _fail(f"unknown trainer.resume_mode {cfg.trainer.resume_mode!r}; choose one of {', '.join(RESUME_MODES)}")
    if cfg.mode == "train":
        _check_checkpoints(cfg, world_size)
    if cfg.algorithm.adv_estimator != "grpo":
        _fail(f"unknown algorithm.adv_estimator {cfg.algorithm.adv_estimator!r}; srpo_rl implements grpo")
    loggers = [cfg.trainer.logger] if isinstance(cfg.trainer.logger, str) else list(cfg.trainer.logger)
    unknown = [name for name in loggers if name not in LOGGER_TYPES]
    if unknown:
        _fail(f"unknown trainer.logger {unknown[0]!r}; choose from {', '.join(LOGGER_TYPES)}")
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        _fail("trainer.logger has wandb, which is not installed: pip install 'srpo-rl[wandb]' or leave it out")
    validates = cfg.trainer.val_before_train or cfg.trainer.test_freq > 0
    videos = cfg.eval.num_videos if cfg.mode == "eval" else cfg.trainer.num_val_videos * validates
    if videos and importlib.util.find_spec("imageio_ffmpeg") is None:  # else the first video fails, after the work
        _fail("validation videos (mp4) need imageio-ffmpeg, which is not installed: pip install imageio-ffmpeg, or "
              f"set {'eval.num_videos' if cfg.mode == 'eval' else 'trainer.num_val_videos'}=0")
    if cfg.algorithm.reward not in ("srpo", "binary"):
        _fail(f"unknown algorithm.reward {cfg.algorithm.reward!r}; choose one of srpo, binary")
    processes = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    if processes != world_size:
        launch = f"torchrun started {world_size} processes" if world_size > 1 else (
            "this is one process: launch one per GPU with torchrun (--nnodes, --nproc_per_node)")
        _fail(f"trainer.nnodes x trainer.n_gpus_per_node = {processes} but {launch}")


def make_manifests(cfg: DictConfig, info: DistInfo) -> tuple[list[dict], list[dict]]:
    """The train / validation manifests, generated by rank 0 when missing (an existing file is used as it is)."""
    kwargs = dict(suites=[cfg.env.env_name], num_trials_per_task=cfg.env.num_trials_per_task,
                  split_mode=cfg.data.split_mode, val_trials_per_task=cfg.data.val_trials_per_task)
    if info.is_main:
        existing = [path for path in (cfg.data.train_files, cfg.data.val_files) if Path(path).exists()]
        if existing:  # a rerun in the same output_dir would otherwise silently ignore changed data.* settings
            print(f"using the existing manifest(s) {', '.join(map(str, existing))}: env.num_trials_per_task and "
                  "data.split_mode apply when one is generated (delete it to regenerate)", flush=True)
        ensure_manifests(cfg.data.train_files, cfg.data.val_files, **kwargs)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ensure_manifests(cfg.data.train_files, cfg.data.val_files, **kwargs)


def make_eval_rows(cfg: DictConfig) -> list[dict]:
    """What ``mode=eval`` rolls out: ``eval.task_ids`` (null: every task) of ``env.env_name`` x the first
    ``eval.num_trials_per_task`` init states of each."""
    suite = canonical_suite(cfg.env.env_name)
    _, rows = generate_manifests([suite], num_trials_per_task=cfg.eval.num_trials_per_task)
    if cfg.eval.task_ids is None:
        return rows
    if not isinstance(cfg.eval.task_ids, ListConfig | list) or not cfg.eval.task_ids:
        _fail(f"eval.task_ids must be null (every task) or a non-empty list such as [0,3], got {cfg.eval.task_ids!r}")
    known = sorted({row["task_id"] for row in rows})
    unknown = sorted(set(cfg.eval.task_ids) - set(known))
    if unknown:
        _fail(f"eval.task_ids {unknown} are not tasks of {suite}: choose from 0 to {known[-1]}")
    return [row for row in rows if row["task_id"] in set(cfg.eval.task_ids)]


def _tiny_checkpoints(cfg: DictConfig, info: DistInfo) -> None:
    from srpo_rl.models.openvla_oft import write_tiny_checkpoint
    from srpo_rl.models.vjepa2 import write_tiny_vjepa2_checkpoint

    if info.is_main and not Path(cfg.model.path).exists():
        write_tiny_checkpoint(cfg.model.path, seed=cfg.seed)
    if info.is_main and not Path(cfg.model.vjepa_path).exists():
        write_tiny_vjepa2_checkpoint(cfg.model.vjepa_path, layout="original", seed=cfg.seed)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def make_policy(cfg: DictConfig, info: DistInfo) -> OpenVLAOFTPolicy:
    """OpenVLA-OFT from ``model.path`` (a tiny random one is written first for ``model=tiny``), FSDP2-sharded
    (on one GPU with LoRA adapters and no offload: the plain module)."""
    if cfg.model.name == "tiny":
        _tiny_checkpoints(cfg, info)
    policy = OpenVLAOFTPolicy.from_pretrained(
        cfg.model.path,
        unnorm_key=cfg.embodied.unnorm_key,
        temperature=cfg.rollout.temperature,
        center_crop=cfg.embodied.center_crop,
        num_images_in_input=cfg.embodied.num_images_in_input,
        attention=cfg.model.attention,
        # fp32 master weights, FSDP2 computing in actor.fsdp.mixed_precision; or, with the master weights in the
        # host optimizer or frozen under LoRA adapters, the weights stored in the compute dtype
        dtype=DTYPES[cfg.actor.fsdp.mixed_precision] if host_optimizer(cfg) or cfg.actor.lora_rank else torch.float32,
        max_prompt_length=cfg.data.max_prompt_length,
        jpeg_quality=None if cfg.rollout.jpeg_in_workers else JPEG_QUALITY,  # else the env's workers do it
    )
    if cfg.actor.lora_rank:  # before sharding: FSDP2 shards the adapters with their layers' weights
        add_lora(policy.model, cfg.actor.lora_rank, cfg.actor.lora_alpha)
    if cfg.actor.enable_gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    if cfg.model.compile_blocks:  # before sharding: FSDP2's hooks then wrap the compiled blocks
        policy.model.compile_blocks()
    fsdp = cfg.actor.fsdp
    offload = fsdp.param_offload or fsdp.grad_offload
    if info.world_size == 1 and cfg.actor.lora_rank and not offload:
        # One GPU, LoRA: FSDP2 would shard nothing, and its one job here, the cast to the compute dtype, is done
        # (the base is stored in it, the fp32 adapters cast themselves). The plain module rolls out through the
        # policy's CUDA graphs, which never capture an FSDP2 module, and needs no gathered copy of the weights.
        policy.model.to(info.device)
    else:
        shard_actor(policy.model, info, mixed_precision=fsdp.mixed_precision, param_offload=offload)
    return policy.eval()


def make_env(cfg: DictConfig) -> LiberoVecEnv:
    """``env.num_envs`` LIBERO slots for this process (the simulators' numpy seed 0 on every rank, as the reference
    seeds every episode's env: it places LIBERO's fixtures, so one init state shows one scene on every rank)."""
    return make_libero_env(
        cfg.env.env_name,
        cfg.env.num_envs,
        max_steps=cfg.env.max_steps,
        num_steps_wait=cfg.env.num_steps_wait,
        action_chunks_len=cfg.embodied.action_chunks_len,
        action_token_len=cfg.embodied.action_token_len,
        frame_stride=cfg.embodied.frame_stride,
        wrist_image=cfg.embodied.num_images_in_input > 1,
        step_timeout=cfg.env.step_timeout,
        jpeg_quality=JPEG_QUALITY if cfg.rollout.jpeg_in_workers else None,
        legacy_look=cfg.env.legacy_look,
    )


def make_reward(cfg: DictConfig, info: DistInfo) -> SRPOProgressReward:
    """The SRPO progress reward on V-JEPA 2 embeddings, or the binary success reward (plain GRPO)."""
    alg, emb = cfg.algorithm, cfg.embodied
    if alg.reward == "binary":
        return SRPOProgressReward(None, binary=True, reward_coef=alg.reward_coef)
    from srpo_rl.models.vjepa2 import VideoEmbedder, load_vjepa2

    encoder = load_vjepa2(cfg.model.vjepa_path, img_size=emb.embedding_img_size, num_frames=emb.embedding_num_frames)
    embedder = VideoEmbedder(encoder, img_size=emb.embedding_img_size, num_frames=emb.embedding_num_frames,
                             enable_fp16=emb.embedding_enable_fp16 and info.device.type == "cuda",
                             offload=emb.embedding_model_offload, device=info.device,
                             progress=info.is_main and "reward")
    if cfg.model.compile_blocks:
        embedder.compile_layers()
    return SRPOProgressReward(embedder, reward_coef=alg.reward_coef, formula=alg.progress_formula,
                              video_key_by=alg.video_key_by)


def make_background_embedder(cfg: DictConfig, reward_module: SRPOProgressReward, sampler: EmbodiedSampler,
                             info: DistInfo) -> BackgroundEmbedder | None:
    """Embeds the trajectories of the groups the sampler keeps, for the reward, while the rollout runs (None
    unless ``embodied.embed_during_rollout``, which check_config allows only for the srpo reward on each
    rollout's video: the reward then embeds the kept groups after the rollout)."""
    if not cfg.embodied.embed_during_rollout:
        return None
    return BackgroundEmbedder(reward_module.embedder, device=info.device, keep_group=sampler.keeps,
                              group_size=cfg.rollout.n)


def make_advantage(cfg: DictConfig) -> GroupAdvantage:
    """GRPO group advantages (``algorithm.*``)."""
    alg = cfg.algorithm
    return GroupAdvantage(norm_adv_by_std_in_grpo=alg.norm_adv_by_std_in_grpo, gamma=alg.gamma, lam=alg.lam,
                          chunk_len=cfg.embodied.action_chunks_len, action_dim=cfg.embodied.action_token_len)


def make_sampler(cfg: DictConfig, info: DistInfo) -> EmbodiedSampler:
    """The accuracy / truncation filter with refill, for this rank's share of ``data.train_batch_size`` groups."""
    s = cfg.algorithm.embodied_sampling
    return EmbodiedSampler(
        cfg.data.train_batch_size // info.world_size, filter_accuracy=s.filter_accuracy,
        accuracy_lower_bound=s.accuracy_lower_bound, accuracy_upper_bound=s.accuracy_upper_bound,
        filter_truncated=s.filter_truncated, max_steps=resolve_max_steps(cfg.env.max_steps, cfg.env.env_name),
        oversample_factor=s.oversample_factor, max_rounds=s.max_rollout_rounds,
    )


def make_loss(cfg: DictConfig, policy: OpenVLAOFTPolicy) -> SRPOLoss:
    """The clipped token-level loss (``actor.clip_ratio_*``, ``entropy_coeff``, ``loss_agg_mode``)."""
    a = cfg.actor
    return SRPOLoss(policy, clip_epsilon=(a.clip_ratio_low, a.clip_ratio_high), clip_ratio_c=a.clip_ratio_c,
                    entropy_coeff=a.entropy_coeff, aggregation=a.loss_agg_mode)


def host_optimizer(cfg: DictConfig) -> bool:
    """``actor.fsdp.optimizer_offload`` alone: :class:`HostAdamW` (with ``param_offload`` / ``grad_offload``
    FSDP2's CPU offload already keeps the whole optimizer on the host)."""
    fsdp = cfg.actor.fsdp
    return bool(fsdp.optimizer_offload and not (fsdp.param_offload or fsdp.grad_offload))


# what a LIBERO process grows by after its build (its first renders, task changes): up to 0.5 GiB on a 16-core
# H100 machine, from 2.0 to 2.5 GiB (docs/gpu_recipe_offload_h100_12envs.json's run, mem.log)
ENV_PROCESS_GROWTH_BYTES = 2**29


def host_reserve_bytes(cfg: DictConfig, image_size: int) -> int:
    """Host memory the job takes after start-up on this host, beside the offloaded optimizer states: for each of its
    processes (torchrun's ``LOCAL_WORLD_SIZE``), its env processes' growth and two copies of its share of a
    training batch's policy images (uint8 ``image_size``², every trajectory padded to ``env.max_steps``): at the end
    of a round its trajectories are alive twice, as recorded and stacked, then stacked and in the sampler's copy of
    the groups it keeps (the update copies one mini-batch at a time)."""
    ranks_here, world_size = (int(os.environ.get(name, "1")) for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"))
    max_steps = resolve_max_steps(cfg.env.max_steps, cfg.env.env_name)
    chunks = math.ceil(max_steps / cfg.embodied.action_chunks_len)
    groups_here = cfg.data.train_batch_size * ranks_here // world_size
    images = groups_here * cfg.rollout.n * chunks * 3 * image_size**2 * cfg.embodied.num_images_in_input
    return ranks_here * cfg.env.num_envs * ENV_PROCESS_GROWTH_BYTES + 2 * images


def checkpoint_run_config(cfg: DictConfig) -> dict:
    """The settings a checkpoint must share with the run that resumes it (:class:`~srpo_rl.checkpoint.
    CheckpointManager`'s ``run_config``): what its weights and optimizer state are, and its groups' size."""
    return {"actor.lora_rank": cfg.actor.lora_rank, "actor.lora_alpha": float(cfg.actor.lora_alpha),
            "optimizer": "HostAdamW" if host_optimizer(cfg) else "AdamW",
            "actor.fsdp.optimizer_state_dtype": cfg.actor.fsdp.optimizer_state_dtype, "rollout.n": cfg.rollout.n,
            # the prompt stream's order and position, and the carried groups, are the saved run's
            "seed": cfg.seed, "data.train_batch_size": cfg.data.train_batch_size}


def make_optimizer(cfg: DictConfig, policy: OpenVLAOFTPolicy) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters: on the host (:class:`~srpo_rl.optim.HostAdamW`) with
    ``actor.fsdp.optimizer_offload``, else torch's (fused on GPUs)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if host_optimizer(cfg):
        optimizer = HostAdamW(params, lr=cfg.actor.lr, weight_decay=cfg.actor.weight_decay,
                              state_dtype=DTYPES[cfg.actor.fsdp.optimizer_state_dtype])
        # its host memory (84 GiB for the 7B, 56 with bf16 moments) taken now, beside the built envs and with room
        # for what grows later: a host too small fails at start-up, not at the first host step (on an 80 GB H100 with a 128 GB host, 16
        # envs passed a check without that room, then were killed there with 67 MiB of host memory left)
        optimizer.init_state(reserve_bytes=host_reserve_bytes(cfg, policy.model.config.dino.image_size))
        return optimizer
    # on a GPU the fused kernel updates in place: the default multi-tensor path allocates temporaries as large
    # as the optimizer state (+30 GB for the 7B), which is what runs one 141 GB GPU out of memory
    fused = all(p.device.type == "cuda" for p in params)
    if fused:  # fail now, naming the plans that fit, rather than after the first rollout
        device = params[0].device
        capacity = torch.cuda.get_device_properties(device).total_memory
        capacity = int(capacity * torch.cuda.get_per_process_memory_fraction(device))
        check_gpu_update_fits(params, capacity_bytes=capacity, allocated_bytes=torch.cuda.memory_allocated(device))
    return torch.optim.AdamW(params, lr=cfg.actor.lr, weight_decay=cfg.actor.weight_decay, fused=fused or None)


def make_logger(cfg: DictConfig, wandb_run_id: str | None = None, resume_step: int | None = None) -> MetricLogger:
    """The ``trainer.logger`` backends (console, TensorBoard, wandb), writing under ``output_dir``; with
    ``wandb_run_id``, wandb continues that run; with ``resume_step``, TensorBoard drops what was logged from it on."""
    return MetricLogger(cfg.trainer.logger, log_dir=cfg.output_dir, experiment_name=cfg.trainer.experiment_name,
                        project_name=cfg.trainer.project_name, config=OmegaConf.to_container(cfg, resolve=False),
                        wandb_run_id=wandb_run_id, resume_step=resume_step)


def rollout_metrics(collected: list[tuple[TensorDictBase, RolloutStats]], sampler: EmbodiedSampler,
                    rounds: int) -> dict[str, float]:
    """Success rate, episode length, throughput and time split of this step's rollout rounds over every rank (none:
    the step trains on carried groups). A collective: every rank calls it, also one that rolled out nothing."""
    # groups_requested and steps_skipped are EmbodiedSampler.sample's counters; the script runs its own refill
    # loop (the ranks agree on each round) and logs rollout/trajectories and train/skipped instead
    sampling = {f"sampling/{k}": float(v) for k, v in sampler.stats().items()
                if k not in ("groups_requested", "steps_skipped")}
    metrics = {"rollout/rounds": float(rounds), "rollout/trajectories": 0.0}
    if collected:
        metrics.update(_rollout_figures(collected))
    summed = ["rollout/trajectories", "rollout/env_steps_per_s", "rollout/policy_calls", "rollout/restarts", *sampling]
    return combine_metrics({**metrics, **sampling}, metrics["rollout/trajectories"], summed=summed)


def _rollout_figures(collected: list[tuple[TensorDictBase, RolloutStats]]) -> dict[str, float]:
    """This rank's figures of its rollout rounds (``collected``: ``(trajectories, stats)`` pairs)."""
    success = torch.cat([t["success"] for t, _ in collected]).float()
    lengths = torch.cat([t["num_steps"] for t, _ in collected]).float()
    totals = {"env_steps": 0.0, "decisions": 0.0, "policy_calls": 0.0, "time_wall": 0.0, "time_env": 0.0,
              "time_policy": 0.0, "time_reset": 0.0, "time_policy_gpu": 0.0, "restarts": 0.0}
    for _, stats in collected:
        for key, value in stats.as_dict().items():
            if key in totals:
                totals[key] += value
    return {
        "rollout/success_rate": success.mean().item(),
        "rollout/episode_length": lengths.mean().item(),
        "rollout/trajectories": float(len(success)),
        "rollout/env_steps_per_s": totals["env_steps"] / max(totals["time_wall"], 1e-9),
        # rows a policy call: the pool batches the slots whose chunk came back, so a small mean says the
        # simulation, not the policy, was the slower side
        "rollout/policy_calls": totals["policy_calls"],
        "rollout/mean_batch": totals["decisions"] / max(totals["policy_calls"], 1.0),
        "time/rollout_env": totals["time_env"],
        "time/rollout_policy": totals["time_policy"],
        "time/rollout_reset": totals["time_reset"],
        # the forwards' GPU time over the rollout's: how much of the GPU the rollout leaves idle
        "rollout/policy_gpu_share": totals["time_policy_gpu"] / max(totals["time_wall"], 1e-9),
        "rollout/restarts": totals["restarts"],  # rollouts that started over after their env crashed
    }


def batch_metrics(batch: TensorDictBase) -> dict[str, float]:
    """Shaped-reward and advantage statistics of the training batch of every rank (after the reward and the
    advantage; a collective)."""
    batch = torch.cat(gather_objects(batch.select("reward", "advantage", "success", "progress").cpu()))
    reward, advantage = batch["reward"].float(), batch["advantage"].float()
    failed = ~batch["success"].bool().reshape(-1)
    progress = batch["progress"].float().reshape(-1)[failed]
    metrics = {
        "train/reward_mean": reward.mean().item(),
        "train/reward_std": reward.std(correction=0).item(),
        "train/advantage_mean": advantage.mean().item(),
        "train/advantage_abs_mean": advantage.abs().mean().item(),
        "train/advantage_max": advantage.max().item(),
        "train/advantage_min": advantage.min().item(),
    }
    if progress.numel():  # the world-model score of the failures: how close they came to the successes
        metrics.update({"train/failure_progress_mean": progress.mean().item(),
                        "train/failure_progress_max": progress.max().item()})
    return metrics


def update_metrics(losses: dict[str, float], recomputed: int) -> dict[str, float]:
    """The update's losses and diagnostics (``update_policy``'s) over every rank, weighted by each rank's samples
    (a collective)."""
    metrics = {f"train/{k}": v for k, v in losses.items()}
    metrics["train/recomputed_log_prob_steps"] = float(recomputed)
    return combine_metrics(metrics, losses["samples"], summed=["train/samples", "train/recomputed_log_prob_steps"])


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak GPU memory since the last call (GiB); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    peak = {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def log_evaluation(logger: MetricLogger, result: EvalResult, *, step: int, out_dir: str, prefix: str = "val") -> None:
    """Prints the per-task table, writes it as JSON, logs the rates and the recorded videos."""
    logger.log(result.metrics(prefix), step)
    if not logger.enabled:
        return
    print(result.table(), flush=True)
    report = result.write(Path(out_dir) / f"{prefix}_step{step}.json")
    for rollout_id, frames in result.videos.items():
        path = logger.log_video(f"{prefix}/episode_{rollout_id}", frames, step)
        print(f"video: {path}", flush=True)
    print(f"{prefix} report: {report}", flush=True)
