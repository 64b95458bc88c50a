"""The on-disk format of OpenVLA(-OFT) checkpoints: file names, sharded safetensors, config.json contents.

A checkpoint directory holds ``config.json`` (``OpenVLAConfig``, with a diff-only Llama ``text_config``),
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` (or one ``model.safetensors``),
``dataset_statistics.json``, the tokenizer files and ``preprocessor_config.json``. Weights are written the
way transformers 4.40.1 writes them (shards filled in state-dict order up to ``max_shard_size``, index and
config as sorted, 2-space-indented JSON), so a saved model opens wherever the original does.

Example:
    >>> from srpo_rl.models.openvla_oft_files import parse_size
    >>> parse_size("5GB")
    5000000000
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CONFIG_NAME",
    "LLAMA2_TEXT_DEFAULTS",
    "REQUIRED_POLICY_FILES",
    "StateDictMismatchError",
    "check_files",
    "check_shapes",
    "dump_json",
    "iter_tensors",
    "parse_size",
    "read_side_files",
    "read_weight_map",
    "save_sharded",
    "tensor_shapes",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
REQUIRED_POLICY_FILES = ("dataset_statistics.json", "tokenizer.json", "preprocessor_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_MAX_SIDE_FILE_BYTES = 64 * 2**20

# LlamaConfig() of transformers 4.40.1, the version the checkpoints were written with: their text_config only
# stores the fields that differ from these, so they must be resolved against these values and not against
# whatever the installed transformers defaults to. (rms_norm_eps stays 1e-6 although Llama-2-7b-hf used 1e-5:
# that is what the checkpoints ran with.)
LLAMA2_TEXT_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}


class StateDictMismatchError(RuntimeError):
    """The checkpoint's tensors do not match the model built from its config."""


def dump_json(obj: object, path: Path) -> None:
    """Writes JSON the way transformers does (sorted keys, 2-space indent, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units, as transformers counts them); ints pass through."""
    if isinstance(size, int):
        return size
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise ValueError(f"cannot read size {size!r}; write e.g. '5GB', '200MB' or a number of bytes")


def check_files(path: Path, names: tuple[str, ...] = ()) -> None:
    """Raises ``FileNotFoundError`` listing every required file missing from the checkpoint directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    missing = [n for n in (CONFIG_NAME, *names) if not (path / n).is_file()]
    if not (path / WEIGHTS_INDEX_NAME).is_file() and not (path / WEIGHTS_NAME).is_file():
        missing.append(f"{WEIGHTS_INDEX_NAME} (or a single {WEIGHTS_NAME})")
    else:
        missing += [f for f in sorted(set(read_weight_map(path).values())) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {str(path)!r} is missing: {', '.join(missing)}")


def read_weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name (one file when the checkpoint is not sharded)."""
    if (path / WEIGHTS_INDEX_NAME).is_file():
        return dict(json.loads((path / WEIGHTS_INDEX_NAME).read_text())["weight_map"])
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        return {k: WEIGHTS_NAME for k in f.keys()}


