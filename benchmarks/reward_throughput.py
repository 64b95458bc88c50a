"""Throughput of the SRPO reward's video embedder (V-JEPA 2): trajectories per second.

Compares fp16 autocast on/off, the encoder resident on the device vs offloaded to the CPU between
calls, videos per forward, the attention kernel (PyTorch's SDPA backends: its own pick, flash,
cuDNN, memory-efficient) and ``torch.compile`` of the whole encoder or of each layer
(``VideoEmbedder.compile_layers``, what the recipe's ``model.compile_blocks=true`` does). The baseline
is the recipe's setting (fp16, resident, ``--batch`` videos per forward, SDPA's pick); every row reports
its ratio to it and how far its embeddings are from the baseline's (max |diff| over the max |embedding|).

    python benchmarks/reward_throughput.py            # ViT-g/16 at 384 px, 64 frames, random weights, CUDA
    python benchmarks/reward_throughput.py --img-size 256   # the 256-px ViT-g (another reward model)
    python benchmarks/reward_throughput.py --tiny     # a tiny V-JEPA 2 on the CPU (checks the script)

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import sklearn
import torch
import torchrl
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import VJEPA2Config, VJEPA2Model

from _common import command, machine

from srpo_rl.models.vjepa2 import VideoEmbedder, load_vjepa2, write_tiny_vjepa2_checkpoint


def vitg(device: torch.device, img_size: int = 384) -> VJEPA2Model:
    """ViT-g/16 as the recipe builds it (384 px; 256 px is ``vjepa2-vitg-fpc64-256``), random weights (N(0, 0.02)),
    fp32, on ``device``."""
    config = VJEPA2Config(
        patch_size=16, crop_size=img_size, frames_per_clip=64, tubelet_size=2, hidden_size=1408,
        num_attention_heads=22, num_hidden_layers=40, mlp_ratio=48 / 11, pred_num_hidden_layers=0,
    )
    with torch.device("meta"):
        model = VJEPA2Model(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else (p.fill_(1.0) if "norm" in name else p.zero_())
    model.set_attn_implementation("sdpa")
    return model.eval()


def measure(embedder: VideoEmbedder, videos: list[torch.Tensor], repeats: int) -> tuple[float, float | None, torch.Tensor]:
    """Median trajectories / s over ``repeats`` calls on all ``videos`` (after one warm-up call), the peak
    GPU memory and the embeddings."""
    cuda = embedder.device.type == "cuda"
    embedder(videos[: min(embedder.batch_size, len(videos))])  # warm-up at full batch (a compiled row compiles)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = embedder(videos)
        if cuda:
            torch.cuda.synchronize()
        rates.append(len(videos) / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(rates), peak, out


class CompiledVideoEmbedder(VideoEmbedder):
    """The embedder with its encoder's forward through ``torch.compile`` (the shared model is left as it is)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._compiled = torch.compile(self.encoder.encoder)

    @torch.no_grad()
    def encode(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.enable_fp16):
            tokens = self._compiled(pixel_values_videos=pixel_values_videos).last_hidden_state
        return tokens.float().mean(dim=1)


def sdpa_backend(name: str | None):
    """A context that restricts SDPA to one backend (``None``: PyTorch's own choice)."""
    if name is None:
        return contextlib.nullcontext()
    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]])


