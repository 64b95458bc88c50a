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
- ``agentview_tiled``: ``B`` (the layout's burst) agentview frames rendered into ``B`` 256x256 tiles of one
  offscreen buffer and read in one ``mjr_readPixels``: one submission of GL work for the burst, as a process
  rendering every env's frames would submit them (the tiles' pixels are compared once with robosuite's path);
- ``agentview_burst``: ``agentview_tiled`` with the scene updated once before the burst, so that its ``B``
  ``mjr_render`` calls follow each other with no ``mjv_updateScene`` between them: the GL work as close to one
  uninterrupted submission as MuJoCo's renderer gets (a render process would update every env's scene first);
- ``clear_only``: a clear of the offscreen buffer and a one-pixel read, no scene: the cost of a GL submission
  (and its sync) that draws nothing;
- ``agentview_small_buffer``: ``agentview`` with robosuite's offscreen buffer at the frame's 256x256 instead of
  the model's 640x480 (same 4x multisampling; the same pixels, compared once);
- ``agentview_no_msaa``: ``agentview`` without multisampling (other pixels: for scale only);
- ``agentview_low_priority``: ``agentview`` from a second EGL context created at low priority
  (``EGL_IMG_context_priority``, where the driver has it), with its own ``MjrContext``: whether the GPU then
  gives the forward precedence;
- ``empty_scene``: a one-box MuJoCo model rendered at 256x256 through ``mujoco.Renderer`` (the per-render
  cost of a context that draws almost nothing);
- ``update_only``: ``mjv_updateScene`` alone, no GL call (the CPU side, for scale);
- ``simulate``: 8-step chunks of random actions with the recipe's frames (agentview every chunk, the wrist
  camera's last frame), flat out, a reset when the episode ends: the rollout's simulation without a policy;
- ``physics``: the same steps without any render, flat out: what the simulation's CPU load alone costs.

