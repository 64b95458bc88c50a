"""V-JEPA 2 video encoder on transformers' ``VJEPA2Model``, and the SRPO video embedder.

Two checkpoint layouts load into the same ``VJEPA2Model``:

- the original ``vitg-384.pt`` file of the V-JEPA 2 release: a ``torch.save`` dict whose ``"encoder"``
  entry holds ``module.backbone.``-prefixed keys with a fused ``qkv`` projection. The config is
  inferred from the tensor shapes (head dim 64, as in the original ViTs);
- a Hugging Face directory (``config.json`` + weights), e.g. ``facebook/vjepa2-vitg-fpc64-384``.

:class:`VideoEmbedder` turns a trajectory's frames into one vector exactly as the SRPO reference does:
64 frames sampled by ``linspace`` (or looped when shorter), short side resized to
``int(256 / 224 * img_size)`` (bilinear), center crop, ``/ 255``, ImageNet mean/std, encoder, mean over
all tokens.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import VJEPA2Config, VJEPA2Model
from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2RopeAttention

__all__ = [
    "VideoEmbedder",
    "convert_original_vjepa2_state_dict",
    "load_vjepa2",
    "sample_frame_indices",
    "set_vjepa2_crop_size",
    "vjepa2_config_from_state_dict",
    "write_tiny_vjepa2_checkpoint",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The head count is not stored in the checkpoint: the released V-JEPA 2 encoders' by width (ViT-L/16 vit_large,
# ViT-H/16 vit_huge with 80-dim heads, ViT-g/16 vit_giant_xformers), else heads of 64 dims as most of the original ViTs
RELEASED_HEADS = {1024: 16, 1280: 16, 1408: 22}
ORIGINAL_HEAD_DIM = 64

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Same string replacement as every reader of the release (DDP + MultiSeqWrapper prefixes).
    return {k.replace("module.", "").replace("backbone.", ""): v for k, v in state_dict.items()}


def vjepa2_config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    img_size: int = 384,
    num_frames: int = 64,
    num_heads: int | None = None,
) -> VJEPA2Config:
    """Infers a :class:`~transformers.VJEPA2Config` from an original-layout encoder state dict.

    Hidden size, in-channels, tubelet and patch size come from the patch-embedding Conv3d, depth from
    the ``blocks.N`` indices, the MLP ratio from ``fc1``, the head count from the released encoder of that
    width (ViT-L 16, ViT-H 16, ViT-g 22), else from 64-dim heads, unless ``num_heads`` is given. ``crop_size`` is set to ``img_size`` because transformers derives the RoPE
    grid from it (it must equal the size of the frames fed to the model).

    Examples:
        >>> import torch
        >>> sd = {"patch_embed.proj.weight": torch.zeros(128, 3, 2, 16, 16),
        ...       "blocks.0.mlp.fc1.weight": torch.zeros(192, 128)}
        >>> cfg = vjepa2_config_from_state_dict(sd, img_size=48)
        >>> cfg.hidden_size, cfg.num_attention_heads, cfg.mlp_ratio, cfg.crop_size
        (128, 2, 1.5, 48)
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise KeyError(
            "no 'patch_embed.proj.weight' in the encoder state dict; found keys such as "
            f"{sorted(state_dict)[:5]}: is this a V-JEPA 2 encoder in the original layout?"
        )
    hidden, in_chans, tubelet, patch, patch_w = state_dict["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"non-square patches {patch}x{patch_w} are not supported by VJEPA2Model")
    if "pos_embed" in state_dict:
        raise ValueError("this encoder has a learned 'pos_embed' (no RoPE); VJEPA2Model only supports RoPE encoders")
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))), default=-1)
    if depth == 0:
        raise KeyError("no 'blocks.N.*' keys in the encoder state dict")
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:  # guard against float rounding in int(hidden * ratio)
        mlp_ratio = (mlp_hidden + 0.5) / hidden
    num_heads = num_heads or RELEASED_HEADS.get(hidden)
    if num_heads is None:
        if hidden % ORIGINAL_HEAD_DIM:
            raise ValueError(f"hidden size {hidden} is not a multiple of 64; pass num_heads explicitly")
        num_heads = hidden // ORIGINAL_HEAD_DIM
    return VJEPA2Config(
        patch_size=patch,
        crop_size=img_size,
        frames_per_clip=num_frames,
        tubelet_size=tubelet,
        hidden_size=hidden,
        in_chans=in_chans,
        num_attention_heads=num_heads,
        num_hidden_layers=depth,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        # The original file's encoder entry has no predictor: keep an empty one.
        pred_num_hidden_layers=0,
    )


