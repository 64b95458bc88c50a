"""The fused DINOv2 + SigLIP vision backbone of OpenVLA, as plain modules with timm's parameter names.

The published checkpoints store the towers under timm's names (``blocks.N.attn.qkv``, ``ls1.scale_factor``,
``attn_pool.*``), so these modules carry exactly those names and the state dict loads key for key. Features
are those of the second-to-last block, without the final norm, prefix tokens dropped (timm's
``get_intermediate_layers(n={depth - 2})``, as OpenVLA calls it): the last block, the final ``norm`` and
SigLIP's ``attn_pool`` are kept only so the checkpoint round-trips.

Example:
    >>> import torch
    >>> from srpo_rl.models.openvla_oft_vision import FusedVisionBackbone, VisionTowerConfig
    >>> dino = VisionTowerConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64, num_registers=4,
    ...                          class_token=True, layer_scale=True)
    >>> siglip = VisionTowerConfig(embed_dim=48, depth=2, num_heads=2, mlp_hidden_dim=64, attn_pool_mlp_hidden_dim=64)
    >>> FusedVisionBackbone(dino, siglip)(torch.zeros(1, 6, 224, 224)).shape
    torch.Size([1, 256, 80])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["FusedVisionBackbone", "VisionTower", "VisionTowerConfig", "tower_config_from_shapes"]

# Both published towers (DINOv2 ViT-L/14 and SigLIP so400m/14) use 16 heads; head counts are not
# recoverable from tensor shapes, so checkpoints of other sizes (tiny test towers) use 16 heads too.
TOWER_NUM_HEADS = 16
_LN_EPS = 1e-6  # timm ViTs (and OpenVLA's towers) use LayerNorm eps 1e-6


@dataclass
class VisionTowerConfig:
    """Sizes of one ViT tower (every field can be read from the checkpoint's tensor shapes).

    Defaults are DINOv2 ViT-L/14 with 4 registers at 224 px; :data:`SIGLIP_SO400M` is the other tower.
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = TOWER_NUM_HEADS
    mlp_hidden_dim: int = 4096
    patch_size: int = 14
    image_size: int = 224
    num_registers: int = 4
    class_token: bool = True
    layer_scale: bool = True
    attn_pool_mlp_hidden_dim: int | None = None  # SigLIP's unused "map" pooling head, kept for round trips
    final_norm: bool = True

    @property
    def num_patches(self) -> int:
        """Patch tokens of one image (256 for 224 px and 14-px patches)."""
        return (self.image_size // self.patch_size) ** 2


DINOV2_L_REG4 = VisionTowerConfig()
SIGLIP_SO400M = VisionTowerConfig(
    embed_dim=1152,
    depth=27,
    mlp_hidden_dim=4304,
    num_registers=0,
    class_token=False,
    layer_scale=False,
    attn_pool_mlp_hidden_dim=4304,
)


class LayerScale(nn.Module):
    """``x * scale_factor`` (timm's ``gamma``, renamed in the published files)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    """``fc2(gelu(fc1 x))``, the block's MLP (timm's ``Mlp`` names, as the published files hold them)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as both towers use


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask) with a fused ``qkv`` projection, timm's layout."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"tower width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # qkv rows are ordered (q, k, v), heads contiguous within each: timm's layout
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm ViT block: ``x + ls1(attn(norm1 x))``, then ``x + ls2(mlp(norm2 x))``."""

    def __init__(self, cfg: VisionTowerConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, cfg.mlp_hidden_dim)
        self.ls2 = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``embed_dim`` tokens ``[B, num_patches, embed_dim]``."""

    def __init__(self, cfg: VisionTowerConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AttentionPoolLatent(nn.Module):
    """SigLIP's "map" pooling head. OpenVLA never calls it; it exists so its weights load and save."""

    def __init__(self, dim: int, mlp_hidden: int) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)


