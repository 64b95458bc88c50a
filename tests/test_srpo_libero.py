"""examples/srpo_libero.py, the SRPO recipe end to end on real LIBERO (tiny model, CPU): its default config is
the reference recipe, the script reads siiRL's option names and fails on a bad config before any work, and it
trains, evaluates (``mode=eval``), survives a SIGKILL and resumes (two processes through torchrun), trains on the
world-model reward, offloads the optimizer to the host and, on a GPU, rolls out a LoRA actor through CUDA graphs."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srpo_rl.distributed import DTYPES, init_distributed
from srpo_rl.envs import LiberoVecEnv
from test_utils_srpo import _compose

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "srpo_libero.py"

# The recipe, written out from siiRL's embodied SRPO script (its exported variables and command-line overrides)
# and, for the knobs the script leaves to its trainer yaml, from the reference's algorithm notes.
RECIPE = {
    "data.train_batch_size": 64, "data.val_batch_size": 496, "data.max_prompt_length": 256,
    "algorithm.workflow_type": "embodied", "algorithm.adv_estimator": "grpo", "algorithm.gamma": 1.0,
    "algorithm.lam": 1.0, "algorithm.norm_adv_by_std_in_grpo": True, "algorithm.reward_coef": 5.0,
    "algorithm.embodied_sampling.filter_accuracy": True, "algorithm.embodied_sampling.accuracy_lower_bound": 0.1,
    "algorithm.embodied_sampling.accuracy_upper_bound": 0.9, "algorithm.embodied_sampling.filter_truncated": False,
    "algorithm.embodied_sampling.oversample_factor": 1,
    "actor.lr": 5e-6, "actor.weight_decay": 0.0, "actor.ppo_mini_batch_size": 4, "actor.ppo_micro_batch_size": 1,
    "actor.traj_mini_batch_size": 16, "actor.ppo_epochs": 1, "actor.grad_clip": 1.0, "actor.clip_ratio_low": 0.2,
    "actor.clip_ratio_high": 0.28, "actor.clip_ratio_c": 10000.0, "actor.entropy_coeff": 0.0, "actor.shuffle": True,
    "actor.enable_gradient_checkpointing": True, "actor.fsdp.param_offload": False, "actor.fsdp.grad_offload": False,
    "actor.fsdp.optimizer_offload": False,
    "rollout.n": 8, "rollout.temperature": 1.6, "rollout.do_sample": True,
    "embodied.action_token_len": 7, "embodied.action_chunks_len": 8, "embodied.embedding_img_size": 384,
    "embodied.embedding_num_frames": 64, "embodied.embedding_enable_fp16": True,
    "embodied.embedding_model_offload": False, "embodied.center_crop": True, "embodied.num_images_in_input": 1,
    "env.env_type": "libero", "env.num_envs": 16, "env.max_steps": 512, "env.num_steps_wait": 10,
    "env.num_trials_per_task": 50, "env.model_family": "openvla",
    "trainer.total_epochs": 1000, "trainer.save_freq": 5, "trainer.test_freq": 5, "trainer.max_ckpt_keep": 5,
    "trainer.logger": ["console", "tensorboard"], "trainer.nnodes": 1, "trainer.resume_mode": "auto",
    "trainer.val_before_train": True,
}


@pytest.mark.parametrize("suite", ["libero_spatial", "libero_object", "libero_goal", "libero_long", "libero_90"])
def test_the_default_config_is_the_recipe(suite):
    from omegaconf import OmegaConf

    cfg = _compose([f"env={suite}"])
    differing = {k: (OmegaConf.select(cfg, k), v) for k, v in RECIPE.items() if OmegaConf.select(cfg, k) != v}
    assert not differing, differing
    assert cfg.env.env_name == suite and cfg.embodied.unnorm_key == {"libero_long": "libero_10"}.get(suite, suite)


def test_the_script_reads_siirl_option_names():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cfg", "job", "actor_rollout_ref.actor.optim.lr=3e-5",
         "actor_rollout_ref.embodied.env.env_name=libero_spatial", "critic.use_critic_model=False"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "lr: 3.0e-05" in result.stdout and "env_name: libero_spatial" in result.stdout


def test_script_fails_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config-name", "tiny", f"output_dir={tmp_path}", "actor.clip_ratio_low=0.2",
         "algorithm.embodied_sampling.accuracy_lower_bound=0.95"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 2
    assert "accuracy_lower_bound 0.95 > accuracy_upper_bound 0.9" in result.stderr
    assert "Traceback" not in result.stderr  # the message alone
    assert not (tmp_path / "data").exists()  # no manifest, no model, no env was built


def _run(out, steps, *overrides, stop_after=None, processes=1):
    """Runs the tiny recipe (``processes`` > 1: through torchrun, gloo on the CPU); with ``stop_after`` SIGKILLs the
    whole process group once that checkpoint exists."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        overrides += (f"trainer.n_gpus_per_node={processes}", "env.num_envs=1")  # one LIBERO worker a rank
    cmd = [*launcher, str(SCRIPT), "--config-name", "tiny", f"output_dir={out}",
           f"trainer.total_training_steps={steps}", "trainer.test_freq=0", "env.max_steps=16", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if stop_after and f"saved checkpoint {out}/checkpoints/global_step_{stop_after}" in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the trainers and their env workers, as a node failure would
            break
    proc.wait(timeout=600)
    return proc.returncode, "".join(lines)


def _load_dcp(checkpoint: Path, part: str) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / part, checkpoint / f"{part}.pt")
    return torch.load(checkpoint / f"{part}.pt", weights_only=False)