def convert_original_vjepa2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps original V-JEPA 2 encoder keys to ``VJEPA2Model`` keys (fused ``qkv`` split into thirds).

    ``module.``/``backbone.`` prefixes are stripped first. Keys that do not belong to a RoPE encoder are
    passed through unchanged so that :func:`load_vjepa2` can report them.

    Examples:
        >>> import torch
        >>> out = convert_original_vjepa2_state_dict({"module.backbone.blocks.0.attn.qkv.weight": torch.zeros(6, 2)})
        >>> [(k, tuple(v.shape)) for k, v in sorted(out.items())][0]
        ('encoder.layer.0.attention.key.weight', (2, 2))
        >>> sorted(k.split(".")[-2] for k in out)
        ['key', 'query', 'value']
    """
    out = {}
    for key, value in _strip_prefixes(state_dict).items():
        if key.startswith("patch_embed."):
            out["encoder.embeddings.patch_embeddings." + key[len("patch_embed.") :]] = value
        elif key.startswith("norm."):
            out["encoder.layernorm." + key[len("norm.") :]] = value
        elif m := _BLOCK_KEY.match(key):
            prefix, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.qkv."):
                # rows are ordered q, k, v (heads contiguous within each)
                suffix = rest[len("attn.qkv.") :]
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}attention.{name}.{suffix}"] = part
            else:
                out[prefix + rest.replace("attn.", "attention.", 1)] = value
        else:
            out[key] = value
    return out


def _check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if given[k].shape != expected[k].shape
    )
    _raise_on_mismatch(source, missing, unexpected, mismatched)


def _raise_on_mismatch(source: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    if missing or unexpected or mismatched:
        raise ValueError(
            f"V-JEPA 2 checkpoint {source} does not match VJEPA2Model:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}"
        )


def _load_original(
    path: Path, *, img_size: int, num_frames: int, num_heads: int | None, checkpoint_key: str
) -> VJEPA2Model:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint_key not in checkpoint:
        raise KeyError(
            f"no {checkpoint_key!r} entry in {path}; top-level keys: {sorted(checkpoint)}. "
            "Pass checkpoint_key='encoder' (what SRPO uses) or 'target_encoder'."
        )
    raw = _strip_prefixes(checkpoint[checkpoint_key])
    config = vjepa2_config_from_state_dict(raw, img_size=img_size, num_frames=num_frames, num_heads=num_heads)
    converted = convert_original_vjepa2_state_dict(raw)
    # Build on the meta device: initialising a 1B-parameter encoder only to overwrite it is slow.
    with torch.device("meta"):
        model = VJEPA2Model(config)
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    _check_keys(expected, converted, str(path))
    # The (layer-less) predictor is not in the file: take freshly initialised weights for it.
    predictor = {f"predictor.{k}": v for k, v in type(model.predictor)(config).state_dict().items()}
    model.load_state_dict({**converted, **predictor}, strict=True, assign=True)
    return model


def load_vjepa2(
    path: str | Path,
    *,
    img_size: int = 384,
    num_frames: int = 64,
    num_heads: int | None = None,
    checkpoint_key: str = "encoder",
    attn_implementation: str = "sdpa",
) -> VJEPA2Model:
    """Loads a V-JEPA 2 encoder from the original ``.pt`` file or a Hugging Face directory.

    Args:
        path: a file (original layout: the ``checkpoint_key`` entry, ``module.``/``backbone.`` prefixes,
            fused ``qkv``) or a directory with ``config.json`` (Hugging Face layout).
        img_size: side of the frames that will be fed; written to ``config.crop_size`` because
            transformers derives the RoPE grid from it.
        num_frames: frames per clip (``config.frames_per_clip``).
        num_heads: attention heads of an original file (default: hidden size / 64, as in the release).
        checkpoint_key: entry of the original file to read (SRPO uses ``"encoder"``).
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``).

    Returns:
        a ``VJEPA2Model`` in eval mode with float32 weights on the CPU. A file read from the original
        layout carries the encoder only (its predictor has no layers).

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped keys when the checkpoint does not
            match the model.

    Examples:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> write_tiny_vjepa2_checkpoint(os.path.join(d, "tiny.pt"))
        >>> model = load_vjepa2(os.path.join(d, "tiny.pt"), img_size=48)
        >>> model.config.hidden_size, model.config.crop_size
        (128, 48)
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is a directory without config.json: not a Hugging Face V-JEPA 2 checkpoint"
            )
        model, info = VJEPA2Model.from_pretrained(
            path,
            crop_size=img_size,
            frames_per_clip=num_frames,
            attn_implementation=attn_implementation,
            dtype=torch.float32,
            output_loading_info=True,
        )
        _raise_on_mismatch(
            str(path),
            sorted(info.get("missing_keys", ())),
            sorted(info.get("unexpected_keys", ())),
            sorted(str(k) for k in info.get("mismatched_keys", ())),
        )
    elif path.is_file():
        model = _load_original(
            path, img_size=img_size, num_frames=num_frames, num_heads=num_heads, checkpoint_key=checkpoint_key
        )
        model = model.float()
        model.set_attn_implementation(attn_implementation)
    else:
        raise FileNotFoundError(
            f"no V-JEPA 2 checkpoint at {path} (expected a .pt file or a Hugging Face directory)"
        )
    return model.eval()