class VisionTower(nn.Module):
    """One timm-style ViT returning the patch features of its second-to-last block."""

    def __init__(self, cfg: VisionTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # parameters first, then submodules: the order of timm's state dict (and of the shards)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        if cfg.num_registers:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.embed_dim))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        if cfg.final_norm:
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=_LN_EPS)
        if cfg.attn_pool_mlp_hidden_dim is not None:
            self.attn_pool = AttentionPoolLatent(cfg.embed_dim, cfg.attn_pool_mlp_hidden_dim)
        self.gradient_checkpointing = False
        # Kept for checkpoint round trips only: frozen, so optimizers and gradient clipping skip them.
        for parameter in self.unused_parameters():
            parameter.requires_grad_(False)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters without effect on the features: the last block, the final norm, SigLIP's pooling head."""
        unused = [self.blocks[self.cfg.depth - 1]] + [getattr(self, n) for n in ("norm", "attn_pool") if hasattr(self, n)]
        return [p for module in unused for p in module.parameters()]

    @property
    def num_prefix_tokens(self) -> int:
        """Class and register tokens ahead of the patches, dropped from the output."""
        return int(self.cfg.class_token) + self.cfg.num_registers

    def used_blocks(self) -> list[nn.Module]:
        """The blocks that run: all but the last (features come from the second-to-last block)."""
        return list(self.blocks[: self.cfg.depth - 1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[B, num_patches, embed_dim]`` of ``images`` ``[B, 3, H, W]`` (prefix tokens dropped)."""
        x = self.patch_embed(images) + self.pos_embed  # no_embed_class: patches only get positions
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.cfg.num_registers:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)
        for block in self.used_blocks():
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x[:, self.num_prefix_tokens :]


class FusedVisionBackbone(nn.Module):
    """DINOv2 (``featurizer``, channels 0-2) and SigLIP (``fused_featurizer``, channels 3-5), features concatenated.

    ``pixel_values`` ``[B, 6k, H, W]`` holds ``k`` images of 6 channels each; the output is
    ``[B, k * num_patches, dino_dim + siglip_dim]`` with the images' patches one after the other.
    """

    def __init__(self, dino: VisionTowerConfig, siglip: VisionTowerConfig) -> None:
        super().__init__()
        if dino.num_patches != siglip.num_patches:
            raise ValueError(f"the towers disagree on the patch count: {dino.num_patches} vs {siglip.num_patches}")
        self.featurizer = VisionTower(dino)
        self.fused_featurizer = VisionTower(siglip)

    @property
    def embed_dim(self) -> int:
        """Width of a fused patch feature: DINOv2's plus SigLIP's (1024 + 1152 for the 7B)."""
        return self.featurizer.cfg.embed_dim + self.fused_featurizer.cfg.embed_dim

    @property
    def num_patches(self) -> int:
        """Patch tokens of one image (both towers give the same grid)."""
        return self.featurizer.cfg.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Both towers' patch features, concatenated per patch (shapes in the class docstring)."""
        b, c, h, w = pixel_values.shape
        if c % 6:
            raise ValueError(f"pixel_values must have 6 channels per image (DINOv2 + SigLIP), got {c}")
        images = pixel_values.reshape(b * (c // 6), 6, h, w)  # all images of all samples in one tower call
        features = torch.cat([self.featurizer(images[:, :3]), self.fused_featurizer(images[:, 3:])], dim=-1)
        return features.reshape(b, -1, features.shape[-1])


def tower_config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str, image_size: int) -> VisionTowerConfig:
    """Reads a tower's sizes from the shapes of its tensors (names under ``prefix``)."""
    names = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    if "patch_embed.proj.weight" not in names or "pos_embed" not in names:
        raise KeyError(f"no vision tower under {prefix!r}: 'patch_embed.proj.weight' / 'pos_embed' missing")
    dim, _, patch, _ = names["patch_embed.proj.weight"]
    depth = 1 + max((int(k.split(".")[1]) for k in names if k.startswith("blocks.")), default=-1)
    if depth < 2:
        raise ValueError(f"tower {prefix!r} has {depth} blocks; OpenVLA reads the second-to-last, so at least 2")
    if dim % TOWER_NUM_HEADS:
        raise ValueError(f"tower {prefix!r} width {dim} is not divisible by its {TOWER_NUM_HEADS} heads")
    cfg = VisionTowerConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=TOWER_NUM_HEADS,
        mlp_hidden_dim=names["blocks.0.mlp.fc1.weight"][0],
        patch_size=patch,
        image_size=image_size,
        num_registers=names["reg_token"][1] if "reg_token" in names else 0,
        class_token="cls_token" in names,
        layer_scale="blocks.0.ls1.scale_factor" in names,
        attn_pool_mlp_hidden_dim=names["attn_pool.mlp.fc1.weight"][0] if "attn_pool.mlp.fc1.weight" in names else None,
        final_norm="norm.weight" in names,
    )
    if names["pos_embed"][1] != cfg.num_patches:
        side = math.isqrt(names["pos_embed"][1]) * patch
        raise ValueError(
            f"tower {prefix!r} has {names['pos_embed'][1]} position embeddings (a {side}px image) but config.json "
            f"image_sizes says {image_size}px ({cfg.num_patches} patches of {patch}px)"
        )
    return cfg