def _optimizer_steps(checkpoint: Path) -> set[int]:
    return {int(s["step"]) for s in _load_dcp(checkpoint, "optim")["state"].values()}


def _logged(log_dir: Path, tag: str) -> dict[int, float]:
    """``tag``'s value at each step, over every TensorBoard file of the run (a resumed run writes another)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def test_eval_mode_rolls_out_the_chosen_tasks_of_a_checkpoint(tmp_path):
    code, log = _run(tmp_path / "eval", 1, "mode=eval", "eval.task_ids=[1,4]", "eval.num_trials_per_task=1")
    assert code == 0, log[-3000:]
    report = json.loads((tmp_path / "eval" / "eval_step0.json").read_text())
    assert [(t["suite"], t["task_id"], t["trials"]) for t in report["tasks"]] == [
        ("libero_object", 1, 1), ("libero_object", 4, 1)], report
    assert not (tmp_path / "eval" / "data").exists()  # no training manifests for an evaluation


@pytest.mark.slow
def test_a_run_that_fails_mid_way_flushes_its_logs_and_stops_its_env_workers(tmp_path):
    # In this process, as a notebook or a sweep would call it (a script's exit would flush and reap anyway).
    # The first checkpoint cannot be written, its folder would sit under a file: the run fails after step 1.
    from srpo_rl.examples.srpo_libero import run

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    cfg = _compose([f"output_dir={tmp_path / 'run'}", "trainer.total_training_steps=2", "env.max_steps=16",
                    f"trainer.default_local_dir={blocker}/checkpoints"], name="tiny")
    before = set(multiprocessing.active_children())
    with pytest.raises(NotADirectoryError):
        run(cfg, init_distributed("cpu"))
    # step 1's metrics are in TensorBoard, and the env's worker processes are gone
    assert _logged(tmp_path / "run" / "tensorboard", "train/optimizer_steps") == {1: 2.0}
    assert set(multiprocessing.active_children()) <= before


class _EvenRolloutsSucceed(LiberoVecEnv):
    """LIBERO whose even rollout ids are moved into their goal before their second chunk (success at step 9)."""

    def _move_due_slots(self, tensordict) -> None:
        stepped = tensordict.get("_step", torch.ones(self.num_envs, dtype=torch.bool)).reshape(-1)
        due = [s for s in stepped.nonzero().flatten().tolist()
               if int(self._slots["rollout_id"][s]) % 2 == 0 and int(self._slots["step_count"][s]) == 8]
        if due:
            self.teleport_to_goal(due)

    def _step(self, tensordict):
        self._move_due_slots(tensordict)
        return super()._step(tensordict)

    def step_send(self, tensordict):
        self._move_due_slots(tensordict)
        return super().step_send(tensordict)


def _published_weights(path: Path) -> dict[str, torch.Tensor]:
    from srpo_rl.models.openvla_oft_files import iter_tensors, read_weight_map

    return dict(iter_tensors(path, read_weight_map(path)))


@pytest.mark.slow
def test_a_step_with_successes_trains_on_the_world_model_reward(tmp_path, monkeypatch):
    # A random policy succeeds nowhere, so the main job's advantages are all 0. Here one rollout of each group
    # succeeds (through the simulator state), so the whole chain runs on real values: the accuracy filter keeps
    # the groups, V-JEPA scores the failures against the successes, and the update moves the weights.
    from srpo_rl.examples import utils_srpo
    from srpo_rl.examples.srpo_libero import run

    monkeypatch.setattr(utils_srpo, "make_libero_env", lambda suite, num_envs, **kw: _EvenRolloutsSucceed(
        suite, num_envs, **kw))
    out = tmp_path / "run"
    cfg = _compose([f"output_dir={out}", "trainer.total_training_steps=1", "trainer.test_freq=0", "env.max_steps=16",
                    "algorithm.embodied_sampling.filter_accuracy=true"], name="tiny")
    run(cfg, init_distributed("cpu"))

    def logged(tag):
        return _logged(out / "tensorboard", tag)[1]

    assert logged("rollout/success_rate") == 0.5
    # Each task's failures are scored 0.6 * sigmoid(10 * (0.5 - d_hat)) with d_hat min-max scaled over them: one
    # failure gets sigmoid(0), two get sigmoid(5) and sigmoid(-5). Either way their mean is 0.6 / 2.
    assert logged("train/failure_progress_mean") == pytest.approx(0.3)
    assert logged("train/reward_mean") == pytest.approx((5.0 + 5.0 * 0.3) / 2)
    # GRPO over a group of two different rewards: (r - mean) / unbiased std = +-(1/2) / (1/sqrt 2) = +-1/sqrt 2
    assert logged("train/advantage_max") == pytest.approx(2**-0.5, abs=1e-5)
    assert logged("train/advantage_min") == pytest.approx(-(2**-0.5), abs=1e-5)
    # weight decay is 0: with all-zero advantages AdamW's step would be exactly 0
    before, after = (_published_weights(path) for path in (out / "tiny_openvla_oft",
                                                            out / "checkpoints" / "global_step_1" / "huggingface"))
    assert before.keys() == after.keys()
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert "language_model.lm_head.weight" in moved and len(moved) > len(before) // 2, moved


@pytest.mark.slow
def test_killed_two_process_run_resumes_where_it_stopped(tmp_path):
    # Two trainers through torchrun (gloo, FSDP2 over 2 ranks), as one node with two GPUs would run them
    out = tmp_path / "run"
    # twice the groups a step needs in the first round: the surplus is carried into the next steps
    code, log = _run(out, 3, "algorithm.embodied_sampling.oversample_factor=2", stop_after=2, processes=2)
    assert code == -signal.SIGKILL, log[-3000:]
    # step 1 rolled out 4 groups (2 a rank) and trained on 2; step 2 trained on the other 2 with no rollout round on
    # either rank
    assert "rollout/rounds=1 " in log.split("[step 2]")[0] and "rollout/rounds=0 " in log.split("[step 2]", 1)[1]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["global_step_1", "global_step_2"]
    # tiny preset: 2 groups x 2 rollouts, mini-batches of 1 group (1 trajectory a rank) -> 2 optimizer steps a step
    assert _optimizer_steps(checkpoints / "global_step_2") == {4}

    # resumed with V-JEPA beside the rollout and another learning rate (the run's, not the checkpoint's)
    code, log = _run(out, 3, "embodied.embed_during_rollout=true", "actor.lr=2e-5", processes=2)
    assert code == 0, log[-3000:]
    assert _logged(out / "tensorboard", "train/lr") == pytest.approx({1: 5e-6, 2: 5e-6, 3: 2e-5})
    assert f"resumed from {checkpoints}/global_step_2 at step 2" in log
    assert "[step 3]" in log and "[step 1]" not in log and "[step 2]" not in log
    positions = set()
    for rank in (0, 1):  # each rank's prompt stream, sampler and step
        state = torch.load(checkpoints / "global_step_3" / f"trainer_rank{rank}.pt", weights_only=False)
        assert state["step"] == 3 and state["prompts"]["position"] > 0
        positions.add(state["prompts"]["position"])
        # the update's shuffling goes on from where it was: the generator's state, not a fresh seed
        assert not torch.equal(state["generator"], torch.Generator().manual_seed(rank).get_state())
    assert len(positions) == 1  # both ranks read the same prompts and take their own share of them
    assert _optimizer_steps(checkpoints / "global_step_3") == {6}  # optimizer state continued, not restarted
    assert sorted(_logged(out / "tensorboard", "train/optimizer_steps")) == [1, 2, 3]
    # step 2 trained on step 1's surplus after giving it the current policy's log-probs; step 1's batch was all
    # fresh, and so was step 3's (the surplus was used up at step 2)
    recomputed = _logged(out / "tensorboard", "train/recomputed_log_prob_steps")
    # summed over the ranks: 2 x (1 group x 2 rollouts x 16 steps / 8-step chunks)
    assert recomputed == {1: 0, 2: 8, 3: 0}, recomputed
    assert _logged(out / "tensorboard", "rollout/rounds") == {1: 1, 2: 0, 3: 1}
    assert (checkpoints / "global_step_3" / "huggingface" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_optimizer_offload_keeps_bf16_weights_and_fp32_master_on_the_host(tmp_path, moments):
    # a random policy fails everywhere, so every advantage is 0: the weight decay is what moves the weights
    out = tmp_path / "run"
    offload = ["actor.fsdp.optimizer_offload=true", "actor.fsdp.mixed_precision=bf16", "actor.lr=0.01",
               "actor.weight_decay=0.5", f"actor.fsdp.optimizer_state_dtype={moments}"]
    # the host state's resume once (bf16 moments, the state most unlike the weights); fp32 runs its 2 steps at once
    # (tests/test_optim.py resumes HostAdamW's FSDP2 shards with fp32 moments)
    if moments == "bf16":
        code, log = _run(out, 1, *offload)
        assert code == 0, log[-3000:]
    code, log = _run(out, 2, *offload)
    assert code == 0, log[-3000:]
    assert (f"resumed from {out}/checkpoints/global_step_1 at step 1" in log) == (moments == "bf16")
    assert (f"no complete checkpoint in {out}/checkpoints: starting at step 0" in log) == (moments == "fp32")
    if moments == "fp32":  # siiRL's resume_path: a chosen checkpoint, continued into another folder
        branch = tmp_path / "branch"
        code, log = _run(out, 2, *offload, "trainer.resume_mode=resume_path",
                         f"trainer.resume_from_path={out}/checkpoints/global_step_1",
                         f"trainer.default_local_dir={branch}")
        assert code == 0, log[-3000:]
        assert f"resumed from {out}/checkpoints/global_step_1 at step 1" in log
        assert [p.name for p in branch.iterdir()] == ["global_step_2"]
    checkpoint = out / "checkpoints" / "global_step_2"
    weights = _load_dcp(checkpoint, "model")
    optim = _load_dcp(checkpoint, "optim")["state"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    assert {int(s["step"]) for s in optim.values()} == {4}  # 2 per training step, continued after the resume
    decayed = 0
    for name, state in optim.items():
        assert state["master"].dtype == torch.float32
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == DTYPES[moments]
        assert torch.equal(state["master"].to(torch.bfloat16), weights[name]), name
        decayed += not torch.equal(state["master"], state["master"].to(torch.bfloat16).float())
    assert decayed > len(optim) // 2  # the masters moved off the bf16 grid: the update ran in fp32
    assert (checkpoint / "huggingface" / "config.json").exists()  # the policy in its published format


@pytest.mark.gpu
def test_one_gpu_lora_actor_is_the_plain_module_and_rolls_out_through_cuda_graphs(tmp_path):
    # FSDP2 over one rank would shard nothing here, and its forward is never captured in a CUDA graph
    from torch.distributed.fsdp import FSDPModule

    from srpo_rl.distributed import DistInfo
    from srpo_rl.examples.utils_srpo import make_policy
    from srpo_rl.lora import lora_parameters

    cfg = _compose([f"model.path={tmp_path / 'policy'}", f"model.vjepa_path={tmp_path / 'vjepa'}", "device=cuda",
                    "actor.lora_rank=4"], name="tiny")
    policy = make_policy(cfg, DistInfo(0, 1, 0, torch.device("cuda", 0)))
    assert not any(isinstance(m, FSDPModule) for m in policy.model.modules())
    assert lora_parameters(policy.model) and all(p.is_cuda for p in policy.model.parameters())
    with torch.no_grad():
        assert policy._graphed_forward() is not None

    code, log = _run(tmp_path / "run", 1, "device=cuda", "actor.lora_rank=4", f"model.path={tmp_path / 'policy'}",
                     f"model.vjepa_path={tmp_path / 'vjepa'}")
    assert code == 0, log[-3000:]
    assert "[step 1]" in log and (tmp_path / "run" / "checkpoints" / "global_step_1" / "huggingface").exists()