def _tiny_original_encoder(seed: int, hidden: int, depth: int, mlp_hidden: int, patch: int, tubelet: int) -> dict:
    # Non-trivial norms and biases so that every tensor's mapping is exercised by the tests.
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    sd = {
        "patch_embed.proj.weight": randn(hidden, 3, tubelet, patch, patch),
        "patch_embed.proj.bias": randn(hidden),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": randn(hidden, std=0.1, mean=1.0),
            b + "norm1.bias": randn(hidden, std=0.1),
            b + "attn.qkv.weight": randn(3 * hidden, hidden, std=0.1),
            b + "attn.qkv.bias": randn(3 * hidden, std=0.1),
            b + "attn.proj.weight": randn(hidden, hidden),
            b + "attn.proj.bias": randn(hidden),
            b + "norm2.weight": randn(hidden, std=0.1, mean=1.0),
            b + "norm2.bias": randn(hidden, std=0.1),
            b + "mlp.fc1.weight": randn(mlp_hidden, hidden),
            b + "mlp.fc1.bias": randn(mlp_hidden),
            b + "mlp.fc2.weight": randn(hidden, mlp_hidden),
            b + "mlp.fc2.bias": randn(hidden),
        }
    sd |= {"norm.weight": randn(hidden, std=0.1, mean=1.0), "norm.bias": randn(hidden, std=0.1)}
    return sd


def write_tiny_vjepa2_checkpoint(
    path: str | Path,
    layout: Literal["original", "hf"] = "original",
    seed: int = 0,
    *,
    hidden_size: int = 128,
    depth: int = 2,
    mlp_hidden: int = 192,
    patch_size: int = 16,
    tubelet_size: int = 2,
    img_size: int = 48,
    num_frames: int = 64,
) -> None:
    """Writes a tiny random V-JEPA 2 encoder in the original ``.pt`` layout or as a Hugging Face directory.

    Both layouts hold the same encoder weights for the same ``seed``. The original layout is a file with
    an ``"encoder"`` entry of ``module.backbone.``-prefixed keys and fused ``qkv``; the ``"hf"`` layout is
    a ``save_pretrained`` directory (its tiny predictor is randomly initialised).

    Examples:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> write_tiny_vjepa2_checkpoint(os.path.join(d, "hf"), layout="hf")
        >>> sorted(os.listdir(os.path.join(d, "hf")))
        ['config.json', 'model.safetensors']
    """
    if layout not in ("original", "hf"):
        raise ValueError(f"unknown layout {layout!r}; choose one of 'original', 'hf'")
    path = Path(path)
    encoder = _tiny_original_encoder(seed, hidden_size, depth, mlp_hidden, patch_size, tubelet_size)
    if layout == "original":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"encoder": {f"module.backbone.{k}": v for k, v in encoder.items()}, "epoch": 0}, path)
        return
    config = vjepa2_config_from_state_dict(encoder, img_size=img_size, num_frames=num_frames)
    config.pred_hidden_size, config.pred_num_attention_heads, config.pred_num_hidden_layers = 64, 1, 1
    torch.manual_seed(seed)
    model = VJEPA2Model(config)
    model.load_state_dict(convert_original_vjepa2_state_dict(encoder), strict=False)
    model.save_pretrained(path)


