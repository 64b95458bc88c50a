"""OpenVLA-OFT with discrete action tokens and parallel decoding ("AC-PD"), in native PyTorch.

The model of the SRPO SFT checkpoints (``Sylvest/OpenVLA-AC-PD-1traj-libero-*``): fused DINOv2 + SigLIP
towers (:mod:`.openvla_oft_vision`), a 3-layer GELU projector and a transformers ``LlamaForCausalLM``. One
forward predicts all ``8 x 7`` action tokens of a chunk: the prompt is followed by 56 placeholder slots with
all-zero embeddings and ``</s>``; the logits at the position before each slot, restricted to the 256 action
tokens at the tail of the vocabulary (ids ``vocab - 64 - 256 ..``, 31744..31999 for Llama-2), score that slot.

``attention="bidirectional"`` (default) is what the checkpoints were trained with (the OFT transformers fork:
every token attends to every non-pad token); ``"causal"`` is stock transformers.

Example:
    >>> import tempfile, torch
    >>> from srpo_rl.models.openvla_oft import OpenVLAOFT, write_tiny_checkpoint
    >>> path = tempfile.mkdtemp()
    >>> _ = write_tiny_checkpoint(path)
    >>> model = OpenVLAOFT.from_pretrained(path, dtype=torch.float32)
    >>> ids = torch.tensor([[1, 259, 261, 29871]])
    >>> model.action_logits(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(1, 6, 224, 224)).shape
    torch.Size([1, 56, 256])
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..lora import check_adapters_apart, merge_lora_state
from .llama_tokenizer import EOS_ID, save_tiny_llama_tokenizer
from .openvla_oft_files import (
    CONFIG_NAME,
    GENERATION_CONFIG,
    LLAMA2_TEXT_DEFAULTS,
    PROCESSOR_CONFIG,
    check_files,
    check_shapes,
    dump_json,
    iter_tensors,
    parse_size,
    preprocessor_config,
    read_side_files,
    read_weight_map,
    save_sharded,
    synthetic_dataset_statistics,
    tensor_shapes,
)
from .openvla_oft_vision import (
    DINOV2_L_REG4,
    SIGLIP_SO400M,
    FusedVisionBackbone,
    VisionTowerConfig,
    tower_config_from_shapes,
)

__all__ = ["ATTENTION_MODES", "OpenVLAOFT", "OpenVLAOFTConfig", "tiny_config", "write_random_checkpoint", "write_tiny_checkpoint"]

ATTENTION_MODES = ("bidirectional", "causal")
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_FEATURIZER, _FUSED = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."


@dataclass
class OpenVLAOFTConfig:
    """Sizes and constants of an OpenVLA-OFT; the defaults are the 7B.

    ``text_config`` is stored as in config.json: only the fields that differ from Llama-2 defaults (those of
    transformers 4.40.1, :data:`~.openvla_oft_files.LLAMA2_TEXT_DEFAULTS`). ``raw`` is the config.json the
    model was loaded from; ``save_pretrained`` writes it back unchanged (but for ``torch_dtype``).
    """

    dino: VisionTowerConfig = field(default_factory=lambda: replace(DINOV2_L_REG4))
    siglip: VisionTowerConfig = field(default_factory=lambda: replace(SIGLIP_SO400M))
    projector_hidden_dim: int | None = None  # None: 4 x the fused vision width (OpenVLA's fused GELU MLP)
    text_config: dict = field(
        default_factory=lambda: {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}
    )
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    num_actions_chunk: int = 8  # LIBERO constants of the OFT code (constants.py), not stored in config.json
    action_dim: int = 7
    raw: dict | None = None

    def llama_config(self) -> LlamaConfig:
        """The Llama config with every field resolved against Llama-2 (4.40.1) defaults."""
        known = LLAMA2_TEXT_DEFAULTS | {k: v for k, v in self.text_config.items() if k in LLAMA2_TEXT_DEFAULTS}
        if known.pop("rope_scaling") is not None:
            raise ValueError(f"config.json has text_config.rope_scaling={self.text_config['rope_scaling']!r}; "
                             "OpenVLA's Llama-2 backbone has none (null), the only value this loader reads")
        theta = known.pop("rope_theta")
        return LlamaConfig(
            **known, rope_parameters={"rope_type": "default", "rope_theta": theta}, attn_implementation="sdpa"
        )

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head and token embedding, padding included (32064 for the published 7B)."""
        return int(self.text_config.get("vocab_size", LLAMA2_TEXT_DEFAULTS["vocab_size"]))

    @property
    def action_token_begin(self) -> int:
        """LM id of action-vocabulary index 0 (31744 for Llama-2: the last 256 ids before the 64 pad rows)."""
        return self.vocab_size - self.pad_to_multiple_of - self.n_action_bins

    @property
    def num_action_tokens(self) -> int:
        """Tokens one forward predicts: a chunk of ``num_actions_chunk`` actions x ``action_dim`` (8 x 7 = 56)."""
        return self.num_actions_chunk * self.action_dim

    @classmethod
    def from_json(cls, raw: dict, shapes: dict[str, tuple[int, ...]]) -> OpenVLAOFTConfig:
        """Reads config.json; tower and projector sizes come from the tensor shapes (config.json has none)."""
        if raw.get("model_type") != "openvla":
            raise ValueError(f"config.json has model_type {raw.get('model_type')!r}; expected 'openvla'")
        if not raw.get("use_fused_vision_backbone", False) or not str(raw.get("arch_specifier", "")).endswith(
            "fused-gelu-mlp"
        ):
            raise ValueError(
                "config.json is not an OpenVLA-OFT of the fused DINOv2 + SigLIP backbone with the fused GELU MLP "
                "projector (use_fused_vision_backbone=true, arch_specifier ending in 'fused-gelu-mlp'), the only one "
                "this loader reads; got "
                f"use_fused_vision_backbone={raw.get('use_fused_vision_backbone')!r}, "
                f"arch_specifier={raw.get('arch_specifier')!r}"
            )
        if raw.get("use_proprio"):
            raise ValueError("config.json has use_proprio=true (a proprio token, as in OpenVLA-OFT's continuous-action "
                             "checkpoints); this loader reads the discrete-token checkpoints SRPO starts from, "
                             "use_proprio false")
        sizes = raw.get("image_sizes", [224, 224])
        fc1 = shapes.get("projector.fc1.weight")
        return cls(
            dino=tower_config_from_shapes(shapes, _FEATURIZER, sizes[0]),
            siglip=tower_config_from_shapes(shapes, _FUSED, sizes[-1]),
            projector_hidden_dim=fc1[0] if fc1 else None,
            text_config=dict(raw.get("text_config", {})),
            pad_token_id=raw.get("pad_token_id", 32000),
            pad_to_multiple_of=raw.get("pad_to_multiple_of", 64),
            n_action_bins=raw.get("n_action_bins", 256),
            raw=raw,
        )

    def to_json(self, dtype: torch.dtype, norm_stats: dict | None = None) -> dict:
        """config.json: the loaded one (``torch_dtype`` updated) or, for a new model, the published layout."""
        name = _DTYPE_NAMES[dtype]
        if self.raw is not None:
            raw = json.loads(json.dumps(self.raw))
            raw["torch_dtype"] = name
            raw.setdefault("text_config", {})["torch_dtype"] = name
            return raw
        size = self.dino.image_size
        return {
            "arch_specifier": "no-align+fused-gelu-mlp",
            "architectures": ["OpenVLAForActionPrediction"],
            "auto_map": {
                "AutoConfig": "configuration_prismatic.OpenVLAConfig",
                "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
            },
            "hf_llm_id": "meta-llama/Llama-2-7b-hf",
            "image_resize_strategy": "resize-naive",
            "image_sizes": [size, self.siglip.image_size],
            "llm_backbone_id": "llama2-7b-pure",
            "llm_max_length": 2048,
            "model_type": "openvla",
            "n_action_bins": self.n_action_bins,
            "norm_stats": norm_stats or {},
            "output_projector_states": False,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "pad_token_id": self.pad_token_id,
            "text_config": {**self.text_config, "torch_dtype": name},
            "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
            "timm_override_act_layers": [None, None],
            "torch_dtype": name,
            "transformers_version": "4.40.1",
            "use_fused_vision_backbone": True,
            "vision_backbone_id": f"dinosiglip-vit-so-{size}px",
        }


