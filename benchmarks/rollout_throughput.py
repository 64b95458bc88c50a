"""Rollout env-steps/s of the slot scheduler against siiRL's lockstep loop and the two ceilings, same run.

One workload for every mode: ``--requests-per-env x num_envs`` rollouts in groups of ``--group-size``
(group ``i`` = task ``i % 10``, init state ``i``) with SFT-like episode lengths: a random-weight policy
never succeeds, so half the rollouts are moved into their goal (``teleport_to_goal``) before the chunk
that reaches a step drawn in ``[150, 400]`` and succeed there; the others run to 512 steps. Every mode
executes the same env steps, so its env-steps/s compare directly.

- ``lockstep``: the loop of siiRL: a batch of ``num_envs`` rollouts, every simulation rebuilt for its
  task (a new LIBERO env per reset), then all 64 chunk-steps with the policy queried for every env and
  the finished envs masked (not stepped, still queried); then the next batch.
- ``sync``: ``collect_rollouts(overlap=False)``: the policy decides for the running slots, they step,
  finished slots take the next request at once (same task first: soft reset).
- ``halves``: ``collect_rollouts(overlap="halves")``: two fixed halves in ping-pong, the policy runs on
  one half while the other simulates; each half's round waits for its slowest slot.
- ``pool``: ``collect_rollouts(overlap=True)`` with the library's defaults: an asynchronous pool, the
  policy decides for the slots whose chunk came back (in one batch) while the others simulate; no slot
  waits for another. The JPEG round trip runs in the simulation workers (``rollout.jpeg_in_workers``:
  ``LiberoVecEnv(jpeg_quality=95)`` + ``OpenVLAOFTPolicy(jpeg_quality=None)``), the policy thread launches
  each batch right behind the decision in flight and waits for the GPU asleep. Each variant below changes one
  thing, on the built env (no rebuild):
- ``pool_eager``: without the policy's CUDA graphs (every forward launches its kernels one by one); every
  other mode runs the forward through the graphs, captured for every batch size up to ``num_envs`` before
  the first timed mode (``graph_capture_s``).
- ``pool_policy_jpeg``: the JPEG round trip in the policy's process, whose threads share one GIL with the
  loop (``benchmarks/gil_contention.py``).
- ``pool_one_phase``: the policy called whole (preprocess, forward, sampling, decoding, copy to the host)
  instead of in two halves (``OpenVLAOFTPolicy.launch`` / ``finish``): the next batch's forward is launched
  only once the last decision is done, not right behind it.
- ``pool_switch1ms``: the interpreter's thread switch interval at 1 ms instead of Python's 5
  (``sys.setswitchinterval``): a thread that waits for the GIL gets it sooner.
- ``pool_margin5ms``: the policy thread launches the next batch 5 ms before the decision in flight is due (by
  its estimate of the launch's CPU time) instead of 1 ms: a launch that waits for the GIL (the loop holds it
  up to the 5 ms switch interval) is then still queued behind the decision in flight, at the price of a
  batch closed a little earlier.
- ``pool_padded``: the policy's CUDA graphs in the library's earlier buckets (1..8, even sizes to 16, multiples
  of 4 to 32: 9 rows padded to 10, 11 to 12, 17 to 20, ...; a padded row costs a real row's GPU time) instead of
  every size to 16 and every even size to 32, captured before the timed run as the default ones are.
- ``pool_preprocess_outside``: the policy as it was before its CUDA graphs took the camera frames: the resize,
  crop and normalisation launched op by op from Python (each launch waiting for the GIL while the loop runs),
  then the graph of the model forward from the pixel values.
- ``pool_cpu_renderK`` (``--cpu-render-slots K``): ``pool`` on an env built anew (after the other modes, the
  first env closed) whose last ``K`` slots render on the CPU with Mesa's llvmpipe
  (``LiberoVecEnv(cpu_render_slots=K)``): their frames take no GPU time from the forward, at a core's time
  instead; with ``--beside`` also the batch-8 forward beside this env's simulation. ``renderers`` names what
  drew a GPU slot's and a CPU slot's frames, ``bare_sim`` is this env's own simulation ceiling (``vs_*``
  ratios stay against the run's ceilings).
- ``pool_lora``: the plain model with rank-``--lora-rank`` adapters on its linear layers (``srpo_rl.lora``, as
  ``actor.lora_rank``), through the CUDA graphs (captured again with the adapters before the timed run): the
  recipe's LoRA actor on one GPU (``examples/srpo_libero.py`` leaves it unsharded there).
- ``pool_lora_merged``: ``pool_lora``'s model inside :func:`srpo_rl.lora.merged_adapters` (the adapters folded
  into the weights for the rollout, as ``examples/srpo_libero.py`` rolls out), its graphs captured again inside it
  before the timed run; ``merge_s`` and ``restore_s`` are the block's entry and exit (the first entry allocates
  the pinned host buffers), ``remerge_s`` a second block's entry, as every later rollout pays it (the copy of the
  base weights to the host and the merge).
- ``pool_recipe``: the model FSDP2-sharded over a world of one with bf16 compute (``shard_actor``): fp32 master
  weights, or with ``--lora-rank R`` the bf16 base frozen under the rank-R adapters; gathered once for the
  rollout (``collect_rollouts`` does) and run without CUDA graphs (they do not capture an FSDP2 module). The
  recipe's one-GPU actor where FSDP2 has a job (fp32 master weights, offload); with ``--lora-rank`` what its
  LoRA actor was before it was left unsharded.
  The two run after every other mode of the env, in this order (they change the model in place), so
  ``--cpu-render-slots`` cannot come with them.
- ``pool_polling``: the loop waits 1 ms at a time on the simulations and looks at the decision in flight
  in between, instead of sleeping on both until one is ready (the policy thread signals a pipe).
- ceilings: ``bare_sim`` (the same number of LIBERO processes stepping random chunks, one 256x256
  frame per chunk, no policy, each process on its own: its next chunk goes out as soon as its last one is
  back; ``--ceiling-s`` seconds after an untimed chunk each) and ``bare_policy`` (the model forward alone from pixel values, the fastest at batch ``num_envs``,
  ``num_envs / 2`` and ``num_envs / 4``, in
  env-steps/s = batch x 8 / time, the faster of eager and CUDA graph, on an idle machine);
  ``min_ceiling`` is the smaller. ``bare_policy_pipelined``: the policy's whole sampling decisions (``launch`` /
  ``finish``, the frames' preprocessing in the graph, the sampling, the copies to the host) at the same batch
  sizes, each launched before the one in flight is finished, for ``--sustain-s`` seconds with nothing beside:
  the pool's GPU work per decision; ``bare_decisions`` the fastest, ``vs_bare_decisions`` a mode's ratio to
  it. ``bare_policy_sustained``: the batch-8 forward back to back for
  ``--sustain-s`` seconds (first and last quarter's ms a call: a GPU that slows down under load shows it),
  ``min_sustained_ceiling`` the smaller of it and ``bare_sim``.
- ``embed``: the fastest scheduler mode of the run with ``on_finished`` handing each finished trajectory
  to :class:`srpo_rl.rewards.BackgroundEmbedder`, which embeds its video (V-JEPA 2) on a side CUDA stream
  while the rollout goes on: the reward's embedding cost moved into the GPU's idle time (``extra_wall_s``
  against the same mode without it; the reward row is the batch embedded after the rollout). As in the
  recipe, a group is embedded once its rollouts are done and only if the sampler keeps it (success rate in
  [0.1, 0.9]; with this workload's coin-flip successes nearly every group passes), and the policy's
  stream has a higher priority than the embedder's (:data:`srpo_rl.rollout.POLICY_STREAM_PRIORITY`).
  ``embed_flat``: the same with the policy's stream at the default priority, the embedder's equal.
- ``steady``: each scheduler mode's env-steps/s until the last episode start (no request left after
  it), i.e. without the batch's tail, which shrinks as requests per env grow (512 rollouts per
  iteration on 16 envs in the recipe: 32 per env).
- utilisation: ``gpu_busy`` = policy time / wall time (time in policy calls, waits for the GPU included:
  the pool runs them on its policy thread; with ``launch`` / ``finish`` the thread's sleep until the next
  launch is not in it, so this is no measure of the GPU there: ``forward_gpu_share`` is), ``busy_sims`` = worker time (steps + resets) / wall time, the mean number of
  simulations at work, and
  ``mean_batch`` = decisions / policy calls; ``loop_cpu_s`` / ``policy_cpu_s``: the CPU time of the loop
  thread and of the policy thread (``RolloutStats.loop_cpu_time`` / ``policy_cpu_time``);
  ``forward_gpu_s``: the GPU span of every forward from CUDA events, the frames' resize and crop included
  (``forward_gpu_ms_by_batch``: its median by batch size), ``forward_gpu_share`` their sum / wall time,
  ``gpu_between_s`` / ``gpu_between_median_ms`` the GPU time from the end of one forward to the start of the
  next. (Runs before the graphs took the frames timed the logits forward alone, the resize and crop falling
  between forwards.)
- ``bare_policy_beside``: the batch-8 forward back to back (as ``bare_policy_sustained``) while every env
  process steps random chunks (``sim``: physics and one frame a chunk, EGL on the same GPU) or only renders
  frames (``render``): what the simulation beside it costs the forward.
- split: simulation CPU time inside the workers (physics, and rendering from the measured time of one
  frame), policy preprocessing (JPEG + resize + crop) and forward on the main thread, and the SRPO
  reward (V-JEPA 2 embedding + scores) of the embed run's trajectories, after the rollout.

    python benchmarks/rollout_throughput.py --num-envs 16       # 7B random weights bf16 + ViT-g, CUDA
    python benchmarks/rollout_throughput.py --tiny              # tiny models on the CPU, 2 envs

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from _common import command, machine, versions

import srpo_rl.cuda_graphs as cuda_graphs_module
from srpo_rl.cuda_graphs import GraphedActionLogits
import srpo_rl.rollout as rollout_module
from srpo_rl.envs import LiberoVecEnv, SimWorkers
from srpo_rl.envs.suites import configure_rendering, suite_info
from srpo_rl.jpeg import JPEG_QUALITY
from srpo_rl.objectives import EmbodiedSampler
from srpo_rl.rewards import BackgroundEmbedder
from srpo_rl.rollout import RolloutRequest, collect_rollouts, group_requests, single_cpu_thread

CHUNK = 8
# mode -> collect_rollouts(overlap=...) and how it differs from the library's defaults: the policy's CUDA graphs
# off, the JPEG round trip in the policy's process, the interpreter's thread switch interval (ms; Python's
# default is 5), the policy called whole instead of launch / finish, the pool's wait (ms at a time on the simulations, then a look at the
# decision; None: asleep on both), how long before the decision in flight is due the policy thread launches the next
# batch (ms; None: the library's 1), the CUDA graphs' batch buckets (None: the library's),
# the frames' resize, crop and normalisation inside the forward's graph (the library's) or launched op by op before it
DEFAULTS = {"graphs": True, "env_jpeg": True, "switch_ms": None, "two_phase": True, "poll_ms": None, "margin_ms": None,
            "buckets": None, "graph_preprocessing": True}
LIBRARY_BUCKET = cuda_graphs_module.batch_bucket


def padded_bucket(batch: int) -> int:
    """The library's CUDA-graph buckets before every size to 16 had its own: 1..8, even sizes to 16, multiples of
    4 to 32, the library's beyond."""
    for limit, step in ((8, 1), (16, 2), (32, 4)):
        if batch <= limit:
            return -(-batch // step) * step
    return LIBRARY_BUCKET(batch)


# embedding mode -> the CUDA priority of the policy's stream during the rollout (the embedder's is 0)
EMBED_MODES = {"embed": rollout_module.POLICY_STREAM_PRIORITY, "embed_flat": 0}
SCHEDULER_MODES = {
    "sync": {"overlap": False},
    "halves": {"overlap": "halves"},
    "pool": {"overlap": True},
    "pool_eager": {"overlap": True, "graphs": False},
    "pool_policy_jpeg": {"overlap": True, "env_jpeg": False},
    "pool_one_phase": {"overlap": True, "two_phase": False},
    "pool_switch1ms": {"overlap": True, "switch_ms": 1.0},
    "pool_polling": {"overlap": True, "poll_ms": 1.0},
    "pool_margin5ms": {"overlap": True, "margin_ms": 5.0},
    "pool_padded": {"overlap": True, "buckets": padded_bucket},
    "pool_preprocess_outside": {"overlap": True, "graph_preprocessing": False},
}
# run after every other mode of an env, in this order: they change the policy's model for good
RECIPE_MODES = {"pool_lora": {"overlap": True}, "pool_lora_merged": {"overlap": True},
                "pool_recipe": {"overlap": True, "graphs": False}}
IMAGE_SIZE = 256  # the env's frames (LiberoVecEnv's default)



def log(message: str) -> None:
    """A progress line on stderr with the wall-clock time (to line it up with the machine's CPU log)."""
    print(f"{time.time():.1f} {message}", file=sys.stderr, flush=True)


def main_cpu_seconds() -> float:
    """CPU time of this process (the policy's), all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- workload ---------------------------------------------------------------------------------------
def workload(args, num_envs: int) -> tuple[list[RolloutRequest], dict[int, int]]:
    """The requests and, for the rollouts that succeed, the env step at which they are made to."""
    count = args.requests_per_env * num_envs
    groups = -(-count // args.group_size)
    prompts = [(i % 10, i % 50) for i in range(groups)]
    requests = group_requests(prompts, args.group_size)[:count]
    rng = np.random.default_rng(args.seed)
    succeed = rng.permutation(count) < round(args.success_fraction * count)
    steps = rng.integers(args.success_min, args.success_max + 1, count)
    return requests, {r.rollout_id: int(k) for r, s, k in zip(requests, succeed, steps) if s}


def due(step_count: int, success_step: int | None) -> bool:
    """Teleport before the chunk that reaches ``success_step``: success lands at its first sub-step."""
    return success_step is not None and step_count < success_step <= step_count + CHUNK


class ForcedSuccessEnv(LiberoVecEnv):
    """LiberoVecEnv whose chosen rollouts succeed at a given step (moved into the goal just before).

    It also counts ``rebuilds`` (resets that change a slot's task) and logs ``rounds``: ``(time, env
    steps executed)`` of every result it hands back, and ``starts``: the time of every episode start
    (reset) sent. After the last start no request is left, so slots go idle one by one: what comes
    before it is the steady state, the rest the batch's tail.
    """

    def __init__(self, *args, success_step: dict[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.success_step = success_step
        self.rounds: list[tuple[float, int]] = []
        self.starts: list[float] = []
        self.rebuilds = 0  # resets that changed a slot's task
        self.poll_s: float | None = None  # pool_polling: wait on the simulations this long at a time

    def _stepped(self, tensordict) -> list[int]:
        mask = tensordict.get("_step", torch.ones(self.num_envs, dtype=torch.bool)).reshape(-1)
        return mask.nonzero().flatten().tolist()

    def _teleport(self, slots: list[int]) -> None:
        due_slots = [
            s for s in slots
            if due(int(self._slots["step_count"][s]), self.success_step.get(int(self._slots["rollout_id"][s])))
        ]
        if due_slots:
            self.teleport_to_goal(due_slots)

    def _log_starts(self, tensordict) -> None:
        if tensordict is not None and "_reset" in tensordict.keys() and tensordict["_reset"].any():
            self.starts.append(time.perf_counter())
            slots = tensordict["_reset"].reshape(-1).nonzero().flatten().tolist()
            tasks = tensordict["task_id"].reshape(-1) if "task_id" in tensordict.keys() else None
            self.rebuilds += sum(tasks is not None and int(tasks[s]) != self.task_ids[s] for s in slots)

    def _log_result(self, out):
        if out is not None:
            self.rounds.append((time.perf_counter(), int(out["chunk_steps"].sum())))
        return out

    def _reset(self, tensordict=None, **kwargs):
        self._log_starts(tensordict)
        return super()._reset(tensordict, **kwargs)

    def _step(self, tensordict):
        self._teleport(self._stepped(tensordict))
        return self._log_result(super()._step(tensordict))

    def step_send(self, tensordict):
        self._teleport(self._stepped(tensordict))
        self._log_starts(tensordict)
        return super().step_send(tensordict)

    def reset_send(self, tensordict):
        self._log_starts(tensordict)
        return super().reset_send(tensordict)

    def step_recv(self):
        return self._log_result(super().step_recv())

    def step_recv_ready(self, timeout=None, wake=()):
        if self.poll_s is not None and wake:  # the pool's wait as it was: 1 ms on the env, then the decision
            timeout, wake = self.poll_s, ()
        return self._log_result(super().step_recv_ready(timeout, wake))


def steady_state(env: ForcedSuccessEnv, start: float) -> dict:
    """env-steps/s until the last episode start (no request left after it): the batch minus its tail."""
    cut = max(env.starts)
    steps = sum(n for t, n in env.rounds if t <= cut)
    if cut <= start or steps == 0:
        return {"steady_env_steps_per_s": None, "steady_fraction_of_steps": 0.0}
    return {"steady_env_steps_per_s": steps / (cut - start),
            "steady_fraction_of_steps": steps / max(1, sum(n for _, n in env.rounds))}


# -- models -----------------------------------------------------------------------------------------
def make_policy(args, device: torch.device):
    from srpo_rl.policy import OpenVLAOFTPolicy

    if args.tiny:
        from srpo_rl.models.openvla_oft import write_tiny_checkpoint

        path = tempfile.mkdtemp(prefix="tiny_openvla_oft_")
        write_tiny_checkpoint(path)
        return OpenVLAOFTPolicy.from_pretrained(path, unnorm_key=args.suite, dtype=torch.float32), "tiny (fp32)"
    from policy_latency import seven_b_policy

    from srpo_rl.models.llama_tokenizer import build_tiny_llama_tokenizer
    from srpo_rl.models.openvla_oft_files import preprocessor_config

    model = seven_b_policy(device).model  # decode with this suite's statistics (the builder uses libero_10's)
    policy = OpenVLAOFTPolicy(model, build_tiny_llama_tokenizer(), preprocessor_config(), unnorm_key=args.suite)
    return policy.to(device), "OpenVLA-OFT-7B (bf16, random)"


def with_lora(policy, lora_rank: int) -> None:
    """Puts rank-``lora_rank`` adapters on ``policy.model`` (once), as ``actor.lora_rank`` does."""
    from srpo_rl.lora import add_lora, lora_parameters

    if not lora_parameters(policy.model):
        add_lora(policy.model, lora_rank)


def merged_pool(env, policy, requests, mode: str, timer, forward_timer, names) -> tuple[dict, object]:
    """The scheduler's pool inside :func:`srpo_rl.lora.merged_adapters`, with the block's entry and exit timed."""
    from srpo_rl.lora import merged_adapters

    t0 = time.perf_counter()
    with merged_adapters(policy.model):
        merge_s = time.perf_counter() - t0
        with torch.no_grad():  # the graphs of the merged forward, before the timed run
            captured = capture_graphs(policy, names, env.num_envs)
        row, trajs = scheduler(env, policy, requests, mode, timer, forward_timer)
        t0 = time.perf_counter()
    restore_s = time.perf_counter() - t0
    # a later block, as every rollout after the first pays it: the host buffers exist; the copy and merge remain
    t0 = time.perf_counter()
    with merged_adapters(policy.model):
        remerge_s = time.perf_counter() - t0
    row.update(merge_s=merge_s, restore_s=restore_s, remerge_s=remerge_s, cuda_graphs=captured)
    return row, trajs


def shard_like_the_recipe(policy, device: torch.device, lora_rank: int) -> None:
    """Turns ``policy.model`` into the recipe's one-GPU actor (``pool_recipe``), in place: fp32 master weights,
    or the frozen base with rank-``lora_rank`` adapters, then FSDP2 over a process group of one with bf16 compute
    (fp32 on the CPU, as the tiny check runs)."""
    import torch.distributed as dist

    from srpo_rl.distributed import DistInfo, shard_actor

    if not dist.is_initialized():
        cuda = device.type == "cuda"  # NCCL wants the device with its index
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)
    if lora_rank:
        with_lora(policy, lora_rank)
    else:
        policy.model.float()
    shard_actor(policy.model, DistInfo(0, 1, 0, device), mixed_precision="bf16" if device.type == "cuda" else "fp32")


def make_reward(args, device: torch.device):
    from srpo_rl.models.vjepa2 import VideoEmbedder, load_vjepa2, write_tiny_vjepa2_checkpoint
    from srpo_rl.rewards import SRPOProgressReward

    if args.tiny:
        path = Path(tempfile.mkdtemp()) / "tiny.pt"
        write_tiny_vjepa2_checkpoint(path)
        embedder = VideoEmbedder(load_vjepa2(path, img_size=48), img_size=48, enable_fp16=False, device=device)
        return SRPOProgressReward(embedder), "tiny V-JEPA 2"
    from reward_throughput import vitg

    embedder = VideoEmbedder(vitg(device), img_size=384, num_frames=64, device=device, batch_size=8)
    return SRPOProgressReward(embedder), "V-JEPA 2 ViT-g/16 384px fp16 (random)"


class ForwardTimer:
    """GPU time of every forward (``policy._decision_inputs`` + ``policy._action_logits``: the frames'
    preprocessing and the logits), from CUDA events around it.

    The events are read at :meth:`pop` (after the work is done), so timing adds no wait to a policy
    call. A span starts when the GPU reaches it: behind the forward in flight, a launched batch's span is
    its own GPU time. ``decision_inputs`` is what the policy's ``_decision_inputs`` runs (a mode may swap it).
    """

    def __init__(self, policy, device: torch.device):
        self._cuda, self._events, self._start = device.type == "cuda", [], None
        self.decision_inputs, self._logits = policy._decision_inputs, policy._action_logits
        policy._decision_inputs, policy._action_logits = self._inputs, self._timed_logits

    def _inputs(self, tensordict):
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        return self.decision_inputs(tensordict)

    def _timed_logits(self, tensordict):
        out = self._logits(tensordict)
        if self._cuda and self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((tensordict.batch_size.numel(), self._start, end))
            self._start = None
        return out

    def pop(self) -> tuple[float | None, dict[int, float], dict[str, float]]:
        """GPU seconds of the forwards since the last call (None without CUDA), the median ms of a forward
        by batch size (the batch sizes of at least 10 calls), and the GPU time from the end of one forward to
        the start of the next (``between_s``: their sum, ``between_median_ms``), which is what the policy
        call does beside the logits (sampling, decoding, the next batch's preprocessing) plus the GPU's idle
        time."""
        if not self._cuda:
            return None, {}, {}
        torch.cuda.synchronize()
        by_batch: dict[int, list[float]] = {}
        for batch, a, b in self._events:
            by_batch.setdefault(batch, []).append(a.elapsed_time(b))
        between = [end.elapsed_time(start) for (_, _, end), (_, start, _) in zip(self._events, self._events[1:])]
        self._events.clear()
        seconds = sum(map(sum, by_batch.values())) / 1e3
        gaps = {"between_s": sum(between) / 1e3, "between_median_ms": statistics.median(between) if between else None}
        return seconds, {b: statistics.median(ms) for b, ms in sorted(by_batch.items()) if len(ms) >= 10}, gaps


class PreprocessTimer:
    """Times the policy's preprocessing inside every policy call (``_frames``: the JPEG round trip where the
    policy does it, the copy to the GPU; ``_policy_image``: the resize and crop where they are launched op by op):
    the CPU time it takes to queue it (on a GPU its kernels run later, in the forward's GPU span)."""

    def __init__(self, policy):
        self.seconds = 0.0
        for name in ("_frames", "_policy_image"):
            setattr(policy, name, self._timed(getattr(policy, name)))

    def _timed(self, inner):
        def timed(*args):
            t0 = time.perf_counter()
            out = inner(*args)  # no sync: the pool queues it behind the forward in flight
            self.seconds += time.perf_counter() - t0
            return out
        return timed


# -- modes ------------------------------------------------------------------------------------------
def bare_sim(workers: SimWorkers, args, tasks: list[int]) -> dict:
    """Every process steps random chunks (one frame each) on its own for ``--ceiling-s`` seconds, no policy.

    A process gets its next chunk as soon as its last one is back, so none waits for a slower one (a
    round-by-round loop would pace every process to the slowest of each round), and one untimed chunk each
    comes first (first-use costs). Counted: the env steps of the chunks back within the window, and of a
    chunk that straddles its end the share that fell inside it (so the ceiling is not biased low by the
    chunks cut off). Then bare renders, for the frame's share of a chunk.
    """
    n = len(workers)
    workers.call({s: ("reset", (0,), {"task_id": t}) for s, t in enumerate(tasks)}, timeout=workers.build_timeout)
    rng = np.random.default_rng(0)

    def chunk() -> tuple:
        return ("step_chunk", (rng.uniform(-1, 1, (CHUNK, 7)).astype(np.float32),))

    workers.call({s: chunk() for s in range(n)})  # warm-up, untimed
    before = dict(workers.busy_time)
    counted, executed, chunks = 0.0, 0, 0
    start = time.perf_counter()
    end = start + args.ceiling_s
    workers.send({s: chunk() for s in range(n)})
    sent = dict.fromkeys(range(n), start)  # when each process's command in flight went out
    stepping, flying = set(range(n)), set(range(n))  # stepping: a chunk in flight (else a reset)
    while flying:
        back = workers.recv(workers.ready(sorted(flying), timeout=None))
        now = time.perf_counter()
        again = {}
        for s, result in back.items():
            if s in stepping:
                executed, chunks = executed + result["chunk_steps"], chunks + 1
                inside = 1.0 if now <= end else max(0.0, end - sent[s]) / (now - sent[s])
                counted += inside * result["chunk_steps"]
            if now <= end:
                again[s] = ("reset", (0,)) if s in stepping and result["done"] else chunk()
                sent[s] = now
        stepping = {s for s in stepping if s not in back} | {s for s, c in again.items() if c[0] == "step_chunk"}
        flying = (flying - back.keys()) | again.keys()
        if again:
            workers.send(again)
    step_cpu = workers.busy_time["step_chunk"] - before.get("step_chunk", 0.0)
    for _ in range(3):  # the frame alone: what one chunk's render costs inside step_chunk
        workers.call({s: ("render", ()) for s in range(n)})
    render_s = workers.busy_time["render"] / (3 * n)
    return {
        "env_steps_per_s": counted / args.ceiling_s,
        "wall_s": args.ceiling_s,
        "env_steps": counted,
        "worker_step_cpu_s": step_cpu,
        "render_s_per_frame": render_s,
        "physics_s_per_step": (step_cpu - chunks * render_s) / executed,
    }


def keep_workers_busy(workers: SimWorkers, work: str, tasks: list[int], stop: threading.Event) -> int:
    """Every process simulates (``work="sim"``: random chunks, one frame each, a reset when an episode ends)
    or renders frames (``"render"``), each on its own, until ``stop`` is set; returns the commands done."""
    n = len(workers)
    rng = np.random.default_rng(1)
    workers.call({s: ("reset", (0,), {"task_id": t}) for s, t in enumerate(tasks)}, timeout=workers.build_timeout)

    def command(result) -> tuple:
        if work == "render":
            return ("render", ())
        if isinstance(result, dict) and result.get("done"):
            return ("reset", (0,))
        return ("step_chunk", (rng.uniform(-1, 1, (CHUNK, 7)).astype(np.float32),))

    workers.send({s: command(None) for s in range(n)})
    flying, done = set(range(n)), 0
    while flying:
        back = workers.recv(workers.ready(sorted(flying), timeout=None))
        done += len(back)
        again = {} if stop.is_set() else {s: command(r) for s, r in back.items()}
        flying = (flying - back.keys()) | again.keys()
        if again:
            workers.send(again)
    return done


def bare_policy_beside(policy, workers: SimWorkers, names, device, args, tasks: list[int], work: str) -> dict:
    """The batch-8 forward back to back (``sustained_forward``) while the env processes do ``work`` beside it."""
    stop, done = threading.Event(), []
    busy = threading.Thread(target=lambda: done.append(keep_workers_busy(workers, work, tasks, stop)))
    busy.start()
    try:
        time.sleep(3.0)  # every process at work
        row = sustained_forward(policy, min(8, len(workers)), names, device, args.sustain_s)
    finally:
        stop.set()
        busy.join()
    return {**row, "work": work, "worker_commands": done[0] if done else None}


def lockstep(workers: SimWorkers, policy, requests, success_step, args, device) -> dict:
    """siiRL's loop: per batch, rebuild every simulation, then 64 chunk-steps querying every env."""
    n = len(workers)
    names = suite_info(args.suite).instructions
    executed = rebuilds = 0
    policy_s = rebuild_s = 0.0
    start, cpu = time.perf_counter(), main_cpu_seconds()
    # the same CPU-thread setting as collect_rollouts uses for a policy on an accelerator
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad(), single_cpu_thread(device.type != "cpu"):
        for first in range(0, len(requests), n):
            batch = requests[first : first + n]
            t0 = time.perf_counter()
            built = workers.call({s: ("set_task", (r.task_id,)) for s, r in enumerate(batch)},
                                 timeout=workers.build_timeout)
            for s, r in enumerate(batch):
                workers.set_task(s, r.task_id)
            obs = workers.call({s: ("reset", (r.init_state_id,)) for s, r in enumerate(batch)})
            rebuild_s += time.perf_counter() - t0
            rebuilds += len(built)
            done = [False] * len(batch)
            for _ in range(args.max_steps // CHUNK):
                td = TensorDict({("observation", "image"): torch.stack(
                    [torch.from_numpy(obs[s]["image"]) for s in range(len(batch))])}, [len(batch)])
                td.set_non_tensor("instruction", [names[r.task_id] for r in batch])
                t0 = time.perf_counter()
                actions = policy(td.to(device))["action"].float().cpu().numpy()
                policy_s += time.perf_counter() - t0
                live = [s for s in range(len(batch)) if not done[s]]
                teleport = [s for s in live if due(obs[s]["step_count"], success_step.get(batch[s].rollout_id))]
                if teleport:
                    workers.call({s: ("teleport_to_goal", ()) for s in teleport})
                if live:
                    out = workers.call({s: ("step_chunk", (actions[s],)) for s in live})
                    for s, result in out.items():
                        obs[s], done[s] = result, bool(result["done"])
                        executed += result["chunk_steps"]
    wall = time.perf_counter() - start
    return {"env_steps_per_s": executed / wall, "wall_s": wall, "env_steps": executed, "policy_s": policy_s,
            "rebuild_s": rebuild_s, "rebuilds": rebuilds, "main_cpu_s": main_cpu_seconds() - cpu}


def scheduler(env, policy, requests, mode: str, timer: PreprocessTimer, forward_timer: ForwardTimer,
              on_finished=None) -> tuple[dict, object]:
    options = {**DEFAULTS, **{**SCHEDULER_MODES, **RECIPE_MODES}[mode]}
    overlap, policy.cuda_graphs = options["overlap"], options["graphs"]
    set_jpeg_in_workers(env, policy, options["env_jpeg"])
    if not options["two_phase"]:  # the rollout then calls the policy whole
        policy.__dict__["launch"] = None
    default_switch, default_margin = sys.getswitchinterval(), rollout_module._ForwardClock._MARGIN_S
    if options["switch_ms"] is not None:
        sys.setswitchinterval(options["switch_ms"] / 1e3)
    if options["margin_ms"] is not None:
        rollout_module._ForwardClock._MARGIN_S = options["margin_ms"] / 1e3
    if options["buckets"] is not None:
        cuda_graphs_module.batch_bucket = options["buckets"]
        with torch.no_grad():  # the new buckets' graphs before the timed run, as the default ones were
            capture_graphs(policy, suite_info(env.suite).instructions, env.num_envs)
    if not options["graph_preprocessing"]:
        forward_timer.decision_inputs = preprocess_outside_graph(policy, suite_info(env.suite).instructions,
                                                                 env.num_envs)
    env.poll_s = None if options["poll_ms"] is None else options["poll_ms"] / 1e3
    before, prep = env.worker_time, timer.seconds
    env.rounds.clear()
    env.starts.clear()
    env.rebuilds = 0
    start, cpu = time.perf_counter(), main_cpu_seconds()
    forward_timer.pop()
    try:
        trajs, stats = collect_rollouts(env, policy, requests, overlap=overlap, on_finished=on_finished)
    finally:
        sys.setswitchinterval(default_switch)
        rollout_module._ForwardClock._MARGIN_S = default_margin
        cuda_graphs_module.batch_bucket = LIBRARY_BUCKET
        forward_timer.decision_inputs = policy.__class__._decision_inputs.__get__(policy)
        policy.__dict__.pop("launch", None)
        env.poll_s = None
    after = env.worker_time
    row = {
        "main_cpu_s": main_cpu_seconds() - cpu,
        "loop_cpu_s": stats.loop_cpu_time,
        "policy_cpu_s": stats.policy_cpu_time,
        "env_steps_per_s": stats.env_steps_per_second,
        "wall_s": stats.wall_time,
        "env_steps": stats.env_steps,
        "decisions": stats.decisions,
        "policy_s": stats.policy_time,
        "preprocess_s": timer.seconds - prep,
        "env_wait_s": stats.env_time,
        "reset_s": stats.reset_time,
        "worker_step_cpu_s": after.get("step_chunk", 0.0) - before.get("step_chunk", 0.0),
        "worker_reset_cpu_s": after.get("reset", 0.0) - before.get("reset", 0.0),
        "successes": int(trajs["success"].sum()),
        "policy_calls": stats.policy_calls,
        "rebuilds": env.rebuilds,
    }
    row["forward_s"] = row["policy_s"] - row["preprocess_s"]
    row["forward_gpu_s"], row["forward_gpu_ms_by_batch"], gaps = forward_timer.pop()  # the logits forwards alone
    row.update({f"gpu_{k}": v for k, v in gaps.items()})
    if row["forward_gpu_s"] is not None:
        row["forward_gpu_share"] = row["forward_gpu_s"] / row["wall_s"]
    row["gpu_busy"] = row["policy_s"] / row["wall_s"]
    row["busy_sims"] = (row["worker_step_cpu_s"] + row["worker_reset_cpu_s"]) / row["wall_s"]
    row["mean_batch"] = row["decisions"] / max(1, row["policy_calls"])
    row.update(steady_state(env, start))
    policy.cuda_graphs = True
    return row, trajs


def set_jpeg_in_workers(env, policy, on: bool) -> None:
    """Moves the JPEG round trip between the policy and the env's workers (``rollout.jpeg_in_workers``) on the
    built env: the A/B of one run needs no rebuild. (A user sets ``LiberoVecEnv(jpeg_quality=95)`` instead.)"""
    quality = JPEG_QUALITY if on else None
    env._workers.call({s: ("__setattr__", ("jpeg_quality", quality)) for s in range(env.num_envs)})
    env._workers._sim_kwargs["jpeg_quality"] = quality  # a restarted worker keeps it
    policy.jpeg_quality = None if on else JPEG_QUALITY


@lru_cache(maxsize=1)
def model_graphs(model) -> GraphedActionLogits:
    """CUDA graphs of the model forward alone, from pixel values (the ceiling; the policy's own graphs also
    preprocess the camera frames)."""
    return GraphedActionLogits(model)


def forward_inputs(policy, batch: int, names: tuple[str, ...], device: torch.device):
    """A random observation of ``batch`` frames and the model forward on it: ``(obs, eager, graphed)``, each
    forward a no-argument callable returning the logits (``graphed`` None where no CUDA graph runs)."""
    g = torch.Generator().manual_seed(batch)
    obs = TensorDict({("observation", "image"): torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE),
                                                             dtype=torch.uint8, generator=g)}, [batch])
    obs.set_non_tensor("instruction", [names[i % len(names)] for i in range(batch)])
    prepared = policy.preprocess(obs.clone())
    ids, mask = prepared["prompt_ids"], prepared["prompt_mask"]
    pixels = policy.pixel_values(prepared["policy_image"])
    if device.type != "cuda":
        return obs, lambda: policy.model(ids, mask, pixels), None
    graph = model_graphs(policy.model)
    lengths = policy.model.prompt_lengths(ids, mask)
    trimmed = ids[:, : int(lengths.max())]
    return obs, lambda: policy.model(ids, mask, pixels), lambda: graph(trimmed, lengths, pixels)[0]


def preprocess_outside_graph(policy, names: tuple[str, ...], num_envs: int):
    """``policy._decision_inputs`` as it was before the graphs took the frames: the preprocessing launched op by
    op, then the model's graph from the pixel values (captured here for every batch size, before timing). Without
    graphs (a CPU model) the policy's own eager path, which is that already."""
    if not cuda_graphs_module.graphs_supported(policy.model):
        return type(policy)._decision_inputs.__get__(policy)
    graphs = model_graphs(policy.model)
    size = policy.model.config.dino.image_size
    with torch.no_grad():
        for width in sorted(set(policy._prompts(list(names))[2].tolist())):
            graphs.capture(range(1, num_envs + 1), width, (6 * policy.num_images_in_input, size, size))

    def decision_inputs(tensordict):
        policy.preprocess(tensordict)
        _, lengths = policy._known_prompts
        ids = tensordict.get("prompt_ids")[:, : int(lengths.max())]
        pixels = policy.pixel_values(tensordict.get("policy_image"))
        logits, _ = graphs(ids, lengths.pin_memory().to(ids.device, non_blocking=True), pixels)
        policy.__dict__["_known_logits"] = (tensordict.get("policy_image"), logits)

    return decision_inputs


def sustained_forward(policy, batch: int, names: tuple[str, ...], device: torch.device, seconds: float) -> dict:
    """The forward at ``batch`` back to back for ``seconds`` (through the CUDA graph where one runs), as the
    pool keeps the GPU busy: a GPU that slows down under sustained load (power, clocks) shows it here and
    not in a handful of calls."""
    with torch.inference_mode():
        _, eager, graphed = forward_inputs(policy, batch, names, device)
        forward = graphed or eager
        forward()
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            forward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((t0 - start, 1e3 * (time.perf_counter() - t0)))
    total = time.perf_counter() - start
    first = [ms for t, ms in times if t < min(2.0, seconds / 4)] or [times[0][1]]
    last = [ms for t, ms in times if t >= seconds * 0.75] or [times[-1][1]]
    return {"batch": batch, "seconds": total, "calls": len(times),
            "env_steps_per_s": batch * CHUNK * len(times) / total,
            "first_ms": statistics.median(first), "last_ms": statistics.median(last)}


def pipelined_decisions(policy, batch: int, names: tuple[str, ...], device: torch.device, seconds: float) -> dict:
    """The policy's sampling decisions at ``batch`` for ``seconds``, each launched before the one in flight is
    finished (``launch`` / ``finish``, as the pool's policy thread runs them) and nothing else on the machine: the
    pool's GPU work per decision (the frames' preprocessing in the graph, the forward, the sampling, the copies to
    the host) with the host's part overlapped. The JPEG round trip is left to the workers, as in the pool."""
    quality, policy.jpeg_quality = policy.jpeg_quality, None
    try:
        with torch.inference_mode(), set_exploration_type(ExplorationType.RANDOM):
            obs, _, _ = forward_inputs(policy, batch, names, device)
            policy.finish(policy.launch(obs.clone()))  # untimed
            calls, start = 0, time.perf_counter()
            in_flight = policy.launch(obs.clone())
            while time.perf_counter() - start < seconds:
                following = policy.launch(obs.clone())
                policy.finish(in_flight)
                in_flight, calls = following, calls + 1
            policy.finish(in_flight)
            total = time.perf_counter() - start
    finally:
        policy.jpeg_quality = quality
    return {"batch": batch, "seconds": total, "calls": calls + 1,
            "env_steps_per_s": batch * CHUNK * (calls + 1) / total}


def bare_policy(policy, batch: int, names: tuple[str, ...], device: torch.device, repeats: int) -> dict:
    """The model forward alone and the whole policy step, median over ``repeats`` calls."""
    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    with torch.inference_mode(), set_exploration_type(ExplorationType.RANDOM):
        obs, eager_forward, graphed = forward_inputs(policy, batch, names, device)
        eager = median_ms(eager_forward)
        row = {"batch": batch, "eager_forward_ms": eager}
        if graphed is not None:
            row["graph_forward_ms"] = median_ms(graphed)
            row["graph_max_abs_logit_diff"] = float((graphed() - eager_forward()).abs().max())
        row["policy_step_ms"] = median_ms(lambda: policy(obs.clone()))  # through the graphs where they run
        policy.cuda_graphs = False
        row["eager_policy_step_ms"] = median_ms(lambda: policy(obs.clone()))
        policy.cuda_graphs = True
    row["forward_ms"] = min(eager, row.get("graph_forward_ms", eager))
    row["forward_env_steps_per_s"] = batch * CHUNK / row["forward_ms"] * 1e3
    row["policy_step_env_steps_per_s"] = batch * CHUNK / row["policy_step_ms"] * 1e3
    return row


def capture_graphs(policy, names: tuple[str, ...], num_envs: int) -> dict:
    """Captures the policy's CUDA graphs for every batch size up to ``num_envs`` and every prompt width."""
    graphed = policy._graphed_forward()
    if graphed is None:
        return {}
    widths = sorted(set(policy._prompts(list(names))[2].tolist()))
    before = graphed.capture_seconds
    for width in widths:  # the policy's graphs take the camera frames
        graphed.capture(range(1, num_envs + 1), width, (3 * policy.num_images_in_input, IMAGE_SIZE, IMAGE_SIZE),
                        torch.uint8)
    return {"graph_capture_s": graphed.capture_seconds - before, "graphs": len(graphed.graphs),
            "failed_captures": sum(g is None for g in graphed.graphs.values()), "prompt_widths": widths}


# -- one size -----------------------------------------------------------------------------------------
def measure(args, num_envs: int, policy, timer: PreprocessTimer, forward_timer: ForwardTimer, reward,
            device: torch.device, checkpoint=lambda result: None) -> dict:
    """Every ceiling, baseline and mode at ``num_envs``; ``checkpoint(result)`` after each (the figures so far)."""
    requests, success_step = workload(args, num_envs)
    tasks = [r.task_id for r in requests[:num_envs]]
    names = suite_info(args.suite).instructions
    result = {"num_envs": num_envs, "requests": len(requests), "forced_successes": len(success_step)}
    log(f"[{num_envs} envs] {len(requests)} requests, {len(success_step)} forced successes")

    with torch.no_grad():
        result["cuda_graphs"] = capture_graphs(policy, names, num_envs)
    sizes = sorted({num_envs, max(1, num_envs // 2), max(1, num_envs // 4)})
    result["bare_policy"] = [bare_policy(policy, b, names, device, args.repeats) for b in sizes]
    result["bare_policy_pipelined"] = [pipelined_decisions(policy, b, names, device, args.sustain_s) for b in sizes]
    result["bare_policy_sustained"] = sustained_forward(policy, min(8, num_envs), names, device, args.sustain_s)
    log(f"[{num_envs} envs] bare policy sustained {result['bare_policy_sustained']}")
    env = ForcedSuccessEnv(args.suite, num_envs, max_steps=args.max_steps, task_ids=tasks, success_step=success_step,
                           build_timeout=900)
    trajs = embeddings = None
    try:
        # the ceiling and the lockstep loop run on the env's own processes, with the JPEG round trip where the
        # library's default puts it (in the workers): the same processes and the same work as the pool's
        set_jpeg_in_workers(env, policy, True)
        result["bare_sim"] = bare_sim(env._workers, args, tasks)
        checkpoint(result)
        log(f"[{num_envs} envs] bare sim {result['bare_sim']['env_steps_per_s']:.1f} env-steps/s")
        if args.beside:
            result["bare_policy_beside"] = [bare_policy_beside(policy, env._workers, names, device, args, tasks, w)
                                            for w in ("sim", "render")]
            checkpoint(result)
            log(f"[{num_envs} envs] forward beside the workers {result['bare_policy_beside']}")
        if "lockstep" in args.modes:
            result["lockstep"] = lockstep(env._workers, policy, requests, success_step, args, device)
            checkpoint(result)
            log(f"[{num_envs} envs] lockstep {result['lockstep']['env_steps_per_s']:.1f}")
        # every worker builds its task and compiles numba's kernels here, so that no measured mode pays for it
        env.reset()
        env.step(TensorDict({"action": torch.zeros(num_envs, CHUNK, 7)}, [num_envs]))
        for mode in SCHEDULER_MODES:
            if mode in args.modes:
                result[mode], trajs = scheduler(env, policy, requests, mode, timer, forward_timer)
                checkpoint(result)
                log(f"[{num_envs} envs] {mode} {result[mode]['env_steps_per_s']:.1f}")
        for mode, priority in EMBED_MODES.items():
            if mode in args.modes and reward is not None:
                result[mode], trajs, embeddings = embedded(env, policy, requests, result, reward, device, timer,
                                                           forward_timer, args.group_size, priority)
                checkpoint(result)
                log(f"[{num_envs} envs] {result[mode]['mode']} + background embedding ({mode}) "
                    f"{result[mode]['env_steps_per_s']:.1f}")
        for mode in RECIPE_MODES:
            if mode in args.modes:
                if mode == "pool_lora":
                    with_lora(policy, args.lora_rank)
                    with torch.no_grad():  # the graphs again, now with the adapters, before the timed run
                        result["cuda_graphs_lora"] = capture_graphs(policy, names, num_envs)
                    result[mode], trajs = scheduler(env, policy, requests, mode, timer, forward_timer)
                elif mode == "pool_lora_merged":
                    with_lora(policy, args.lora_rank)
                    result[mode], trajs = merged_pool(env, policy, requests, mode, timer, forward_timer, names)
                else:
                    shard_like_the_recipe(policy, device, args.lora_rank)
                    result[mode], trajs = scheduler(env, policy, requests, mode, timer, forward_timer)
                result[mode]["lora_rank"] = args.lora_rank
                checkpoint(result)
                log(f"[{num_envs} envs] {mode} {result[mode]['env_steps_per_s']:.1f}")
    finally:
        env.close()
    for slots in args.cpu_render_slots:  # each on an env of its own, built after the first one closed
        mode = f"pool_cpu_render{slots}"
        result[mode] = cpu_render_pool(args, num_envs, slots, policy, requests, success_step, tasks, names, device,
                                       timer, forward_timer)
        checkpoint(result)
        log(f"[{num_envs} envs] {mode} {result[mode]['env_steps_per_s']:.1f} ({result[mode]['renderers']})")

    if reward is not None and trajs is not None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reward(trajs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        result["reward"] = {"trajectories": len(trajs), "seconds": seconds, "s_per_trajectory": seconds / len(trajs)}
        if embeddings is not None and args.check_embeddings:
            # the background embeddings against the reward's own (same videos, other batches)
            from srpo_rl.rewards import trajectory_videos

            videos = trajectory_videos(trajs, [[i] for i in range(len(trajs))], num_frames=reward.embedder.num_frames)
            again = reward.embedder([videos[i] for i in range(len(trajs))])
            kept = ~embeddings.isnan().any(-1)  # a group the sampler drops is not embedded
            last = [m for m in EMBED_MODES if m in result][-1]
            result[last]["max_abs_diff_vs_batch"] = float((embeddings[kept] - again.float().cpu()[kept]).abs().max())
    ratios(result)
    return result


def embedded(env, policy, requests, result: dict, reward, device: torch.device, timer: PreprocessTimer,
             forward_timer: ForwardTimer, group_size: int, priority: int) -> tuple[dict, object, torch.Tensor]:
    """The fastest scheduler mode of this run so far with the reward's background embedding, the policy's
    stream at CUDA ``priority``: ``(row, trajectories, embeddings)``."""
    mode = max((m for m in SCHEDULER_MODES if m in result), key=lambda m: result[m]["env_steps_per_s"],
               default="pool")
    background = BackgroundEmbedder(reward.embedder, device=device, keep_group=EmbodiedSampler(1).keeps,
                                    group_size=group_size)
    default_priority, rollout_module.POLICY_STREAM_PRIORITY = rollout_module.POLICY_STREAM_PRIORITY, priority
    try:
        row, trajs = scheduler(env, policy, requests, mode, timer, forward_timer, on_finished=background)
        t0 = time.perf_counter()
        embeddings = background.pop(trajs["rollout_id"])
        row["drain_s"] = time.perf_counter() - t0
    finally:
        rollout_module.POLICY_STREAM_PRIORITY = default_priority
        background.close()
    row.update(mode=mode, policy_stream_priority=priority, embed_busy_s=background.busy_time,
               embedded=len(trajs) - background.dropped, not_embedded=background.dropped)
    row["wall_with_drain_s"] = row["wall_s"] + row["drain_s"]
    row["env_steps_per_s"] = row["env_steps"] / row["wall_with_drain_s"]
    return row, trajs, embeddings


def cpu_render_pool(args, num_envs: int, slots: int, policy, requests, success_step, tasks, names, device,
                    timer: PreprocessTimer, forward_timer: ForwardTimer) -> dict:
    """``pool`` on an env whose last ``slots`` slots render with llvmpipe on the CPU (built for this row)."""
    env = ForcedSuccessEnv(args.suite, num_envs, max_steps=args.max_steps, task_ids=tasks, success_step=success_step,
                           build_timeout=900, cpu_render_slots=slots)
    try:
        firsts = sorted({0, num_envs - slots} - {num_envs})  # a GPU slot (if any) and a CPU one
        renderers = env._workers.call({s: ("gl_renderer", ()) for s in firsts})
        set_jpeg_in_workers(env, policy, True)
        simulation = bare_sim(env._workers, args, tasks)  # this env's own ceiling: its frames cost cores now
        beside = None
        if args.beside:
            beside = bare_policy_beside(policy, env._workers, names, device, args, tasks, "sim")
        env.reset()
        env.step(TensorDict({"action": torch.zeros(num_envs, CHUNK, 7)}, [num_envs]))  # builds, numba: untimed
        row, _ = scheduler(env, policy, requests, "pool", timer, forward_timer)
    finally:
        env.close()
    row.update(cpu_render_slots=slots, renderers={str(s): renderers[s] for s in firsts}, bare_sim=simulation)
    if beside is not None:
        row["bare_policy_beside_sim"] = beside
    return row


def row_modes(result: dict) -> list[str]:
    """The rows of ``result`` that ran the rollout, in the order they ran."""
    cpu_render = sorted((m for m in result if m.startswith("pool_cpu_render")),
                        key=lambda m: result[m]["cpu_render_slots"])
    return [m for m in ("lockstep", *SCHEDULER_MODES, *EMBED_MODES, *RECIPE_MODES) if m in result] + cpu_render


def ratios(result: dict) -> None:
    ceilings = {"bare_sim": result["bare_sim"]["env_steps_per_s"],
                "bare_policy": max(b["forward_env_steps_per_s"] for b in result["bare_policy"])}
    result["ceilings"] = {**ceilings, "min_ceiling": min(ceilings.values())}
    if "bare_policy_sustained" in result:  # the forward as it runs for minutes, not for a few calls
        result["ceilings"]["bare_policy_sustained"] = result["bare_policy_sustained"]["env_steps_per_s"]
        result["ceilings"]["min_sustained_ceiling"] = min(ceilings["bare_sim"],
                                                          result["ceilings"]["bare_policy_sustained"])
    if "bare_policy_pipelined" in result:  # the policy's whole decisions, as the pool runs them, nothing beside
        result["ceilings"]["bare_decisions"] = max(b["env_steps_per_s"] for b in result["bare_policy_pipelined"])
    sim = result["bare_sim"]
    for mode in row_modes(result):
        row = result[mode]
        rate = row["env_steps_per_s"]
        row["vs_min_ceiling"] = rate / result["ceilings"]["min_ceiling"]
        if "bare_decisions" in result["ceilings"]:
            row["vs_bare_decisions"] = rate / result["ceilings"]["bare_decisions"]
        row["vs_bare_sim"] = rate / ceilings["bare_sim"]
        row["vs_bare_policy"] = rate / ceilings["bare_policy"]
        if "min_sustained_ceiling" in result["ceilings"]:
            row["vs_min_sustained_ceiling"] = rate / result["ceilings"]["min_sustained_ceiling"]
        if row.get("steady_env_steps_per_s"):
            row["steady_vs_min_ceiling"] = row["steady_env_steps_per_s"] / result["ceilings"]["min_ceiling"]
        if "lockstep" in result:
            row["vs_lockstep"] = rate / result["lockstep"]["env_steps_per_s"]
        if "worker_step_cpu_s" in row and "cpu_render_slots" not in row:  # the bare sim rendered on the GPU
            frames = row["decisions"]
            row["split_cpu_s"] = {
                "physics": row["worker_step_cpu_s"] - frames * sim["render_s_per_frame"],
                "rendering": frames * sim["render_s_per_frame"],
                "resets": row["worker_reset_cpu_s"],
            }
            row["split_main_s"] = {"preprocessing": row["preprocess_s"], "policy_forward": row["forward_s"],
                                   "waiting_for_env": row["env_wait_s"]}
    for mode in EMBED_MODES:
        embed, plain = result.get(mode), result.get(result.get(mode, {}).get("mode"))  # plain: no embedding
        if "reward" not in result or embed is None or plain is None:
            continue
        reward = result["reward"]
        reward["vs_rollout_wall"] = reward["seconds"] / plain["wall_s"]
        # what embedding during the rollout adds to the wall time, against embedding after it
        embed["extra_wall_s"] = embed["wall_with_drain_s"] - plain["wall_s"]
        embed["extra_vs_serial_reward"] = embed["extra_wall_s"] / reward["seconds"]
        embed["extra_vs_rollout_wall"] = embed["extra_wall_s"] / plain["wall_s"]
        embed["extra_s_per_embedded"] = embed["extra_wall_s"] / max(1, embed["embedded"])


# -- report -------------------------------------------------------------------------------------------
def print_table(results: list[dict], policy_name: str, reward_name: str) -> None:
    print(f"\nRollout env-steps/s, {policy_name}, reward {reward_name}")
    print(f"{'envs':>4} {'mode':>23} {'steps/s':>8} {'vs lockstep':>11} {'vs min ceil':>11} {'steady':>7} "
          f"{'st vs ceil':>10} {'wall s':>7} {'policy s':>8} {'prep s':>7} {'fwd gpu s':>9} {'env wait s':>10} {'sim cpu s':>9} "
          f"{'gpu busy':>8} {'gap ms':>6} {'busy sims':>9} {'batch':>5} {'main cpu s':>10} {'loop cpu s':>10} {'pol cpu s':>9} "
          f"{'rebuilds':>8}")
    for r in results:
        print(f"{r['num_envs']:>4} {'bare sim':>23} {r['bare_sim']['env_steps_per_s']:>8.1f}  "
              f"(physics {1e3 * r['bare_sim']['physics_s_per_step']:.1f} ms/step, "
              f"render {1e3 * r['bare_sim']['render_s_per_frame']:.1f} ms/frame, per process)")
        for b in r["bare_policy"]:
            graph = (f", CUDA graph {b['graph_forward_ms']:.1f} ms (max |logit diff| {b['graph_max_abs_logit_diff']:.1e})"
                     if "graph_forward_ms" in b else "")
            print(f"{r['num_envs']:>4} {'bare pol':>23} {b['forward_env_steps_per_s']:>8.1f}  "
                  f"(batch {b['batch']}: forward eager {b['eager_forward_ms']:.1f} ms{graph}; policy step "
                  f"{b['policy_step_ms']:.1f} ms, eager {b['eager_policy_step_ms']:.1f} ms)")
        for b in r.get("bare_policy_pipelined", []):
            print(f"{r['num_envs']:>4} {'bare decisions':>23} {b['env_steps_per_s']:>8.1f}  (batch {b['batch']}: "
                  f"{b['calls']} sampling decisions launched back to back in {b['seconds']:.1f} s, the pool's GPU work)")
        if "bare_decisions" in r.get("ceilings", {}):
            print(f"{r['num_envs']:>4} {'vs bare decisions':>23} {'':>8}  "
                  + ", ".join(f"{m} {r[m]['vs_bare_decisions']:.2f}x" for m in row_modes(r) if "vs_bare_decisions" in r[m]))
        if "bare_policy_sustained" in r:
            b = r["bare_policy_sustained"]
            print(f"{r['num_envs']:>4} {'bare pol sustained':>23} {b['env_steps_per_s']:>8.1f}  (batch {b['batch']} "
                  f"back to back for {b['seconds']:.0f} s: {b['first_ms']:.1f} ms a forward at first, "
                  f"{b['last_ms']:.1f} ms in the last quarter; vs min(bare sim, this): "
                  + ", ".join(f"{m} {r[m]['vs_min_sustained_ceiling']:.2f}x" for m in row_modes(r)
                              if "vs_min_sustained_ceiling" in r[m]) + ")")
        for b in r.get("bare_policy_beside", []):
            print(f"{r['num_envs']:>4} {'bare pol beside ' + b['work']:>23} {b['env_steps_per_s']:>8.1f}  (batch "
                  f"{b['batch']} back to back for {b['seconds']:.0f} s while every env process does {b['work']!r}: "
                  f"{b['first_ms']:.1f} ms a forward at first, {b['last_ms']:.1f} ms in the last quarter)")
        if r.get("cuda_graphs"):
            g = r["cuda_graphs"]
            print(f"{r['num_envs']:>4} {'graphs':>23} {g['graphs']} captured in {g['graph_capture_s']:.1f} s, "
                  f"{g['failed_captures']} failed "
                  f"(prompt widths {g['prompt_widths']})")
        for mode in row_modes(r):
            row = r[mode]
            vs_lock = f"{row['vs_lockstep']:.2f}x" if "vs_lockstep" in row else "-"
            steady = f"{row['steady_env_steps_per_s']:.1f}" if row.get("steady_env_steps_per_s") else "-"
            st_ceil = f"{row['steady_vs_min_ceiling']:.2f}x" if "steady_vs_min_ceiling" in row else "-"
            print(f"{r['num_envs']:>4} {mode:>23} {row['env_steps_per_s']:>8.1f} {vs_lock:>11} "
                  f"{row['vs_min_ceiling']:>10.2f}x {steady:>7} {st_ceil:>10} {row['wall_s']:>7.1f} "
                  f"{row['policy_s']:>8.1f} "
                  f"{row.get('preprocess_s', float('nan')):>7.1f} {row.get('forward_gpu_s') or float('nan'):>9.1f} "
                  f"{row.get('env_wait_s', float('nan')):>10.1f} "
                  f"{row.get('worker_step_cpu_s', float('nan')):>9.1f} {row.get('gpu_busy', float('nan')):>8.2f} "
                  f"{row.get('gpu_between_median_ms') or float('nan'):>6.1f} "
                  f"{row.get('busy_sims', float('nan')):>9.1f} {row.get('mean_batch', float('nan')):>5.1f} "
                  f"{row.get('main_cpu_s', float('nan')):>10.1f} {row.get('loop_cpu_s', float('nan')):>10.1f} "
                  f"{row.get('policy_cpu_s', float('nan')):>9.1f} {row.get('rebuilds', -1):>8}")
        for mode in row_modes(r):
            if "renderers" in r[mode]:
                beside = r[mode].get("bare_policy_beside_sim")
                print(f"{r['num_envs']:>4} {mode:>23} renderers by slot {r[mode]['renderers']}; its bare sim "
                      f"{r[mode]['bare_sim']['env_steps_per_s']:.1f} env-steps/s"
                      + (f"; the batch-8 forward beside its simulation {beside['env_steps_per_s']:.1f} env-steps/s"
                         if beside else ""))
        if "reward" in r:
            rw = r["reward"]
            print(f"{r['num_envs']:>4} {'reward':>9} {rw['seconds']:.1f} s for {rw['trajectories']} trajectories "
                  f"({rw['s_per_trajectory']:.3f} s each; {100 * rw.get('vs_rollout_wall', 0):.1f}% of the "
                  "rollout's wall time)")
        for mode in EMBED_MODES:
            if "extra_wall_s" in r.get(mode, {}):
                e = r[mode]
                print(f"{r['num_envs']:>4} {mode:>9} embedding {e['embedded']} trajectories (of "
                      f"{e['embedded'] + e['not_embedded']}) during the {e['mode']} rollout, policy stream priority "
                      f"{e['policy_stream_priority']}, added {e['extra_wall_s']:.1f} s (drain {e['drain_s']:.1f} s) "
                      f"against {r['reward']['seconds']:.1f} s after it; max |diff| of embeddings "
                      + (f"{e['max_abs_diff_vs_batch']:.2e}" if "max_abs_diff_vs_batch" in e
                         else "not checked (--check-embeddings)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, 2 envs, short episodes")
    parser.add_argument("--num-envs", type=int, nargs="+", default=None, help="default 16 32 (tiny: 2)")
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--requests-per-env", type=int, default=None,
                        help="default 4 (tiny 2); the recipe runs 32 (512 rollouts on 16 envs)")
    parser.add_argument("--group-size", type=int, default=None, help="rollouts per prompt (default 8; tiny 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="default 512 (tiny 32)")
    parser.add_argument("--success-min", type=int, default=None, help="default 150 (tiny 9)")
    parser.add_argument("--success-max", type=int, default=None, help="default 400 (tiny 24)")
    parser.add_argument("--success-fraction", type=float, default=0.5)
    parser.add_argument("--ceiling-s", type=float, default=None, help="seconds of bare simulation (default 30; tiny 5)")
    parser.add_argument("--modes", default="lockstep,sync,halves,pool,pool_eager,pool_policy_jpeg,pool_one_phase,pool_switch1ms,pool_polling,embed,embed_flat",
                        help="embed = the fastest scheduler mode of the run with each finished trajectory "
                             "embedded for the reward meanwhile (embed_flat: the policy's stream at the "
                             "embedder's priority)")
    parser.add_argument("--no-reward", action="store_true")
    parser.add_argument("--check-embeddings", action="store_true",
                        help="embed the batch again after the rollout and compare with the background embeddings")
    parser.add_argument("--repeats", type=int, default=None, help="bare policy calls (default 5; tiny 3)")
    parser.add_argument("--sustain-s", type=float, default=None,
                        help="seconds of back-to-back bare forwards at batch 8 (default 20; tiny 1)")
    parser.add_argument("--beside", action="store_true",
                        help="also the batch-8 forward beside the env processes simulating / rendering")
    parser.add_argument("--cpu-render-slots", type=int, nargs="*", default=[], metavar="K",
                        help="also pool_cpu_renderK for each K: the pool on an env whose last K slots render with "
                             "Mesa's llvmpipe on the CPU (needs Mesa's EGL library)")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="the policy's blocks (OpenVLAOFT.compile_blocks) and the reward's V-JEPA 2 layers "
                             "(VideoEmbedder.compile_layers) compiled in every mode and ceiling, as "
                             "model.compile_blocks=true does in the recipe")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="pool_lora, pool_lora_merged and pool_recipe: LoRA adapters of this rank "
                             "(pool_recipe with 0: full fine-tuning's fp32 master weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partial", default=None, metavar="PATH",
                        help="rewrite the JSON (with \"partial\": true) to PATH after every mode, for a run that "
                             "may be cut off")
    args = parser.parse_args()
    tiny = {"num_envs": [2], "requests_per_env": 2, "group_size": 2,
            "max_steps": 32, "success_min": 9, "success_max": 24,
            "ceiling_s": 5.0, "repeats": 3, "sustain_s": 1.0}
    full = {"num_envs": [16, 32], "requests_per_env": 4, "group_size": 8,
            "max_steps": 512, "success_min": 150, "success_max": 400,
            "ceiling_s": 30.0, "repeats": 5, "sustain_s": 20.0}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = set(args.modes.split(","))
    known = {"lockstep", *SCHEDULER_MODES, *EMBED_MODES, *RECIPE_MODES}
    if args.modes - known:
        parser.error(f"unknown mode(s) {', '.join(sorted(args.modes - known))}; choose from {', '.join(sorted(known))}")
    changing = sorted(args.modes & set(RECIPE_MODES))
    if changing and (args.cpu_render_slots or len(args.num_envs) > 1):
        parser.error(f"{', '.join(changing)} change the policy's model for good: run with one --num-envs and "
                     "without --cpu-render-slots")
    for mode in ("pool_lora", "pool_lora_merged"):
        if mode in args.modes and args.lora_rank < 1:
            parser.error(f"{mode} needs --lora-rank >= 1, got {args.lora_rank}")
    configure_rendering()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("the full-size benchmark needs a CUDA device; pass --tiny to check the script on the CPU")
    policy, policy_name = make_policy(args, device)
    if args.compile_blocks:  # every mode and the forward ceiling then run the compiled blocks
        policy.model.compile_blocks()
        policy_name += ", blocks compiled"
    reward, reward_name = (None, "none") if args.no_reward else make_reward(args, device)
    if args.compile_blocks and reward is not None:
        reward.embedder.compile_layers()
        reward_name += ", layers compiled"
    timer, forward_timer = PreprocessTimer(policy), ForwardTimer(policy, device)
    results: list[dict] = []

    def save_partial(current: dict) -> None:  # what a run cut off (a call's time limit) still leaves behind
        if args.partial is not None:
            Path(args.partial + ".tmp").write_text(json.dumps(report(args, policy_name, reward_name, device,
                                                                     [*results, current], partial=True)))
            Path(args.partial + ".tmp").replace(args.partial)

    for n in args.num_envs:
        results.append(measure(args, n, policy, timer, forward_timer, reward, device, checkpoint=save_partial))
    print_table(results, policy_name, reward_name)
    print(json.dumps(report(args, policy_name, reward_name, device, results)))


def report(args, policy_name: str, reward_name: str, device: torch.device, results: list[dict],
           partial: bool = False) -> dict:
    """The JSON line: every figure, the workload, the machine, the versions and the command."""
    return {
        "benchmark": "rollout_throughput",
        **({"partial": True} if partial else {}),
        "policy": policy_name,
        "reward_model": reward_name,
        "suite": args.suite,
        "workload": {"requests_per_env": args.requests_per_env, "group_size": args.group_size,
                     "max_steps": args.max_steps, "success_fraction": args.success_fraction,
                     "success_steps": [args.success_min, args.success_max], "chunk": CHUNK,
                     "temperature": 1.6, "frames": "one 256x256 agentview frame per chunk"},
        "baselines": {"lockstep": "siiRL loop: rebuild every env per batch, 64 chunk-steps querying every env",
                      "bare_sim": "the env's LIBERO processes stepping random chunks, each on its own, no policy",
                      "bare_policy": "model forward alone from pixel values, the fastest at batch num_envs, "
                                     "num_envs/2, num_envs/4 (env steps = batch x 8), the faster of eager and CUDA "
                                     "graph",
                      "bare_decisions": "the policy's whole sampling decisions launched back to back (one in "
                                        "flight), the fastest of the same batch sizes, nothing beside"},
        "results": results,
        "machine": machine(device),
        "versions": versions(),
        "command": command(),
    }


if __name__ == "__main__":
    main()