def set_vjepa2_crop_size(model: VJEPA2Model, img_size: int) -> None:
    """Makes ``model`` derive its RoPE positions for ``img_size x img_size`` inputs (in place).

    transformers computes the row / column of each token from ``config.crop_size // patch_size``
    (fixed in every attention layer at construction), the original from the actual input grid: both
    agree only when ``crop_size`` is the size of the frames fed.
    """
    layers = [m for m in model.modules() if isinstance(m, VJEPA2RopeAttention)]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no VJEPA2RopeAttention layers: not a V-JEPA 2 model")
    for layer in layers:
        layer.grid_size = img_size // model.config.patch_size
    model.config.crop_size = img_size


def sample_frame_indices(num_available: int, num_frames: int = 64) -> np.ndarray:
    """Frame indices of the reference: ``linspace`` when the video is long enough, else looped.

    Examples:
        >>> sample_frame_indices(5, 8).tolist()
        [0, 1, 2, 3, 4, 0, 1, 2]
        >>> sample_frame_indices(10, 4).tolist()
        [0, 3, 6, 9]
    """
    if num_available >= num_frames:
        return np.linspace(0, num_available - 1, num=num_frames, dtype=int)
    return np.resize(np.arange(num_available), num_frames)


def _contiguous_first(forward, hidden_states: torch.Tensor, *args, **kwargs):
    # The patch embedding hands the first layer a transposed view; the later layers get contiguous tensors.
    # One layout for all of them keeps every layer on the same compiled graph (a copy of one activation).
    return forward(hidden_states.contiguous(), *args, **kwargs)


