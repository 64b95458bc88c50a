"""What LIBERO's EGL renders cost a CUDA workload on the same GPU, by what a render does.

On a one-GPU machine the simulation renders through EGL on the GPU that runs the policy, and the policy's
forward slows down beside it (``rollout_throughput.py --beside``: about 0.8-1.0 ms of forward time lost a
render on an H100). This script splits that cost. ``--procs`` processes each build one LIBERO task
(``LiberoSim``, the agentview and wrist cameras at 256x256) and do one kind of render work at ``--rate``
frames a second each, while this process runs a CUDA-graphed stand-in for the policy forward (a chain of
Llama-7B-shaped bf16 MLP matmuls on 8 x 352 tokens) back to back; the forward's slowdown against the same
stand-in alone (measured before and after) gives the GPU time lost per render. Work kinds, per frame:

- ``agentview``: robosuite's camera path (``mjv_updateScene``, ``mjr_render``, ``mjr_readPixels``), one camera;
- ``two_cameras``: that path for the agentview and the wrist camera (what a chunk of the recipe renders);
- ``two_cameras_one_read``: both cameras rendered into two viewports of the offscreen buffer, one read;
- ``agentview_low_priority``: ``agentview`` from a second EGL context created at low priority
  (``EGL_IMG_context_priority``, where the driver has it), with its own ``MjrContext``: whether the GPU then
  gives the forward precedence;
- ``empty_scene``: a one-box MuJoCo model rendered at 256x256 through ``mujoco.Renderer`` (the per-render
  cost of a context that draws almost nothing);
- ``update_only``: ``mjv_updateScene`` alone, no GL call (the CPU side, for scale).

A frame counts each camera image (``two_cameras`` renders two a frame). Prints a table and one JSON line;
each worker also compares once ``two_cameras_one_read``'s pixels with robosuite's (``one_read_max_diff``,
``one_read_pixels_differing``: the worst process).

Example (CPU, Mesa llvmpipe; the CUDA rows need a GPU)::

    python benchmarks/render_contention.py --procs 2 --seconds 3 --kinds agentview,two_cameras_one_read
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np

from _common import command, machine, versions

KINDS = ("agentview", "two_cameras", "two_cameras_one_read", "agentview_low_priority", "empty_scene", "update_only")
EGL_CONTEXT_PRIORITY_LEVEL_IMG, EGL_CONTEXT_PRIORITY_LOW_IMG = 0x3100, 0x3103  # EGL_IMG_context_priority
SIZE = 256
CAMERAS = ("agentview", "robot0_eye_in_hand")
EMPTY_XML = """<mujoco><worldbody><light pos="0 0 3"/><geom type="box" size=".1 .1 .1"/>
<camera name="c" pos="0 -1 .3" xyaxes="1 0 0 0 .3 1"/></worldbody></mujoco>"""


def _low_priority_context(model):
    """A low-priority EGL context on robosuite's display with its own ``MjrContext``, or ``None`` without the
    extension (or where the driver refuses it)."""
    import ctypes

    import mujoco
    from mujoco.egl import egl_ext as EGL
    from robosuite.renderers.context import egl_context

    display = egl_context.EGL_DISPLAY
    if b"EGL_IMG_context_priority" not in (EGL.eglQueryString(display, EGL.EGL_EXTENSIONS) or b""):
        return None
    config, count = EGL.EGLConfig(), ctypes.c_long()
    EGL.eglChooseConfig(display, egl_context.EGL_ATTRIBUTES, ctypes.byref(config), 1, count)
    attributes = (ctypes.c_int * 3)(EGL_CONTEXT_PRIORITY_LEVEL_IMG, EGL_CONTEXT_PRIORITY_LOW_IMG, EGL.EGL_NONE)
    context = EGL.eglCreateContext(display, config, EGL.EGL_NO_CONTEXT, attributes)
    if not context:
        return None
    level = ctypes.c_int()
    EGL.eglQueryContext(display, context, EGL_CONTEXT_PRIORITY_LEVEL_IMG, ctypes.byref(level))

    def make_current():
        EGL.eglMakeCurrent(display, EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE, context)

    make_current()
    con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
    mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, con)
    return make_current, con, level.value == EGL_CONTEXT_PRIORITY_LOW_IMG


def gl_facts() -> dict:
    """The current GL context's renderer and version, and whether the EGL display offers context priorities."""
    from mujoco.egl import egl_ext as EGL
    from OpenGL import GL
    from robosuite.renderers.context import egl_context

    extensions = EGL.eglQueryString(egl_context.EGL_DISPLAY, EGL.EGL_EXTENSIONS) or b""
    return {"gl_renderer": GL.glGetString(GL.GL_RENDERER).decode(), "gl_version": GL.glGetString(GL.GL_VERSION).decode(),
            "egl_context_priority": b"EGL_IMG_context_priority" in extensions}


