"""How close V-JEPA's 64 frames are to the reference's when the env renders one reward frame a chunk.

The reference records a frame after every env step and feeds V-JEPA ``linspace(0, T, 64)`` of them. The env
renders one frame a chunk by default (the policy's own image, so it costs no render), and
:func:`srpo_rl.rewards.trajectory_videos` fills the reference's 64 positions with the rendered frame nearest
in time (``frames_step``). This script runs one real LIBERO episode with every step rendered, then, for
episodes ending at several steps (its prefixes), builds the batch the rollout would hold at one frame a chunk
and compares three 64-frame clips with the reference's (the same pixels at every step):

- ``in time``: the library's sampling (the batch with ``frames_step``);
- ``looped``: sampling the rendered frames themselves, as before ``frames_step`` (the batch without it):
  a video of fewer than 64 frames loops back to its start.

Reported per episode length: the mean absolute pixel difference to the reference's clip (0-255), the share
of the 64 frames that differ, and the mean and largest distance in env steps between the step each clip shows
and the reference's. The actions are random (uniform in [-1, 1]), so the arm moves at every step.

    python benchmarks/reward_frames_fidelity.py                 # libero_object task 0, lengths 100-500
    python benchmarks/reward_frames_fidelity.py --lengths 150,300 --suite libero_10
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import torch
from tensordict import TensorDict

from _common import command, machine

CHUNK, NUM_FRAMES = 8, 64


def rollout_batch(frames: np.ndarray, length: int, stride: int, timed: bool) -> TensorDict:
    """The trajectory batch (one row) of an episode of ``length`` steps whose reward frames were rendered every
    ``stride`` steps and after its last step; ``frames[t]`` is the frame after env step ``t`` (0: reset)."""
    from srpo_rl.envs.chunk import frame_slots, num_frames

    decisions, k = -(-length // CHUNK), num_frames(CHUNK, stride)
    batch_frames = torch.zeros(1, decisions, k, *frames.shape[1:], dtype=torch.uint8)
    mask = torch.zeros(1, decisions, k, dtype=torch.bool)
    steps = torch.zeros(1, decisions, k, dtype=torch.int64)
    executed = torch.zeros(1, decisions, dtype=torch.int64)
    for d in range(decisions):
        n = min(CHUNK, length - d * CHUNK)
        executed[0, d] = n
        for j, sub_step in frame_slots(CHUNK, stride, n):  # the slots the env renders
            t = d * CHUNK + sub_step + 1
            batch_frames[0, d, j], mask[0, d, j], steps[0, d, j] = torch.from_numpy(frames[t]), True, t
    nxt = {"frames": batch_frames, "frames_mask": mask, "chunk_steps": executed}
    if timed:
        nxt["frames_step"] = steps
    return TensorDict(
        initial_frame=torch.from_numpy(frames[:1]),
        steps=TensorDict(mask=torch.ones(1, decisions, dtype=torch.bool),
                         next=TensorDict(nxt, batch_size=[1, decisions]), batch_size=[1, decisions]),
        batch_size=[1],
    )


def shown_steps(clip: torch.Tensor, frames: np.ndarray, length: int) -> np.ndarray:
    """The episode step each frame of ``clip`` shows (frames of distinct steps differ with random actions)."""
    flat = torch.from_numpy(frames[: length + 1]).flatten(1)
    return np.array([int((flat == frame.flatten()).all(1).nonzero()[0]) for frame in clip])


def compare(frames: np.ndarray, length: int) -> dict:
    from srpo_rl.rewards import trajectory_videos

    reference = trajectory_videos(rollout_batch(frames, length, 1, timed=True), [[0]], num_frames=NUM_FRAMES)[0]
    ref_steps = shown_steps(reference, frames, length)
    out = {"length": length, "frames_rendered": 1 + -(-length // CHUNK)}  # the reset frame + one a chunk
    for name, timed in (("in_time", True), ("looped", False)):
        clip = trajectory_videos(rollout_batch(frames, length, CHUNK, timed), [[0]], num_frames=NUM_FRAMES)[0]
        offset = np.abs(shown_steps(clip, frames, length) - ref_steps)
        diff = (clip.float() - reference.float()).abs()
        out[name] = {
            "mean_abs_pixel_diff": float(diff.mean()),
            "frames_differing": float((diff.flatten(1).amax(1) > 0).float().mean()),
            "mean_step_offset": float(offset.mean()),
            "max_step_offset": int(offset.max()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--lengths", default="100,150,200,300,400,500",
                        help="episode lengths in env steps (prefixes of one episode)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = sorted(int(x) for x in args.lengths.split(","))

    from srpo_rl.envs import LiberoSim

    sim = LiberoSim(args.suite, args.task, max_steps=lengths[-1])
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    frames = [np.ascontiguousarray(sim.reset(init_state_id=0)["frames"][0])]
    while len(frames) <= lengths[-1]:
        out = sim.step_chunk(rng.uniform(-1, 1, (CHUNK, 7)).astype(np.float32), frame_stride=1)
        frames += [np.ascontiguousarray(f) for f in out["frames"][out["frames_mask"]]]
    frames = np.stack(frames).transpose(0, 3, 1, 2)  # [T + 1, 3, H, W], as the env hands them over
    episode_s = time.perf_counter() - start
    sim.close()

    rows = [compare(frames, length) for length in lengths]
    header = f"{'steps':>6} {'rendered':>8} | {'in time: |diff|':>15} {'differ':>6} {'offset':>6} {'max':>4} | " \
             f"{'looped: |diff|':>14} {'differ':>6} {'offset':>6} {'max':>4}"
    print(f"V-JEPA's {NUM_FRAMES} frames at one reward frame a chunk against the reference's (a frame every step), "
          f"{args.suite} task {args.task}, random actions")
    print(header)
    for r in rows:
        a, b = r["in_time"], r["looped"]
        print(f"{r['length']:>6} {r['frames_rendered']:>8} | {a['mean_abs_pixel_diff']:>15.2f} "
              f"{a['frames_differing']:>6.0%} {a['mean_step_offset']:>6.1f} {a['max_step_offset']:>4} | "
              f"{b['mean_abs_pixel_diff']:>14.2f} {b['frames_differing']:>6.0%} {b['mean_step_offset']:>6.1f} "
              f"{b['max_step_offset']:>4}")
    print(json.dumps({"benchmark": "reward_frames_fidelity", "suite": args.suite, "task": args.task,
                      "num_frames": NUM_FRAMES, "chunk": CHUNK, "episode_render_s": episode_s, "rows": rows,
                      "machine": machine(), "command": command()}))


if __name__ == "__main__":
    main()