class FusedMLPProjector(nn.Module):
    """``fc3(gelu(fc2(gelu(fc1(x)))))``: vision features -> LLM embeddings (OpenVLA's "fused-gelu-mlp")."""

    def __init__(self, vision_dim: int, hidden_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class OpenVLAOFT(nn.Module):
    """OpenVLA-OFT (discrete AC-PD): images + prompt -> logits of the 56 action tokens of a chunk.

    Args:
        config: sizes (defaults: the 7B).
        attention: ``"bidirectional"`` (how the checkpoints were trained) or ``"causal"``.

    Attributes:
        norm_stats: ``dataset_statistics.json`` of the checkpoint (per-dataset action q01/q99/mask).
        checkpoint_files: the checkpoint's other small files (tokenizer, processor config, statistics),
            written back verbatim by :meth:`save_pretrained`.
    """

    def __init__(self, config: OpenVLAOFTConfig | None = None, *, attention: str = "bidirectional") -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_MODES)}")
        self.config = config = config or OpenVLAOFTConfig()
        self.attention = attention
        # registration order = the published state-dict order (vision, projector, LLM), which decides the shards
        self.vision_backbone = FusedVisionBackbone(config.dino, config.siglip)
        vision_dim = self.vision_backbone.embed_dim
        llama = config.llama_config()
        self.projector = FusedMLPProjector(vision_dim, config.projector_hidden_dim or 4 * vision_dim, llama.hidden_size)
        self.language_model = LlamaForCausalLM(llama)
        self.norm_stats: dict = {}
        self.checkpoint_files: dict[str, bytes] = {}

    # --- forward ---------------------------------------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Same as :meth:`action_logits` (``forward`` is what FSDP hooks)."""
        return self._action_logits(input_ids, attention_mask, pixel_values)

    def action_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """Float32 logits ``[B, 56, 256]`` over the action vocabulary for each slot of the chunk.

        Args:
            input_ids: ``[B, L]`` ``<s>`` + prompt (ending with ``"▁"``, 29871), right-padded.
            attention_mask: ``[B, L]`` bool, True on the prompt tokens (a prefix of each row).
            pixel_values: ``[B, 6k, H, W]`` normalised images (DINOv2 channels, then SigLIP, per image).
        """
        return self._action_logits(input_ids, attention_mask, pixel_values)

    def _action_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        n = self.prompt_lengths(input_ids, attention_mask)
        return self.logits_from_lengths(input_ids[:, : int(n.max())], n, pixel_values)  # trailing pads: dropped

    def logits_from_lengths(
        self, input_ids: torch.Tensor, prompt_lengths: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`action_logits` from the prompt lengths instead of a mask, without checks or host syncs.

        Every shape follows from the inputs' shapes and no value goes back to the host, so a CUDA graph can
        capture it (:class:`srpo_rl.cuda_graphs.GraphedActionLogits`). Columns of ``input_ids`` past a row's
        length are ignored, so extra right padding (and extra rows) change nothing but the work.

        Args:
            input_ids: ``[B, L]`` ``<s>`` + prompt, right-padded (any ids past each row's length).
            prompt_lengths: ``[B]`` int64, each in ``2..L``, on ``input_ids``' device.
            pixel_values: ``[B, 6k, H, W]`` as for :meth:`action_logits`.
        """
        self._ensure_fp32_rope()
        n = prompt_lengths
        ids = input_ids
        batch, length = ids.shape
        slots = self.config.num_action_tokens
        dtype = self.projector.fc1.weight.dtype

        # text part: <s> prompt [56 zero slots] </s> pads
        pos = torch.arange(length + slots + 1, device=ids.device)
        offset = pos[None] - n[:, None]
        is_slot = (offset >= 0) & (offset < slots)
        text_ids = F.pad(ids, (0, slots + 1), value=self.config.pad_token_id).masked_fill(
            offset >= 0, self.config.pad_token_id
        )
        text_ids = text_ids.masked_fill(offset == slots, EOS_ID)
        text = self.language_model.model.embed_tokens(text_ids).masked_fill(is_slot[..., None], 0.0)
        text_valid = offset <= slots

        patches = self.projector(self.vision_backbone(pixel_values.to(dtype)))
        num_patches = patches.shape[1]
        embeds = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
        valid = torch.cat([text_valid[:, :1], text_valid.new_ones(batch, num_patches), text_valid[:, 1:]], dim=1)

        hidden = self.language_model.model(
            inputs_embeds=embeds, attention_mask=self._attention_mask(valid), use_cache=False
        ).last_hidden_state
        # the position before each slot predicts it (the next-token shift the model was trained with)
        before = num_patches + n[:, None] - 1 + torch.arange(slots, device=ids.device)
        hidden = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))
        begin = self.config.action_token_begin
        head = self.language_model.lm_head.weight[begin : begin + self.config.n_action_bins]
        return F.linear(hidden.float(), head.float())

    def prompt_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The prompt length of each row, ``[B]``, after checking that the mask is a prefix of ones per row."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "input_ids and attention_mask must both be [B, L]; "
                f"got {list(input_ids.shape)} and {list(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        n = mask.sum(1)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None] < n[:, None]):
            raise ValueError(
                "attention_mask must be a prefix of ones per row (right padding), as the prompts are stored"
            )
        if int(n.min()) < 2:
            raise ValueError("every prompt needs <s> and at least one more token")
        return n

    def _attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """4-D boolean mask (True = attend), passed to transformers as-is (it skips its own mask logic)."""
        keys = valid[:, None, None, :]
        if self.attention == "bidirectional":
            return keys.expand(-1, -1, valid.shape[1], -1)
        causal = torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device).tril()
        return keys & causal

    def _ensure_fp32_rope(self) -> None:
        # A model-wide .to(bfloat16) also casts the rotary inverse frequencies, which rounds every RoPE angle;
        # transformers computes them in float32, so rebuild them in float32 when that happened.
        inv_freq = self.language_model.model.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32 or inv_freq.is_meta:
            self.reset_rotary_embedding()

    def reset_rotary_embedding(self) -> None:
        """Recomputes the RoPE frequencies (a non-persistent buffer) in float32 on the weights' device.

        Needed after ``to_empty()``, which leaves buffers uninitialised; loading does it by itself.
        """
        with torch.device(self.projector.fc1.weight.device):
            self.language_model.model.rotary_emb = LlamaRotaryEmbedding(self.language_model.config)

    # --- training helpers -------------------------------------------------------------------------------

    def fsdp_blocks(self) -> list[nn.Module]:
        """The repeated blocks to shard one by one with FSDP2: vision blocks that run, then the decoder layers."""
        vb = self.vision_backbone
        return [*vb.featurizer.used_blocks(), *vb.fused_featurizer.used_blocks(), *self.language_model.model.layers]

    def compile_blocks(self, **options: Any) -> None:
        """Compiles the forward of every repeated block (:meth:`fsdp_blocks`) with ``torch.compile``, in place.

        The blocks' matrix products run as before; what changes is the work between them (norms, the rotary
        embedding, activations, residual adds), which eager PyTorch runs as many memory-bound kernels and
        Inductor fuses. One compilation (dynamic shapes) serves every decoder layer and every batch size;
        the first forward after this pays it. Parameters, names and checkpoints are unchanged, and FSDP2,
        gradient checkpointing and :class:`srpo_rl.cuda_graphs.GraphedActionLogits` wrap the compiled blocks
        as they wrap eager ones. ``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``).
        """
        for block in self.fsdp_blocks():
            block.forward = _with_block_dynamo_config(torch.compile(block.forward, dynamic=True, **options))

    def gradient_checkpointing_enable(self) -> None:
        """Recompute every vision block and decoder layer in the backward pass instead of storing activations."""
        self.vision_backbone.featurizer.gradient_checkpointing = True
        self.vision_backbone.fused_featurizer.gradient_checkpointing = True
        lm = self.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        """Undoes :meth:`gradient_checkpointing_enable`: activations are kept for the backward again."""
        self.vision_backbone.featurizer.gradient_checkpointing = False
        self.vision_backbone.fused_featurizer.gradient_checkpointing = False
        lm = self.language_model
        getattr(lm, "activation_checkpointing_disable", lm.gradient_checkpointing_disable)()

    # --- files --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        attention: str = "bidirectional",
        device: torch.device | str = "cpu",
    ) -> OpenVLAOFT:
        """Loads a published OpenVLA-OFT directory (no ``trust_remote_code``).

        Args:
            path: directory with config.json and the (sharded) safetensors; its other small files
                (tokenizer, statistics, processor config) are kept in :attr:`checkpoint_files`.
            dtype: parameter dtype; ``None`` keeps the stored one (bf16 for the published checkpoints).
            attention: ``"bidirectional"`` or ``"causal"``.
            device: where the weights are loaded.
        """
        path = Path(path)
        check_files(path)
        raw = json.loads((path / CONFIG_NAME).read_text())
        weight_map = read_weight_map(path)
        shapes = tensor_shapes(path, weight_map)
        with torch.device("meta"):  # no init of billions of parameters that are overwritten next
            model = cls(OpenVLAOFTConfig.from_json(raw, shapes), attention=attention)
        check_shapes(shapes, {k: tuple(v.shape) for k, v in model.state_dict().items()}, str(path))
        state = {k: v if dtype is None else v.to(dtype) for k, v in iter_tensors(path, weight_map, device)}
        model.load_state_dict(state, strict=True, assign=True)
        model._ensure_fp32_rope()
        model.checkpoint_files = read_side_files(path)
        stats = model.checkpoint_files.get("dataset_statistics.json")
        model.norm_stats = json.loads(stats) if stats is not None else dict(raw.get("norm_stats", {}))
        return model.eval()

    def save_pretrained(
        self,
        path: str | Path,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        max_shard_size: int | str = "5GB",
    ) -> None:
        """Writes the published directory format: config.json, safetensors shards + index, side files.

        With FSDP-sharded parameters this is collective (call it on every rank): the full state dict is
        gathered to the CPU and rank 0 writes.

        Args:
            state_dict: the full state dict to write; default the model's own (gathered when sharded). LoRA
                adapters (:mod:`srpo_rl.lora`) are folded into their weights: the files load without them.
            dtype: dtype of the floating tensors written. Default: the dtype the checkpoint was stored in
                (config.json ``torch_dtype``, bf16 for the published ones), so fp32 master weights save back
                in the original format; for a model not loaded from a directory, the parameters' dtype.
            max_shard_size: shard limit (transformers' default ``"5GB"`` gives the 7B's 4 shards).
        """
        check_adapters_apart(self)  # inside merged_adapters a state dict taken from the model counts them twice
        state = merge_lora_state(self._full_state_dict() if state_dict is None else state_dict)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        if dtype is None and self.config.raw is not None:
            dtype = getattr(torch, str(self.config.raw.get("torch_dtype", "")), None)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_sharded(state, path, max_shard_size)
        saved_dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        dump_json(self.config.to_json(saved_dtype, self.norm_stats), path / CONFIG_NAME)
        for name, data in self.checkpoint_files.items():
            (path / name).write_bytes(data)

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        if not torch.distributed.is_available() or not any(isinstance(p, DTensor) for p in self.parameters()):
            return self.state_dict()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, on the CPU
        return get_model_state_dict(self, options=options)


# Dynamo settings for the compiled blocks, each applied where this torch has it:
_BLOCK_DYNAMO_CONFIG = {
    # transformers' hub-kernel layers (the ``kernels`` package) set and reset a context variable in each norm's
    # forward. Under activation checkpointing that is a side effect inside the checkpoint, at which Dynamo breaks
    # every decoder layer's graph; the set-and-reset needs no replay in the backward's recompute.
    "skip_fwd_side_effects_in_bwd_under_checkpoint": True,
    # One code object serves every block of a kind, and the vision blocks alone need 8 graphs in a LoRA run
    # (DINOv2's and SigLIP's widths x batch 1 and any batch x inference, and training with the input's
    # requires_grad off and on: an H100 run of the recipe), Dynamo's default limit, past which it runs the
    # blocks eagerly. A smaller last micro-batch or a gradient-checkpointed recompute may add more.
    "recompile_limit": 64,
}


def _with_block_dynamo_config(compiled):
    """``compiled``, traced and called with :data:`_BLOCK_DYNAMO_CONFIG` (the options this torch knows)."""
    config = {key: value for key, value in _BLOCK_DYNAMO_CONFIG.items() if hasattr(torch._dynamo.config, key)}
    if not config:
        return compiled

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(config):
            return compiled(*args, **kwargs)

    return run


# --- tiny checkpoints ----------------------------------------------------------------------------------


def _randomize_(model: nn.Module, seed: int) -> None:
    """Seeded weights that keep activations O(1), so random models give spread-out, input-dependent logits.

    The noise is drawn where each parameter lives (a 7B model on a GPU is filled there, in seconds).
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = generators.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if name.endswith(("cls_token", "reg_token", "pos_embed", "latent")):
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("scale_factor"):
                p.copy_(0.5 + 0.1 * noise)
            elif name.endswith("weight"):  # norms
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def tiny_config(
    *, hidden_size: int = 64, num_layers: int = 2, vision_widths: tuple[int, int] = (64, 96), vision_depth: int = 3
) -> OpenVLAOFTConfig:
    """A tiny OpenVLA-OFT with the real token layout (32064 vocabulary rows, action ids 31744..31999)."""
    dino = replace(DINOV2_L_REG4, embed_dim=vision_widths[0], depth=vision_depth, mlp_hidden_dim=2 * vision_widths[0])
    siglip = replace(
        SIGLIP_SO400M,
        embed_dim=vision_widths[1],
        depth=vision_depth,
        mlp_hidden_dim=2 * vision_widths[1],
        attn_pool_mlp_hidden_dim=2 * vision_widths[1],
    )
    text = {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 4,
        "pad_token_id": 32000,
        "vocab_size": 32064,
    }
    return OpenVLAOFTConfig(dino=dino, siglip=siglip, text_config=text)