def _renderers(sim):
    """The per-kind render functions for one ``LiberoSim``, each returning the camera images it read."""
    import mujoco

    raw = sim.env.sim
    ctx = raw._render_context_offscreen
    model, data = raw.model._model, raw.data._data
    ids = [raw.model.camera_name2id(name) for name in CAMERAS]
    empty = []  # built on first use: mujoco.Renderer makes its own GL context current

    def robosuite_path(camera: str) -> np.ndarray:
        return raw.render(SIZE, SIZE, camera_name=camera)

    def update(camera_id: int) -> None:
        ctx.cam.type, ctx.cam.fixedcamid = mujoco.mjtCamera.mjCAMERA_FIXED, camera_id
        mujoco.mjv_updateScene(model, data, ctx.vopt, ctx.pert, ctx.cam, mujoco.mjtCatBit.mjCAT_ALL, ctx.scn)

    def one_read() -> list[np.ndarray]:
        for i, camera_id in enumerate(ids):
            update(camera_id)
            mujoco.mjr_render(mujoco.MjrRect(i * SIZE, 0, SIZE, SIZE), ctx.scn, ctx.con)
        rgb = np.empty((SIZE, len(ids) * SIZE, 3), dtype=np.uint8)
        mujoco.mjr_readPixels(rgb, None, mujoco.MjrRect(0, 0, len(ids) * SIZE, SIZE), ctx.con)
        return [rgb[:, i * SIZE:(i + 1) * SIZE] for i in range(len(ids))]

    low = []  # (make_current, MjrContext, granted) once built; [None] without the extension

    def low_priority() -> list[np.ndarray]:
        if not low:
            low.append(_low_priority_context(model))
        if low[0] is None:
            raise RuntimeError("no EGL_IMG_context_priority on this display")
        make_current, con, low_priority.granted = low[0]
        make_current()
        update(ids[0])
        mujoco.mjr_render(mujoco.MjrRect(0, 0, SIZE, SIZE), ctx.scn, con)
        rgb = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
        mujoco.mjr_readPixels(rgb, None, mujoco.MjrRect(0, 0, SIZE, SIZE), con)
        return [rgb]

    def empty_scene() -> list[np.ndarray]:
        if not empty:
            model = mujoco.MjModel.from_xml_string(EMPTY_XML)
            empty.extend([mujoco.Renderer(model, SIZE, SIZE), mujoco.MjData(model)])
        renderer, empty_data = empty
        renderer.update_scene(empty_data, camera="c")
        return [renderer.render()]  # makes the Renderer's context current itself

    def update_only() -> list:
        update(ids[0])
        return [None]

    def robosuite_context(render):  # robosuite renders into whatever context is current: make it its own
        def run():
            ctx.gl_ctx.make_current()
            return render()
        return run

    return {
        "agentview": robosuite_context(lambda: [robosuite_path(CAMERAS[0])]),
        "two_cameras": robosuite_context(lambda: [robosuite_path(c) for c in CAMERAS]),
        "two_cameras_one_read": robosuite_context(one_read),
        "agentview_low_priority": low_priority,
        "empty_scene": empty_scene,
        "update_only": update_only,
    }


def _worker(conn, task_id: int) -> None:
    from srpo_rl.envs.sim import LiberoSim

    sim = LiberoSim("libero_object", task_id, wrist_image=True)
    sim.reset(0)
    render = _renderers(sim)
    separate, merged = render["two_cameras"](), render["two_cameras_one_read"]()
    if not all(image.std() > 5 for image in separate):  # a scene, not a blank or garbage buffer
        raise RuntimeError("robosuite's camera path rendered a blank image")
    diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(separate, merged)]
    facts = gl_facts()
    if facts["egl_context_priority"]:
        try:
            low_image = render["agentview_low_priority"]()[0]
            facts["low_priority_granted"] = render["agentview_low_priority"].granted
            facts["low_priority_max_diff"] = int(np.abs(low_image.astype(np.int16) - separate[0]).max())
        except Exception as error:  # noqa: BLE001 - reported; its row then reports it too
            facts["low_priority_error"] = f"{type(error).__name__}: {error}"
    conn.send({**facts, "one_read_max_diff": max(int(d.max()) for d in diffs),
               "one_read_pixels_differing": sum(int(d.any(-1).sum()) for d in diffs)})
    while True:
        kind, rate, seconds = conn.recv()
        if kind is None:
            sim.close()
            return
        frames, busy, start = 0, 0.0, time.perf_counter()
        while (now := time.perf_counter()) - start < seconds:
            due = start + frames / rate if rate > 0 else now  # paced: frame k at k / rate
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            try:
                frames += len(render[kind]())
            except Exception as error:  # noqa: BLE001 - the row reports it, the other kinds still run
                conn.send({"error": f"{type(error).__name__}: {error}"})
                break
            busy += time.perf_counter() - t0
        else:
            conn.send({"frames": frames, "busy_s": busy, "wall_s": time.perf_counter() - start})