class VideoEmbedder(nn.Module):
    """Embeds videos (uint8 frames) into one float32 vector each with a V-JEPA 2 encoder.

    Args:
        encoder: a ``VJEPA2Model`` or a checkpoint path for :func:`load_vjepa2`.
        img_size: side of the square frames fed to the encoder (recipe: 384). The encoder's
            ``config.crop_size`` is set to it (see :func:`set_vjepa2_crop_size`).
        num_frames: frames sampled per video (recipe: 64).
        enable_fp16: run the encoder under fp16 autocast (recipe: True).
        offload: keep the encoder on the CPU and move it to ``device`` only during a call.
        center_crop: resize the short side to ``int(256 / 224 * img_size)`` then center-crop (the
            reference); ``False`` resizes the whole frame to ``img_size x img_size`` instead.
        device: where the encoder runs (default: CUDA when available).
        batch_size: videos per encoder forward.
        progress: ``True`` or the bar's label shows a bar of the videos embedded in each call from the main
            thread (the recipe's reward embeds hundreds of trajectories an iteration, 0.3 s each on an H100).

    Calling it with a sequence of ``[T_i, 3, H, W]`` uint8 tensors returns a ``[len(videos), D]``
    float32 CPU tensor; an empty video (``T_i == 0``) gives an all-zero row.

    Examples:
        >>> import tempfile, os, torch
        >>> d = tempfile.mkdtemp()
        >>> write_tiny_vjepa2_checkpoint(os.path.join(d, "tiny.pt"))
        >>> embedder = VideoEmbedder(os.path.join(d, "tiny.pt"), img_size=48, enable_fp16=False, device="cpu")
        >>> video = torch.randint(0, 256, (20, 3, 64, 64), dtype=torch.uint8)
        >>> videos = [video, video[:0]]  # the second one is empty
        >>> emb = embedder(videos)
        >>> emb.shape, bool(emb[1].eq(0).all())
        (torch.Size([2, 128]), True)
    """

    def __init__(
        self,
        encoder: VJEPA2Model | str | Path,
        *,
        img_size: int = 384,
        num_frames: int = 64,
        enable_fp16: bool = True,
        offload: bool = False,
        center_crop: bool = True,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        progress: bool | str = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VJEPA2Model):
            encoder = load_vjepa2(encoder, img_size=img_size, num_frames=num_frames)
        if img_size % encoder.config.patch_size:
            raise ValueError(
                f"img_size {img_size} must be a multiple of the encoder's patch size {encoder.config.patch_size}"
            )
        set_vjepa2_crop_size(encoder, img_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.img_size, self.num_frames, self.batch_size = img_size, num_frames, batch_size
        self.enable_fp16, self.offload, self.center_crop = enable_fp16, offload, center_crop
        self.progress = progress
        self.encoder = encoder.eval().requires_grad_(False).to("cpu" if offload else self.device)

    @property
    def embedding_dim(self) -> int:
        """Size of one embedding (the encoder's hidden size)."""
        return self.encoder.config.hidden_size

    def compile_layers(self, **options: Any) -> None:
        """Compiles the forward of every encoder layer with ``torch.compile``, in place.

        The matrix products and the attention kernel stay what they were; Inductor fuses the work between them
        (the norms, the 3-D rotary embedding of queries and keys, GELU, residual adds), which eager PyTorch runs
        as memory-bound passes over 18,432 tokens a video at the recipe's size. Every layer runs the same code,
        so one compilation serves all of them; the first call after this pays it. Weights and names are
        unchanged. ``options`` go to ``torch.compile``.
        """
        for layer in self.encoder.encoder.layer:
            layer.forward = functools.partial(_contiguous_first, torch.compile(layer.forward, **options))

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, 3, H, W]`` (T >= 1) -> normalised float32 ``[num_frames, 3, img_size, img_size]``."""
        idx = torch.as_tensor(sample_frame_indices(frames.shape[0], self.num_frames))
        x = frames[idx].to(self.device, non_blocking=True).float()
        h, w = x.shape[-2:]
        if self.center_crop:
            short = int(256.0 / 224 * self.img_size)
            size = (int(short * h / w), short) if w < h else (short, int(short * w / h))
        else:
            size = (self.img_size, self.img_size)
        if size != (h, w):
            # torchvision's tensor resize on uint8 input: bilinear with antialias, then rounded to uint8
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).round_()
        h, w = x.shape[-2:]
        top, left = int(round((h - self.img_size) / 2.0)), int(round((w - self.img_size) / 2.0))
        x = x[..., top : top + self.img_size, left : left + self.img_size]
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std

    @torch.no_grad()
    def encode(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``[B, num_frames, 3, S, S]`` -> token-mean embeddings ``[B, D]`` float32."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.enable_fp16):
            tokens = self.encoder.encoder(pixel_values_videos=pixel_values_videos).last_hidden_state
        return tokens.float().mean(dim=1)

    @torch.no_grad()
    def forward(self, videos: Sequence[torch.Tensor]) -> torch.Tensor:
        """Videos (each ``[T, 3, H, W]`` uint8) -> one float32 embedding each, ``[len(videos), D]`` on the CPU."""
        # Each video is read once, batch by batch, so ``videos`` may be a lazy sequence that gathers
        # frames on access: a batch of long trajectories never needs to sit in memory at once.
        out = torch.zeros(len(videos), self.embedding_dim)
        if len(videos) == 0:
            return out
        if self.offload:
            self.encoder.to(self.device)
        # no bar for calls from other threads: the reward's background embedder runs beside the rollout's bar
        shown = bool(self.progress) and threading.current_thread() is threading.main_thread()
        bar = tqdm(total=len(videos), unit="video", leave=False, disable=not shown,
                   desc=self.progress if isinstance(self.progress, str) else "embed")
        try:
            for start in range(0, len(videos), self.batch_size):
                rows, pixels = [], []
                for i in range(start, min(start + self.batch_size, len(videos))):
                    frames = videos[i]
                    if frames.shape[0] > 0:
                        rows.append(i)
                        pixels.append(self.preprocess(frames))
                if rows:
                    out[rows] = self.encode(torch.stack(pixels)).cpu()
                bar.update(min(self.batch_size, len(videos) - start))
        finally:
            bar.close()
            if self.offload:
                self.encoder.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return out