def write_tiny_checkpoint(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **sizes: int
) -> OpenVLAOFT:
    """Writes a complete tiny random checkpoint in exactly the published format and returns its model.

    The directory holds config.json (``text_config`` with the tiny sizes, every other field as published),
    two safetensors shards + index (timm-style names, ``dtype`` as stored), dataset_statistics.json with
    plausible statistics for the five LIBERO ``*_no_noops`` datasets, the tiny Llama-compatible tokenizer
    files (:mod:`.llama_tokenizer`), preprocessor_config.json, processor_config.json and
    generation_config.json. ``sizes`` go to :func:`tiny_config`.

    Example:
        >>> import tempfile
        >>> model = write_tiny_checkpoint(tempfile.mkdtemp(), seed=1)
        >>> model.config.action_token_begin
        31744
    """
    return write_random_checkpoint(path, tiny_config(**sizes), seed=seed, dtype=dtype)


def write_random_checkpoint(
    path: str | Path,
    config: OpenVLAOFTConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> OpenVLAOFT:
    """Writes a random-weight checkpoint of any size in the published format and returns its model.

    ``config`` defaults to the published OpenVLA-OFT-7B (DINOv2-L + SigLIP-so400m + Llama-2-7B); the model
    is built on ``device`` in ``dtype`` (a 7B model: 15 GB in bf16, filled in seconds on a GPU). The files
    are those of :func:`write_tiny_checkpoint`: the tokenizer is the tiny Llama-compatible one (same ids
    for the action tokens), so a full-size random checkpoint runs the whole recipe without any download.
    Two shards when the model is small, transformers' 5 GB shards otherwise.

    Example:
        >>> import tempfile
        >>> model = write_random_checkpoint(tempfile.mkdtemp(), tiny_config(hidden_size=32), seed=2)
        >>> model.config.text_config["hidden_size"]
        32
    """
    path = Path(path)
    config = config or OpenVLAOFTConfig()
    with torch.device("meta"):
        model = OpenVLAOFT(config)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: allocate only the stored dtype
    model.reset_rotary_embedding()
    _randomize_(model, seed)
    model.norm_stats = synthetic_dataset_statistics(seed)
    save_tiny_llama_tokenizer(path)
    files = {
        "dataset_statistics.json": model.norm_stats,
        "preprocessor_config.json": preprocessor_config(config.dino.image_size),
        "processor_config.json": PROCESSOR_CONFIG,
        "generation_config.json": GENERATION_CONFIG,
    }
    for name, content in files.items():
        dump_json(content, path / name)
    model.checkpoint_files = read_side_files(path)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=min(int(0.6 * total), parse_size("5GB")))
    return model.eval()