``--layouts`` sets how the same total frame rate (``--procs`` x ``--rate``) is spread over the processes, one
row each per render kind: ``P/B`` has the first ``P`` processes render bursts of ``B`` frames back to back,
their bursts spread evenly over each period; ``P/Ba`` starts every process's burst at the same instant. ``32/1``
is 32 processes each rendering on its own beat (the rollout's shape), ``1/32`` one GL context rendering 32
frames in a row: whether the loss is paid per frame or per switch between the GPU's GL and CUDA work.

A frame counts each camera image (``two_cameras`` renders two a frame; ``physics`` counts its env steps).
The render kinds run at ``--rate``, the simulation kinds flat out; the workers run at the niceness the
library gives its simulation workers. ``--standins`` sets the stand-ins (one row each per kind): one long
graph, the same work as short graphs back to back, and with the GPU idle a moment between them tell apart
a cost that depends on how long the forward holds the GPU. Prints a table and one JSON line;
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

KINDS = ("agentview", "agentview_tiled", "agentview_burst", "clear_only",
         "agentview_small_buffer", "agentview_no_msaa", "two_cameras", "two_cameras_one_read",
         "agentview_low_priority", "empty_scene", "update_only", "simulate", "physics")
FLAT_OUT = ("simulate", "physics")
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
    return {"gl_renderer": GL.glGetString(GL.GL_RENDERER).decode(),
            "gl_version": GL.glGetString(GL.GL_VERSION).decode(),
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

    def tiled(count: int, update_each: bool = True) -> list[np.ndarray]:
        columns = min(count, 8)
        rows = -(-count // columns)
        update(ids[0])
        for i in range(count):
            if update_each and i:
                update(ids[0])
            mujoco.mjr_render(mujoco.MjrRect((i % columns) * SIZE, (i // columns) * SIZE, SIZE, SIZE),
                              ctx.scn, ctx.con)
        rgb = np.empty((rows * SIZE, columns * SIZE, 3), dtype=np.uint8)
        mujoco.mjr_readPixels(rgb, None, mujoco.MjrRect(0, 0, columns * SIZE, rows * SIZE), ctx.con)
        return [rgb[(i // columns) * SIZE:(i // columns + 1) * SIZE, (i % columns) * SIZE:(i % columns + 1) * SIZE]
                for i in range(count)]

    def tiled_context(count: int, update_each: bool = True) -> list[np.ndarray]:
        """``count`` tiles, in robosuite's context with a buffer that holds them (8 a row, 4x multisampling)."""
        columns = min(count, 8)
        buffer = (columns * SIZE, -(-count // columns) * SIZE, 4)
        return robosuite_context(lambda: tiled(count, update_each), buffer)()

    def clear_only() -> list[np.ndarray]:
        from OpenGL import GL

        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, ctx.con)
        GL.glClear(GL.GL_COLOR_BUFFER_BIT | GL.GL_DEPTH_BUFFER_BIT)
        pixel = np.empty((1, 1, 3), dtype=np.uint8)
        mujoco.mjr_readPixels(pixel, None, mujoco.MjrRect(0, 0, 1, 1), ctx.con)
        return [pixel]

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

    default_buffer = (model.vis.global_.offwidth, model.vis.global_.offheight, model.vis.quality.offsamples)

    def robosuite_context(render, buffer=default_buffer):
        """``render`` in robosuite's GL context (robosuite renders into whatever context is current) with its
        offscreen buffer ``(width, height, samples)`` (rebuilt when another kind changed it)."""
        def run():
            ctx.gl_ctx.make_current()
            if (ctx.con.offWidth, ctx.con.offHeight, ctx.con.offSamples) != buffer:
                model.vis.global_.offwidth, model.vis.global_.offheight, model.vis.quality.offsamples = buffer
                ctx.con.free()
                ctx._set_mujoco_context_and_buffers()
            return render()
        return run

    rng = np.random.default_rng(0)

    def simulate() -> list:
        if sim._over:
            sim.reset(0)
        sim.step_chunk(rng.uniform(-1, 1, (8, 7)))
        return [None, None]  # the agentview frame, the wrist camera's

    def physics() -> list:
        for _ in range(8):
            sim._step(rng.uniform(-1, 1, 7), False, False)  # cameras closed: no render
        return [None] * 8

    return {
        "simulate": robosuite_context(simulate),
        "physics": physics,
        "agentview": robosuite_context(lambda: [robosuite_path(CAMERAS[0])]),
        "agentview_small_buffer": robosuite_context(lambda: [robosuite_path(CAMERAS[0])], (SIZE, SIZE, 4)),
        "agentview_no_msaa": robosuite_context(lambda: [robosuite_path(CAMERAS[0])], default_buffer[:2] + (0,)),
        "two_cameras": robosuite_context(lambda: [robosuite_path(c) for c in CAMERAS]),
        "two_cameras_one_read": robosuite_context(one_read),
        "agentview_tiled": tiled_context,  # takes the tile count
        "agentview_burst": lambda count: tiled_context(count, update_each=False),
        "clear_only": robosuite_context(clear_only),
        "agentview_low_priority": low_priority,
        "empty_scene": empty_scene,
        "update_only": update_only,
    }


def _worker(conn, task_id: int) -> None:
    import os

    from srpo_rl.envs.sim import LiberoSim
    from srpo_rl.envs.workers import WORKER_NICENESS

    os.nice(WORKER_NICENESS)
    sim = LiberoSim("libero_object", task_id, wrist_image=True)
    sim.reset(0)
    render = _renderers(sim)
    separate, merged = render["two_cameras"](), render["two_cameras_one_read"]()
    if not all(image.std() > 5 for image in separate):  # a scene, not a blank or garbage buffer
        raise RuntimeError("robosuite's camera path rendered a blank image")
    diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(separate, merged)]
    facts = gl_facts()
    for kind in ("agentview_small_buffer", "agentview_no_msaa"):
        facts[f"{kind}_max_diff"] = int(np.abs(render[kind]()[0].astype(np.int16) - separate[0]).max())
    tiles = render["agentview_tiled"](3)
    facts["tiled_max_diff"] = max(int(np.abs(t.astype(np.int16) - separate[0]).max()) for t in tiles)
    tiles = render["agentview_burst"](3)
    facts["burst_max_diff"] = max(int(np.abs(t.astype(np.int16) - separate[0]).max()) for t in tiles)
    render["agentview"]()  # the model's own buffer back
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
        kind, rate, burst, start, seconds = conn.recv()
        if kind is None:
            sim.close()
            os._exit(0)  # robosuite's GL objects would be collected after EGL's atexit teardown: noise, not errors
        frames, busy, calls = 0, 0.0, 0
        # ``start``: this worker's first burst on the clock every process shares (perf_counter is CLOCK_MONOTONIC)
        time.sleep(max(0.0, start - time.perf_counter()))
        while (now := time.perf_counter()) - start < seconds:
            due = start + calls * burst / rate if rate > 0 else now  # paced: burst k at k * burst / rate
            if due > now:
                time.sleep(due - now)
            t0 = time.perf_counter()
            try:
                if kind in ("agentview_tiled", "agentview_burst"):  # the burst in one submission
                    frames += len(render[kind](burst))
                else:
                    for _ in range(burst):
                        frames += len(render[kind]())
            except Exception as error:  # noqa: BLE001 - the row reports it, the other kinds still run
                conn.send({"error": f"{type(error).__name__}: {error}"})
                break
            calls += 1
            busy += time.perf_counter() - t0
        else:
            conn.send({"frames": frames, "busy_s": busy, "wall_s": time.perf_counter() - start})


class StandIn:
    """A CUDA-graphed chain of Llama-7B-shaped MLP matmuls (bf16): the policy forward's kind of GPU work.

    ``spec`` is ``"L"`` (one graph of ``L`` layers), ``"L/k"`` (graphs of ``k`` layers replayed back to back:
    the GPU never idles between them) or ``"L/ks"`` (the same with a host synchronisation after each graph:
    the GPU idles a moment between them).
    """

    def __init__(self, spec: str, tokens: int = 8 * 352, distinct: int = 8):
        import torch

        self.torch, self.spec = torch, spec
        layers, _, split = spec.partition("/")
        self.sync_between = split.endswith("s")
        per_graph = int(split.rstrip("s") or layers)
        device = torch.device("cuda")
        self.x = torch.randn(tokens, 4096, device=device, dtype=torch.bfloat16)
        # ``distinct`` weight pairs, used in turn: a long chain's time without its memory
        self.up = [torch.randn(4096, 11008, device=device, dtype=torch.bfloat16) / 64 for _ in range(distinct)]
        self.down = [torch.randn(11008, 4096, device=device, dtype=torch.bfloat16) / 105 for _ in range(distinct)]
        self._chain(self.x, per_graph)  # warm-up: cuBLAS picks its kernels before the capture
        torch.cuda.synchronize()
        self.graphs, self.outputs = [], [self.x]  # each graph reads the last one's output: kept alive
        for _ in range(int(layers) // per_graph):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs.append(self._chain(self.outputs[-1], per_graph))
            self.graphs.append(graph)

    def _chain(self, h, layers: int):
        for i in range(layers):
            h = self.torch.nn.functional.silu(h @ self.up[i % len(self.up)]) @ self.down[i % len(self.down)]
        return h

    def run(self, seconds: float) -> float:
        """Runs the chain back to back for ``seconds``; returns the mean ms a chain (the throughput)."""
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for graph in self.graphs:
                graph.replay()
                if self.sync_between:
                    self.torch.cuda.synchronize()
            self.torch.cuda.synchronize()
            calls += 1
        return 1e3 * (time.perf_counter() - start) / calls


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=32, help="LIBERO processes rendering beside the forward")
    parser.add_argument("--rate", type=float, default=10.0, help="frames a second per process (0: flat out)")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each measured window")
    parser.add_argument("--standins", default="112,112/8,112/8s", type=lambda v: v.split(","),
                        help="the stand-ins, comma-separated: L, L/k or L/ks (see StandIn; 8 layers: about 6 ms "
                             "on an H100)")
    parser.add_argument("--kinds", default=",".join(KINDS), type=lambda v: v.split(","),
                        help=f"comma-separated, from {', '.join(KINDS)}")
    parser.add_argument("--layouts", default=None, type=lambda v: v.split(","),
                        help="comma-separated P/B or P/Ba (see above; default: --procs/1, each process on its beat)")
    args = parser.parse_args()
    for kind in args.kinds:
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    args.layouts = args.layouts or [f"{args.procs}/1"]
    for layout in args.layouts:
        try:
            procs, burst, aligned = parse_layout(layout)
        except ValueError:
            parser.error(f"bad layout {layout!r}: expected P/B or P/Ba with whole numbers, e.g. 32/1 or 1/32a")
        if not 1 <= procs <= args.procs or burst < 1:
            parser.error(f"layout {layout!r}: P must be 1..{args.procs} (--procs) and B at least 1")
    return args


def parse_layout(layout: str) -> tuple[int, int, bool]:
    """``"P/B"`` or ``"P/Ba"`` -> (processes, frames a burst, bursts aligned)."""
    procs, _, burst = layout.partition("/")
    aligned = burst.endswith("a")
    return int(procs), int(burst.removesuffix("a")), aligned


def start_workers(n: int) -> tuple[list, list, dict]:
    """``n`` worker processes (tasks 0-9 in turn), their pipes, and their one-off checks (the worst process)."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(n):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, i % 10), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    checks = [p.recv() for p in pipes]
    worst = {key: max(c[key] for c in checks) for key in checks[0] if key.endswith(("_diff", "_differing"))}
    return pipes, procs, {**checks[0], **worst}


def measure(pipes: list, stand_ins: dict, kind: str, layout: str, args) -> list[dict]:
    """The workers of ``layout`` do ``kind`` while each stand-in runs in turn; one row per stand-in (one without
    CUDA)."""
    flat_out = kind in FLAT_OUT
    procs, burst, aligned = (len(pipes), 1, False) if flat_out else parse_layout(layout)
    rate = 0.0 if flat_out else args.rate * args.procs / procs  # the same total frame rate in every layout
    period, start = burst / rate if rate else 0.0, time.perf_counter() + 0.5
    for i, p in enumerate(pipes[:procs]):
        offset = 0.0 if aligned else period * i / procs  # spread: the bursts evenly over the period
        p.send((kind, rate, burst, start + offset, args.seconds * max(1, len(stand_ins)) + 2.0))
    time.sleep(1.5)  # every process at work
    beside = {spec: f.run(args.seconds) for spec, f in stand_ins.items()}
    replies = [p.recv() for p in pipes[:procs]]
    if errors := [r["error"] for r in replies if "error" in r]:
        print(f"{kind}: {errors[0]}", flush=True)
        return []
    frames_per_s = sum(r["frames"] / r["wall_s"] for r in replies)
    worker_ms = 1e3 * sum(r["busy_s"] for r in replies) / max(1, sum(r["frames"] for r in replies))
    return [{"kind": kind, "layout": "flat out" if flat_out else layout, "rate": rate,
             "frames_per_s": frames_per_s, "worker_ms_per_frame": worker_ms,
             "standin": spec, "forward_ms": beside.get(spec)} for spec in beside or [None]]


def add_losses(rows: list[dict], alone: dict) -> None:
    """Each row's stand-in speed against alone (mean of before and after) and the GPU ms lost a frame."""
    for row in rows:
        if row["forward_ms"] is not None:
            base = float(np.mean(alone[row["standin"]]))
            lost = 1.0 - base / row["forward_ms"]  # share of the GPU's time the work beside took from the forward
            row.update(forward_ratio=base / row["forward_ms"], lost_ms_per_frame=1e3 * lost / row["frames_per_s"])


def print_table(rows: list[dict], facts: dict, alone: dict) -> None:
    print(f"{'work beside the forward':>24} {'layout':>8} {'frames/s':>9} {'worker ms/frame':>16} {'stand-in':>9} "
          f"{'forward ms':>11} {'vs alone':>9} {'ms lost/frame':>14}")
    for r in rows:
        measured = "forward_ratio" in r
        print(f"{r['kind']:>24} {r['layout']:>8} {r['frames_per_s']:>9.1f} {r['worker_ms_per_frame']:>16.2f} "
              + (f"{r['standin']:>9} {r['forward_ms']:>11.2f} {r['forward_ratio']:>9.3f} "
                 f"{r['lost_ms_per_frame']:>14.3f}" if measured else ""))
    print(f"two cameras in one read against robosuite's path: max difference {facts['one_read_max_diff']}, "
          f"{facts['one_read_pixels_differing']} pixels differ")
    for spec, times in alone.items():
        print(f"stand-in {spec} alone: {', '.join(f'{a:.2f}' for a in times)} ms (before, after)")


def main() -> None:
    args = parse_args()
    import torch

    cuda = torch.cuda.is_available()
    pipes, procs, facts = start_workers(args.procs)
    stand_ins = {spec: StandIn(spec) for spec in args.standins} if cuda else {}
    alone = {spec: [f.run(args.seconds)] for spec, f in stand_ins.items()}
    rows = []
    for kind in args.kinds:
        for layout in args.layouts if kind not in FLAT_OUT else ["flat out"]:
            for row in measure(pipes, stand_ins, kind, layout, args):
                print(json.dumps(row), flush=True)
                rows.append(row)
    for spec, f in stand_ins.items():
        alone[spec].append(f.run(args.seconds))
    add_losses(rows, alone)
    for p in pipes:
        p.send((None, 0, 0, 0, 0))
    for proc in procs:
        proc.join(timeout=30)
    print_table(rows, facts, alone)
    print(json.dumps({"benchmark": "render_contention", "command": command(),
                      "machine": machine(torch.device("cuda") if cuda else None), "versions": versions(),
                      "procs": args.procs, "rate": args.rate, "layouts": args.layouts, "seconds": args.seconds, **facts,
                      "standins": args.standins, "forward_alone_ms": alone, "results": rows}))


if __name__ == "__main__":
    main()