def tensor_shapes(path: Path, weight_map: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor, read from the safetensors headers (no data is loaded)."""
    shapes = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def iter_tensors(
    path: Path, weight_map: Mapping[str, str], device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` shard by shard."""
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(path / shard), framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): {', '.join(items[:limit])}{more}"


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raises :class:`StateDictMismatchError` listing missing keys, unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k}: checkpoint {list(found[k])} vs model {list(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        message = f"checkpoint {where!r} does not match the OpenVLA-OFT built from its config.json:"
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if items:
                message += _listing(title, items)
        raise StateDictMismatchError(message)


def save_sharded(state_dict: Mapping[str, torch.Tensor], path: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Writes safetensors shards (+ index when there is more than one), as ``save_pretrained`` of 4.40.1 does.

    Shards are filled in state-dict order; a tensor that would overflow the current shard starts the next.
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    current = total = 0
    for key, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if current + size > limit and shards[-1]:
            shards.append({})
            current = 0
        shards[-1][key] = tensor.detach().to("cpu").contiguous()
        current += size
        total += size
    for stale in [*path.glob("model-*-of-*.safetensors"), path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: name for name, shard in zip(names, shards, strict=False) for k in shard}
        dump_json({"metadata": {"total_size": total}, "weight_map": weight_map}, path / WEIGHTS_INDEX_NAME)
    for name, shard in zip(names, shards, strict=False):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    return names


def read_side_files(path: Path) -> dict[str, bytes]:
    """Every top-level file that is neither weights nor config.json (tokenizer, statistics, processor, code).

    They are carried verbatim so ``save_pretrained`` writes a directory that opens wherever the original does.
    """
    side = {}
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name in (CONFIG_NAME, WEIGHTS_INDEX_NAME) or file.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if file.stat().st_size <= _MAX_SIDE_FILE_BYTES:
            side[file.name] = file.read_bytes()
    return side


# --- small JSON files of the published format ------------------------------------------------------------

# ImageNet constants as the published processor stores them: rounded to bf16, because the HF conversion ran
# with bf16 as the default dtype, and on reload these tvf_* values win over "means"/"stds".
_DINO_MEAN_BF16 = [0.484375, 0.455078125, 0.40625]
_DINO_STD_BF16 = [0.228515625, 0.2236328125, 0.224609375]


def preprocessor_config(image_size: int = 224) -> dict:
    """``preprocessor_config.json`` of ``PrismaticImageProcessor`` (DINOv2 + SigLIP, resize-naive)."""
    size = [image_size, image_size]
    return {
        "auto_map": {
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            "AutoProcessor": "processing_prismatic.PrismaticProcessor",
        },
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, *size], [3, *size]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
        "processor_class": "PrismaticProcessor",
        "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
        "tvf_crop_params": [{"output_size": size}, {"output_size": size}],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [
            {"inplace": False, "mean": _DINO_MEAN_BF16, "std": _DINO_STD_BF16},
            {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        ],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": size}] * 2,
        "use_fused_vision_backbone": True,
    }


PROCESSOR_CONFIG = {
    "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
    "processor_class": "PrismaticProcessor",
}
GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32000,
    "transformers_version": "4.40.1",
}

# (transitions, trajectories) and a per-suite spread of the translation / rotation ranges: plausible
# LIBERO-like numbers for synthetic checkpoints, not the published statistics.
_SUITES = {
    "libero_spatial_no_noops": (52970, 432, 0.94, 0.36),
    "libero_object_no_noops": (66984, 454, 0.94, 0.24),
    "libero_goal_no_noops": (52042, 428, 0.94, 0.38),
    "libero_10_no_noops": (101469, 379, 0.94, 0.34),
    "libero_90_no_noops": (569230, 3954, 0.94, 0.37),
}


def synthetic_dataset_statistics(seed: int = 0) -> dict:
    """``dataset_statistics.json`` with plausible LIBERO statistics for the five ``*_no_noops`` datasets.

    Layout as the OFT code writes it: per dataset ``action`` (mean/std/max/min/q01/q99 over 7 dims and
    ``mask`` = 6 x True + gripper False) and ``proprio`` (8 dims, no mask), plus the counts.
    """
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for name, (transitions, trajectories, translation, rotation) in _SUITES.items():
        # at most the nominal span: LIBERO's actions lie in [-1, 1], and so must their unnormalised values
        jitter = 1.0 - 0.06 * torch.rand(7, generator=g, dtype=torch.float64)
        span = torch.tensor([translation] * 3 + [rotation] * 3 + [1.0], dtype=torch.float64) * jitter
        q01 = torch.cat([-0.8 * span[:6], torch.zeros(1, dtype=torch.float64)])
        q99 = torch.cat([span[:6], torch.ones(1, dtype=torch.float64)])
        mean = torch.cat([0.1 * (q01[:6] + q99[:6]), torch.tensor([0.47], dtype=torch.float64)])
        std = torch.cat([0.35 * (q99[:6] - q01[:6]), torch.tensor([0.499], dtype=torch.float64)])
        p_mean = torch.randn(8, generator=g, dtype=torch.float64) * 0.3
        p_std = 0.05 + 0.2 * torch.rand(8, generator=g, dtype=torch.float64)

        def floats(t: torch.Tensor) -> list[float]:
            return [float(f"{v:.7g}") for v in t.tolist()]

        stats[name] = {
            "action": {
                "mean": floats(mean),
                "std": floats(std),
                "max": floats(torch.cat([q99[:6] * 1.0625, q99[6:]])),
                "min": floats(torch.cat([q01[:6] * 1.0625, q01[6:]])),
                "q01": floats(q01),
                "q99": floats(q99),
                "mask": [True] * 6 + [False],
            },
            "proprio": {
                "mean": floats(p_mean),
                "std": floats(p_std),
                "max": floats(p_mean + 3 * p_std),
                "min": floats(p_mean - 3 * p_std),
                "q01": floats(p_mean - 2.3 * p_std),
                "q99": floats(p_mean + 2.3 * p_std),
            },
            "num_transitions": transitions,
            "num_trajectories": trajectories,
        }
    return stats