# key -> (name, fp16, offload, videos per forward (None: --batch), SDPA backend, torch.compile: of the
# encoder ("encoder") or of each layer ("layers"), or none)
ROWS = {
    "recipe": ("fp16, resident, batched (recipe)", True, False, None, None, False),
    "fp32": ("fp32, resident, batched", False, False, None, None, False),
    "single": ("fp16, resident, one video per forward", True, False, 1, None, False),
    "offload": ("fp16, offloaded, batched", True, True, None, None, False),
    "flash": ("fp16, flash attention only", True, False, None, "flash", False),
    "cudnn": ("fp16, cuDNN attention only", True, False, None, "cudnn", False),
    "efficient": ("fp16, memory-efficient attention only", True, False, None, "efficient", False),
    "compile": ("fp16, torch.compile(encoder)", True, False, None, None, "encoder"),
    "compile_layers": ("fp16, compile_layers() (the recipe's)", True, False, None, None, "layers"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random V-JEPA 2 on the CPU")
    parser.add_argument("--img-size", type=int, choices=(256, 384), default=384,
                        help="the encoder's input side: 384 (the recipe's vitg-384) or 256 (vjepa2-vitg-fpc64-256)")
    parser.add_argument("--trajectories", type=int, default=None, help="videos per measured call (default 32; tiny 8)")
    parser.add_argument("--video-len", type=int, default=200, help="frames per trajectory video before sampling")
    parser.add_argument("--frame-size", type=int, default=256, help="side of the rendered frames")
    parser.add_argument("--batch", type=int, default=8, help="videos per encoder forward in the batched rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--rows", default="recipe,fp32,single,offload",
                        help=f"comma-separated, from {','.join(ROWS)}; 'recipe' (the baseline) always runs first")
    args = parser.parse_args()

    rows = ["recipe", *[r for r in args.rows.split(",") if r != "recipe"]]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown --rows {unknown}; choose from {', '.join(ROWS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if not args.tiny and args.device is None and device.type != "cuda":  # a ViT-g on the CPU takes hours
        parser.exit(1, "the ViT-g benchmark needs a CUDA device; pass --tiny to check the script on the CPU "
                       "(or --device cpu to time the ViT-g there anyway)\n")
    n = args.trajectories or (8 if args.tiny else 32)
    if args.tiny:
        img_size, tmp = 48, tempfile.mkdtemp()
        write_tiny_vjepa2_checkpoint(Path(tmp) / "tiny.pt")
        model, model_name = load_vjepa2(Path(tmp) / "tiny.pt", img_size=img_size), "tiny (128-d, 2 blocks)"
    else:
        img_size, model = args.img_size, vitg(device, args.img_size)
        model_name = f"ViT-g/16 {img_size}px (random weights)"
    gen = torch.Generator().manual_seed(0)
    size = args.frame_size
    videos = [torch.randint(0, 256, (args.video_len, 3, size, size), dtype=torch.uint8, generator=gen) for _ in range(n)]

    results, reference = [], None
    for row in rows:
        name, fp16, offload, batch, backend, compiled = ROWS[row]
        embedder = (CompiledVideoEmbedder if compiled == "encoder" else VideoEmbedder)(
            model, img_size=img_size, num_frames=64, enable_fp16=fp16, offload=offload, device=device,
            batch_size=batch or args.batch)
        if compiled == "layers":
            embedder.compile_layers()
        t0 = time.perf_counter()
        with sdpa_backend(backend):
            try:
                rate, peak, out = measure(embedder, videos, args.repeats)
            except RuntimeError as error:  # a backend that does not take these inputs on this GPU
                print(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
                results.append({"config": name, "row": row, "error": str(error).splitlines()[0]})
                continue
        reference = out if reference is None else reference
        results.append({"config": name, "row": row, "fp16": fp16, "offload": offload, "batch_size": batch or args.batch,
                        "sdpa_backend": backend or "default", "compiled": compiled,
                        "traj_per_s": rate, "s_per_512_traj": 512 / rate, "peak_gpu_gib": peak,
                        "row_wall_s": time.perf_counter() - t0,
                        "max_abs_diff_vs_baseline_rel": float((out - reference).abs().max() / reference.abs().max())})
        model.to(device)  # an offloaded row leaves the shared encoder on the CPU
        for layer in model.encoder.layer:  # compile_layers() patched the shared layers: eager again for the next row
            layer.__dict__.pop("forward", None)
    base = results[0]["traj_per_s"]
    for r in results:
        if "traj_per_s" in r:
            r["ratio_vs_baseline"] = r["traj_per_s"] / base

    print(f"V-JEPA 2 reward embedder: {model_name}, {img_size}px, 64 frames, {n} videos of {args.video_len} "
          f"frames {size}x{size}, device {device} ({machine(device)['gpu'] or machine()['cpu']})")
    print(f"{'config':40s} {'traj/s':>9s} {'s/512 traj':>11s} {'vs baseline':>12s} {'peak GiB':>9s} {'rel diff':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['config']:40s} failed: {r['error'][:80]}")
            continue
        peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{r['config']:40s} {r['traj_per_s']:9.2f} {r['s_per_512_traj']:11.1f} "
              f"{r['ratio_vs_baseline']:11.2f}x {peak:>9s} {r['max_abs_diff_vs_baseline_rel']:9.1e}")
    print(json.dumps({
        "benchmark": "reward_throughput",
        "model": model_name, "img_size": img_size, "num_frames": 64, "trajectories": n,
        "video_len": args.video_len, "frame_size": size, "device": str(device),
        "baseline": results[0]["config"], "results": results, "machine": machine(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "torchrl": torchrl.__version__,
                     "sklearn": sklearn.__version__, "cuda": torch.version.cuda},
        "command": command(),
    }))


if __name__ == "__main__":
    main()