class StandIn:
    """A CUDA-graphed chain of Llama-7B-shaped MLP matmuls (bf16): the policy forward's kind of GPU work."""

    def __init__(self, tokens: int = 8 * 352, layers: int = 8):
        import torch

        self.torch = torch
        device = torch.device("cuda")
        self.x = torch.randn(tokens, 4096, device=device, dtype=torch.bfloat16)
        self.up = [torch.randn(4096, 11008, device=device, dtype=torch.bfloat16) / 64 for _ in range(layers)]
        self.down = [torch.randn(11008, 4096, device=device, dtype=torch.bfloat16) / 105 for _ in range(layers)]
        self.graph = torch.cuda.CUDAGraph()
        for _ in range(2):
            self._chain()  # warm-up: cuBLAS picks its kernels before the capture
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            self.out = self._chain()

    def _chain(self):
        h = self.x
        for up, down in zip(self.up, self.down):
            h = self.torch.nn.functional.silu(h @ up) @ down
        return h

    def run(self, seconds: float) -> float:
        """Replays back to back for ``seconds``; returns the median ms a call."""
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            self.graph.replay()
            self.torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=32, help="LIBERO processes rendering beside the forward")
    parser.add_argument("--rate", type=float, default=10.0, help="frames a second per process (0: flat out)")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each measured window")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {', '.join(KINDS)}")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")

    import torch

    cuda = torch.cuda.is_available()
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(args.procs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, i % 10), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    checks = [p.recv() for p in pipes]
    facts = {**checks[0], **{key: max(c[key] for c in checks)  # the worst process
                             for key in ("one_read_max_diff", "one_read_pixels_differing", "low_priority_max_diff")
                             if key in checks[0]}}
    stand_in = StandIn() if cuda else None
    alone = [stand_in.run(args.seconds)] if cuda else []
    rows = []
    for kind in kinds:
        for p in pipes:
            p.send((kind, args.rate, args.seconds + 2.0))
        time.sleep(1.0)  # every process at work
        beside = stand_in.run(args.seconds) if cuda else None
        replies = [p.recv() for p in pipes]
        if errors := [r["error"] for r in replies if "error" in r]:
            print(f"{kind}: {errors[0]}", flush=True)
            continue
        frames_per_s = sum(r["frames"] / r["wall_s"] for r in replies)
        row = {"kind": kind, "frames_per_s": frames_per_s,
               "worker_ms_per_frame": 1e3 * sum(r["busy_s"] for r in replies) / max(1, sum(r["frames"] for r in replies)),
               "forward_ms": beside}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if cuda:
        alone.append(stand_in.run(args.seconds))
        base = float(np.mean(alone))
        for row in rows:
            lost = 1.0 - base / row["forward_ms"]  # share of the GPU's time the renders took from the forward
            row.update(forward_ratio=base / row["forward_ms"], lost_ms_per_frame=1e3 * lost / row["frames_per_s"])
    for p in pipes:
        p.send((None, 0, 0))
    for proc in procs:
        proc.join(timeout=30)

    print(f"{'work beside the forward':>24} {'frames/s':>9} {'worker ms/frame':>16} {'forward ms':>11} "
          f"{'vs alone':>9} {'GPU ms lost/frame':>18}")
    for r in rows:
        print(f"{r['kind']:>24} {r['frames_per_s']:>9.1f} {r['worker_ms_per_frame']:>16.2f} "
              + (f"{r['forward_ms']:>11.2f} {r['forward_ratio']:>9.3f} {r['lost_ms_per_frame']:>18.3f}" if cuda else ""))
    print(f"two cameras in one read against robosuite's path: max difference {facts['one_read_max_diff']}, "
          f"{facts['one_read_pixels_differing']} pixels differ")
    if cuda:
        print(f"forward alone: {', '.join(f'{a:.2f}' for a in alone)} ms (before, after)")
    print(json.dumps({"benchmark": "render_contention", "command": command(), "machine": machine(torch.device("cuda") if cuda else None),
                      "versions": versions(), "procs": args.procs, "rate": args.rate, "seconds": args.seconds,
                      **facts, "forward_alone_ms": alone, "results": rows}))


if __name__ == "__main__":
    main()
