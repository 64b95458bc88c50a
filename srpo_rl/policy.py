"""OpenVLA-OFT as a TorchRL policy: observation -> 8 x 7 action tokens, their log-probs and the action chunk.

Per decision the policy reads the camera frame(s) and the instruction, preprocesses as the reference rollout
does (JPEG round trip, Lanczos3 resize to 224, 0.9-area center crop), runs one parallel-decoding forward and
samples every token at ``temperature`` (argmax outside ``ExplorationType.RANDOM``). It stores what it saw
(``policy_image``, ``prompt_ids``, ``prompt_mask``) so :meth:`OpenVLAOFTPolicy.get_dist` recomputes the same
log-probs at training time, and decodes the tokens with the checkpoint's action statistics.

Example:
    >>> import tempfile, torch
    >>> from tensordict import NonTensorStack, TensorDict
    >>> from srpo_rl.models.openvla_oft import write_tiny_checkpoint
    >>> from srpo_rl.policy import OpenVLAOFTPolicy
    >>> path = tempfile.mkdtemp()
    >>> _ = write_tiny_checkpoint(path)
    >>> policy = OpenVLAOFTPolicy.from_pretrained(path, unnorm_key="libero_10", dtype=torch.float32)
    >>> td = TensorDict({("observation", "image"): torch.zeros(2, 3, 256, 256, dtype=torch.uint8),
    ...                  "instruction": NonTensorStack("open the drawer", "put the bowl on the plate")}, [2])
    >>> policy(td)["action"].shape
    torch.Size([2, 8, 7])
    >>> launched = policy.launch(td)  # queued on the model's device; finish waits for it and decodes
    >>> policy.finish(launched)["action_tokens"].shape
    torch.Size([2, 8, 7])
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, TensorDict, TensorDictBase
from tensordict.nn import InteractionType
from tensordict.utils import NestedKey
from tokenizers import Tokenizer
from torch.distributed.tensor import DTensor
from torch.distributions import Categorical
from torchrl.data.vla import VocabTailActionTokenizer
from torchrl.modules.vla import VLAWrapperBase

# torchrl's OpenVLAImagePreprocessor does not fit as a whole: its reference backend needs torchvision (for the
# JPEG step only) and its "pil" backend resizes before the JPEG round trip. Its plain-torch ports of TensorFlow's
# Lanczos3 resize and 0.9-area crop_and_resize do fit; the JPEG round trip goes through PIL here.
from torchrl.data.vla.preprocessing import _fractional_center_crop, _lanczos3_resize

from .cuda_graphs import GraphedActionLogits, graphs_supported
from .cuda_wait import wait_for_stream
from .jpeg import JPEG_QUALITY, check_jpeg_quality, jpeg_roundtrip
from .lora import adapters_active
from .models.llama_tokenizer import SPIECE_UNDERLINE_ID, load_llama_tokenizer
from .models.openvla_oft import OpenVLAOFT
from .models.openvla_oft_files import REQUIRED_POLICY_FILES, check_files

__all__ = ["LaunchedDecision", "OpenVLAOFTPolicy", "preprocess_images", "prompt_for", "resolve_unnorm_key"]

_UNNORM_ALIASES = {"libero_long": "libero_10"}  # suite name -> dataset name of its statistics
_RESIZE_CHUNK = 8  # images per Lanczos call: bounds the [N, 3, H, W', taps] intermediate


class _SleepingDecoder(VocabTailActionTokenizer):
    """torchrl's decoder, waiting for the GPU asleep first, then LIBERO's gripper step on the last dimension.

    ``VocabTailActionTokenizer.decode`` de-tokenises in NumPy float64 (reference parity), so it copies the
    sampled tokens to the host; that copy waits for the forward that produces them, spinning a CPU core for
    the whole forward (on an H200, 32 envs: 78 s of the policy thread's CPU in a 90 s rollout, a core the
    simulation workers need). Waiting with :func:`~srpo_rl.cuda_wait.wait_for_stream` first leaves the copy
    nothing to wait for. ``tests/test_policy.py`` checks the CPU time on a GPU.

    With ``libero_gripper`` the last dimension ``g`` becomes ``-sign(2 g - 1)``, as the reference's LIBERO
    wrapper does to every action whatever the statistics' ``mask`` says (torchrl's own gripper flags act on
    the dimensions the mask leaves unnormalised only, so statistics without a mask would skip it).
    """

    libero_gripper: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # torchrl decodes in float64 and casts to its centres' dtype: float64 centres keep the gripper's value
        # exact up to the step below (an unnormalised 0.5 + 5e-9 is 0.5 in float32, and sign(0) = 0)
        bins = torch.linspace(-1.0, 1.0, self.num_bins, dtype=torch.float64)
        self.bin_centers = (bins[:-1] + bins[1:]) / 2.0

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_cuda:
            wait_for_stream()
        actions = super().decode(tokens)  # float64
        if self.libero_gripper:
            actions[..., -1] = -torch.sign(2 * actions[..., -1] - 1)
        return actions.float()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device`` without a host sync: a plain ``.to("cuda")`` of pageable memory
    waits for the stream's queued work; from pinned memory the copy is queued behind it instead."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of the CUDA ``tensor``, queued on the current stream (valid once it is done)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass
class LaunchedDecision:
    """A decision :meth:`OpenVLAOFTPolicy.launch` queued: its results on the host once ``done`` has fired.

    Attributes:
        batch_size: the input's batch size.
        results: preprocessed inputs, action tokens and log-probs (pinned host copies, in flight, on CUDA).
        started, done: CUDA events around its GPU work (None off CUDA); :meth:`gpu_ms` reads them.
    """

    batch_size: torch.Size
    results: dict
    started: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None

    def wait(self) -> None:
        """Sleeps until its GPU work is done (at once off CUDA)."""
        if self.done is not None:
            self.done.synchronize()

    def is_done(self) -> bool:
        """Whether its GPU work is done, without waiting (always True off CUDA)."""
        return self.done is None or self.done.query()

    def gpu_ms(self) -> float | None:
        """Milliseconds from the start of its GPU work to its end (once done); None off CUDA.

        The events bracket the launch too: where the host was slower than the GPU (a first call compiling or
        capturing a CUDA graph), the gap is counted.
        """
        return None if self.done is None else self.started.elapsed_time(self.done)


def prompt_for(instruction: str) -> str:
    """The OpenVLA prompt for an instruction (lower-cased, as the reference rollout does)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


def resolve_unnorm_key(norm_stats: dict, unnorm_key: str | None) -> str:
    """The dataset key of ``norm_stats`` to unnormalise with: ``unnorm_key``, else ``<unnorm_key>_no_noops``.

    ``libero_long`` is read as ``libero_10`` (the dataset name of that suite).
    """
    known = ", ".join(sorted(norm_stats)) or "(none: the checkpoint has no dataset_statistics.json)"
    if unnorm_key is None:
        if len(norm_stats) == 1:
            return next(iter(norm_stats))
        raise ValueError(f"the checkpoint has statistics for several datasets; pass unnorm_key, one of {known}")
    key = _UNNORM_ALIASES.get(unnorm_key, unnorm_key)
    for candidate in (key, f"{key}_no_noops"):
        if candidate in norm_stats:
            return candidate
    raise KeyError(f"unknown unnorm_key {unnorm_key!r}; choose one of {known} (or their names without _no_noops)")


@lru_cache(maxsize=1)
def _jpeg_pool() -> ThreadPoolExecutor:
    # PIL releases the GIL while encoding/decoding, so threads give real parallelism
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="jpeg")


def _jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    arrays = list(images.cpu().permute(0, 2, 3, 1).numpy())
    if len(arrays) > 2:
        decoded = list(_jpeg_pool().map(jpeg_roundtrip, arrays, [quality] * len(arrays)))
    else:
        decoded = [jpeg_roundtrip(a, quality) for a in arrays]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()


def preprocess_images(
    images: torch.Tensor,
    *,
    size: int = 224,
    center_crop: bool = True,
    jpeg_quality: int | None = JPEG_QUALITY,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The reference LIBERO frame pipeline: JPEG round trip, Lanczos3 resize to ``size``, 0.9-area center crop.

    Args:
        images: uint8 ``[N, 3, H, W]`` (already rotated by the env).
        size: side of the output (the vision towers' 224).
        center_crop: take the center 0.9 of the area and resize it back to ``size``, as the SRPO / OFT
            LIBERO rollouts do; ``False`` stops after the resize.
        jpeg_quality: quality of the JPEG round trip; ``None`` skips it (the env did it:
            ``LiberoVecEnv(jpeg_quality=95)``, see :mod:`srpo_rl.jpeg`).
        device: where the resize and crop run (the JPEG codec runs on the CPU); default ``images.device``.

    Returns:
        uint8 ``[N, 3, size, size]``, before normalisation.

    Example:
        >>> preprocess_images(torch.zeros(1, 3, 256, 256, dtype=torch.uint8)).shape
        torch.Size([1, 3, 224, 224])
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, 3, H, W]; got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [N, 3, H, W] (channels first, RGB); got shape {list(images.shape)}")
    device = images.device if device is None else torch.device(device)
    if check_jpeg_quality(jpeg_quality) is not None:
        images = _jpeg_roundtrip(images, jpeg_quality)
    return _resize_and_crop(_to_device(images, device), size, center_crop)


def _resize_and_crop(images: torch.Tensor, size: int, center_crop: bool) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> uint8 ``[N, 3, size, size]`` where ``images`` are: Lanczos3, then the crop.
    No host sync (the span tables are cached per device), so a CUDA graph can capture it."""
    resized = [
        _lanczos3_resize(chunk.float(), (size, size)).round_().clamp_(0, 255).to(torch.uint8)
        for chunk in images.split(_RESIZE_CHUNK)
    ]
    out = torch.cat(resized)
    return _fractional_center_crop(out, (size, size)) if center_crop else out


def _normalization(preprocessor_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tower mean/std ``[2, 3]``: ``tvf_normalize_params`` (what the processor applies) else means/stds."""
    params = preprocessor_config.get("tvf_normalize_params")
    if params:
        mean, std = [p["mean"] for p in params], [p["std"] for p in params]
    else:
        mean, std = preprocessor_config.get("means"), preprocessor_config.get("stds")
    mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    if mean.shape != (2, 3) or std.shape != (2, 3):
        raise ValueError(
            "preprocessor_config must give mean/std for 2 towers x 3 channels; "
            f"got {list(mean.shape)} / {list(std.shape)}"
        )
    return mean, std


def _flat_instructions(value: object, count: int) -> list[str]:
    if isinstance(value, NonTensorData):
        value = value.data
    if isinstance(value, str):
        return [value] * count
    items = value.tolist() if hasattr(value, "tolist") else list(value)
    flat = []
    stack = [items]
    while stack:  # flatten nested lists in order (a [B, T] batch gives a list of lists)
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    if len(flat) != count or not all(isinstance(s, str) and s for s in flat):
        raise ValueError(f"expected {count} non-empty instruction strings (one per batch element); got {flat[:4]}...")
    return flat


class OpenVLAOFTPolicy(VLAWrapperBase):
    """OpenVLA-OFT (discrete AC-PD) as a TorchRL token policy with sampling temperature.

    Built on :class:`~torchrl.modules.vla.VLAWrapperBase` (sampling vs argmax by exploration type, per-token
    Categorical, decoding through :class:`~torchrl.data.vla.VocabTailActionTokenizer`); this class adds the
    reference preprocessing, the stored inputs for training-time recomputation and the temperature.

    Reads (batch ``[B]`` or ``[B, T]``; the keys are the ``image_key``, ``instruction_key`` and
    ``wrist_image_key`` arguments): ``("observation", "image")`` uint8 ``[..., 3, H, W]``, ``"instruction"``
    (strings), and ``("observation", "wrist_image")`` when ``num_images_in_input=2``. Writes ``"policy_image"``
    uint8 ``[..., 3k, 224, 224]``, ``"prompt_ids"`` int64 / ``"prompt_mask"`` bool ``[..., L]``, ``"action_tokens"``
    int64 ``[..., 8, 7]`` (index in the 256-token action vocabulary), ``"action_log_prob"`` float32
    ``[..., 8, 7]`` under ``softmax(logits / temperature)`` and ``"action"`` float32 ``[..., 8, 7]``.

    Args:
        model: the network.
        tokenizer: its Llama-2 tokenizer (``tokenizers.Tokenizer``).
        preprocessor_config: the checkpoint's preprocessor_config.json (per-tower normalisation).

    Keyword Args:
        unnorm_key: dataset statistics to unnormalise with (``libero_10`` or ``libero_10_no_noops``, ...).
        temperature: sampling temperature (1.6 in the SRPO recipe); also scales the log-probs.
        center_crop: apply the 0.9-area center crop (as the SRPO/OFT LIBERO rollouts do).
        jpeg_quality: quality of the JPEG round trip (the reference's TensorFlow default, 95); ``None`` when the
            env already applied it in its worker processes (``LiberoVecEnv(jpeg_quality=95)``: the same bytes,
            none of this process's time; see :mod:`srpo_rl.jpeg`).
        num_images_in_input: 1 (third-person camera) or 2 (+ wrist camera).
        libero_gripper: binarise and invert the gripper dimension for LIBERO, as the reference env wrapper does.
        max_prompt_length: width of the stored ``prompt_ids`` (right-padded), so that steps stack across batches
            (256, the recipe's ``data.max_prompt_length``; the forward trims it to the longest prompt).
        cuda_graphs: without gradients, on a CUDA model with plain (not FSDP-sharded) parameters, run the
            forward through CUDA graphs (:class:`~srpo_rl.cuda_graphs.GraphedActionLogits`): a graph per batch
            bucket, captured on first use, so that a forward costs its GPU time, not its kernel launches.
            The graphs read the parameters in place: update weights in place (``load_state_dict`` copies).
        image_key, wrist_image_key, instruction_key: where the camera frames and the task instruction are read.
    """

    def __init__(
        self,
        model: OpenVLAOFT,
        tokenizer: Tokenizer,
        preprocessor_config: dict,
        *,
        unnorm_key: str | None = None,
        temperature: float = 1.6,
        center_crop: bool = True,
        jpeg_quality: int | None = JPEG_QUALITY,
        num_images_in_input: int = 1,
        libero_gripper: bool = True,
        max_prompt_length: int = 256,
        cuda_graphs: bool = True,
        image_key: NestedKey = ("observation", "image"),
        wrist_image_key: NestedKey = ("observation", "wrist_image"),
        instruction_key: NestedKey = "instruction",
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if num_images_in_input not in (1, 2):
            raise ValueError(f"num_images_in_input must be 1 (camera) or 2 (camera + wrist); got {num_images_in_input}")
        cfg = model.config
        super().__init__(
            model,
            action_dim=cfg.action_dim,
            chunk_size=cfg.num_actions_chunk,
            action_head="tokens",
            vocab_size=cfg.n_action_bins,
            output_mode="both",
            return_vla_action_container=False,
            log_probs_mode="token",
            use_state=False,
            default_interaction_type=InteractionType.DETERMINISTIC,
            image_key=image_key,
            wrist_image_key=wrist_image_key,
            state_key=None,
            instruction_key=instruction_key,
            action_key="action",
            action_chunk_key="action",
            action_tokens_key="action_tokens",
            log_probs_key="action_log_prob",
        )
        self.num_images_in_input = num_images_in_input
        self._update_keys()  # the wrist camera is an input when asked for
        self.temperature = float(temperature)
        self.center_crop = center_crop
        self.jpeg_quality = check_jpeg_quality(jpeg_quality)
        self.tokenizer = tokenizer
        self.unnorm_key = resolve_unnorm_key(model.norm_stats, unnorm_key) if (model.norm_stats or unnorm_key) else None
        mean, std = _normalization(preprocessor_config)
        self.register_buffer("image_mean", mean.view(1, 2, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", std.view(1, 2, 3, 1, 1), persistent=False)
        # Window ids 0..255 are action-vocabulary indices (LM id = action_token_begin + index).
        codec = (
            _SleepingDecoder.from_norm_stats(model.norm_stats, self.unnorm_key, num_bins=cfg.n_action_bins)
            if self.unnorm_key is not None
            else _SleepingDecoder(cfg.n_action_bins)
        )
        codec.libero_gripper = libero_gripper
        # Kept out of the module tree: a policy-wide .to(bfloat16) (or FSDP) must not round the float64 q01/q99
        # statistics that the decoder uses (reference parity in float64). The codec moves its lookups itself.
        self.__dict__["action_tokenizer"] = codec
        self.max_prompt_length = max_prompt_length
        self._prompt_cache: dict[str, list[int]] = {}
        self.cuda_graphs = cuda_graphs
        self.__dict__["_graphed"] = None  # (parameters' identity, GraphedActionLogits or None), built on first use
        self.__dict__["_known_prompts"] = None  # (prompt_mask as preprocess stored it, its lengths on the CPU)
        self.__dict__["_known_logits"] = None  # (policy_image as _decision_inputs stored it, the graph's logits)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        unnorm_key: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        attention: str = "bidirectional",
        **kwargs: Any,
    ) -> OpenVLAOFTPolicy:
        """Loads a checkpoint directory (model, tokenizer, statistics, preprocessor config) as a policy.

        ``kwargs`` go to the constructor (``temperature``, ``center_crop``, ``num_images_in_input``, ...).
        """
        path = Path(path)
        check_files(path, REQUIRED_POLICY_FILES)
        model = OpenVLAOFT.from_pretrained(path, dtype=dtype, attention=attention, device=device)
        preprocessor = json.loads((path / "preprocessor_config.json").read_text())
        return cls(model, load_llama_tokenizer(path), preprocessor, unnorm_key=unnorm_key, **kwargs)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """Writes the model as a published checkpoint directory (see :meth:`OpenVLAOFT.save_pretrained`)."""
        self.model.save_pretrained(path, **kwargs)

    # --- keys ----------------------------------------------------------------------------------------------

    def _update_keys(self) -> None:
        keys = self._tensor_keys
        wrist = getattr(self, "num_images_in_input", 1) == 2  # unset while the base class initialises
        self.in_keys = [keys.image] + ([keys.wrist_image] if wrist else []) + [keys.instruction]
        self.out_keys = [
            "policy_image",
            "prompt_ids",
            "prompt_mask",
            keys.action_tokens,
            keys.log_probs,
            keys.action_chunk,
        ]

    # --- inputs --------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.model.projector.fc1.weight.device  # where the model is (FSDP or not): inputs go there

    def _image(self, tensordict: TensorDictBase, key: NestedKey) -> torch.Tensor:
        image = tensordict.get(key, None)
        if image is None:
            raise KeyError(f"the policy input has no {key!r}: uint8 [*batch, 3, H, W] camera frames are required")
        if image.dtype != torch.uint8:
            raise TypeError(f"{key!r} must be uint8 [*batch, 3, H, W]; got dtype {image.dtype}")
        batch = tensordict.batch_size
        if image.ndim != len(batch) + 3 or image.shape[: len(batch)] != batch or image.shape[-3] != 3:
            raise ValueError(
                f"{key!r} must have shape [*batch, 3, H, W] with batch {list(batch)}; got {list(image.shape)}"
            )
        return image.reshape(-1, *image.shape[-3:])

    def _prompts(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt ids and mask ``[B, max_prompt_length]`` on the model's device, and the lengths ``[B]`` on the CPU."""
        rows = []
        for instruction in instructions:
            ids = self._prompt_cache.get(instruction)
            if ids is None:
                ids = self.tokenizer.encode(prompt_for(instruction)).ids
                if ids[-1] != SPIECE_UNDERLINE_ID:  # the model was trained on "Out: <action tokens>"
                    ids.append(SPIECE_UNDERLINE_ID)
                if len(ids) > self.max_prompt_length:
                    raise ValueError(
                        f"the prompt of {instruction!r} has {len(ids)} tokens, more than max_prompt_length="
                        f"{self.max_prompt_length}; raise max_prompt_length"
                    )
                self._prompt_cache[instruction] = ids
            rows.append(ids)
        # A fixed width, so that steps of different batches and rounds stack; the forward trims it again.
        length = self.max_prompt_length
        prompt_ids = torch.full((len(rows), length), self.model.config.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            prompt_ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        mask = torch.arange(length)[None] < lengths[:, None]
        return _to_device(prompt_ids, self._device()), _to_device(mask, self._device()), lengths

    def preprocess(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Writes ``policy_image``, ``prompt_ids`` and ``prompt_mask`` from the raw observation."""
        prompts = self._prompt_inputs(tensordict)
        self._write_inputs(tensordict, self._policy_image(self._frames(tensordict)), prompts)
        return tensordict

    def _frames(self, tensordict: TensorDictBase) -> torch.Tensor | list[torch.Tensor]:
        """Every camera's uint8 ``[N, 3, H, W]`` frames on the model's device, after the JPEG round trip:
        one ``[N, 3k, H, W]`` tensor, or a list where the cameras' sizes differ."""
        keys = self._tensor_keys
        names = [keys.image] + ([keys.wrist_image] if self.num_images_in_input == 2 else [])
        frames = []
        for key in names:
            images = self._image(tensordict, key)
            if self.jpeg_quality is not None:
                images = _jpeg_roundtrip(images, self.jpeg_quality)
            frames.append(_to_device(images, self._device()))
        return torch.cat(frames, dim=1) if len({f.shape for f in frames}) == 1 else frames

    def _policy_image(self, frames: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """:meth:`_frames` -> uint8 ``[N, 3k, S, S]``: each camera resized and cropped."""
        cameras = frames.split(3, dim=1) if isinstance(frames, torch.Tensor) else frames
        size = self.model.config.dino.image_size
        return torch.cat([_resize_and_crop(c, size, self.center_crop) for c in cameras], dim=1)

    def _prepare_images(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(policy_image, pixel_values)`` of :meth:`_frames`: what the CUDA graphs capture with the forward."""
        policy_image = self._policy_image(frames)
        return policy_image, self.pixel_values(policy_image)

    def _prompt_inputs(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_prompts` of the input's instructions."""
        instructions = tensordict.get(self._tensor_keys.instruction, None)
        if instructions is None:
            raise KeyError(
                f"the policy input has no {self._tensor_keys.instruction!r}: one language instruction per batch "
                "element is required"
            )
        return self._prompts(_flat_instructions(instructions, tensordict.batch_size.numel()))

    def _write_inputs(self, tensordict: TensorDictBase, policy_image: torch.Tensor, prompts: tuple) -> None:
        """Writes ``policy_image`` ``[N, 3k, S, S]`` and the :meth:`_prompt_inputs` ``prompts``."""
        batch = tensordict.batch_size
        prompt_ids, prompt_mask, lengths = prompts
        tensordict.set("policy_image", policy_image.reshape(*batch, *policy_image.shape[1:]))
        tensordict.set("prompt_ids", prompt_ids.reshape(*batch, -1))
        tensordict.set("prompt_mask", prompt_mask.reshape(*batch, -1))
        # what the forward would otherwise read back from the GPU (a host sync, with the GPU idle meanwhile)
        self.__dict__["_known_prompts"] = (tensordict.get("prompt_mask"), lengths)

    def _decision_inputs(self, tensordict: TensorDictBase) -> None:
        """:meth:`preprocess`, for a forward that follows at once (sampling or greedy, no gradient).

        Where the forward runs through CUDA graphs, the frames' resize, crop and normalisation run in the
        same graph as the forward (one replay instead of a few dozen kernels launched from Python, each
        waiting for the GIL while the rollout loop runs): :meth:`_action_logits` then takes its logits.
        """
        prompts = self._prompt_inputs(tensordict)
        frames = self._frames(tensordict)
        graphed = self._graphed_forward()
        if graphed is None or not isinstance(frames, torch.Tensor):
            self._write_inputs(tensordict, self._policy_image(frames), prompts)
            return
        ids, _, lengths = prompts
        logits, policy_image = graphed(ids[:, : int(lengths.max())], _to_device(lengths, ids.device), frames)
        self._write_inputs(tensordict, policy_image, prompts)
        self.__dict__["_known_logits"] = (tensordict.get("policy_image"), logits)

    def pixel_values(self, policy_image: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3k, S, S]`` -> normalised float ``[N, 6k, S, S]`` (per image: DINOv2 then SigLIP channels)."""
        n, c, h, w = policy_image.shape
        device = self._device()  # the model's: the policy's own buffers may sit elsewhere (FSDP moves the model)
        x = policy_image.to(device).reshape(n, c // 3, 1, 3, h, w).float().div(255.0)
        if self.image_mean.device != device:  # once, not per call: a copy from host memory would sync the GPU
            self.image_mean, self.image_std = self.image_mean.to(device), self.image_std.to(device)
        mean, std = self.image_mean, self.image_std
        return ((x - mean) / std).reshape(n, 2 * c, h, w)

    # --- VLAWrapperBase hooks ------------------------------------------------------------------------------

    def _action_logits(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Logits ``[*batch, 8, 7, 256]`` divided by the temperature, from the stored policy inputs."""
        missing = [k for k in ("policy_image", "prompt_ids", "prompt_mask") if k not in tensordict.keys()]
        if missing:
            raise KeyError(f"missing {missing}: run the policy forward (or preprocess) on the observation first")
        batch = tensordict.batch_size
        cfg = self.model.config
        image = tensordict.get("policy_image")
        known_image, logits = self._known_logits or (None, None)
        if image is not known_image:
            logits = self._eager_logits(tensordict)
        return (logits / self.temperature).reshape(*batch, cfg.num_actions_chunk, cfg.action_dim, cfg.n_action_bins)

    def _eager_logits(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Logits ``[N, 56, 256]`` of the stored inputs, through the model's own forward (grad where enabled)."""
        image = tensordict.get("policy_image")
        mask = tensordict.get("prompt_mask")
        known_mask, lengths = self._known_prompts or (None, None)
        if mask is not known_mask:  # stored prompts (training): their lengths are read on the host
            if mask.is_cuda:  # wait for the GPU asleep, not spinning
                wait_for_stream()
            used = int(mask.sum(-1).max())
        else:  # prompts this forward's preprocess built: their lengths are known on the host
            used = int(lengths.max())
        ids = tensordict.get("prompt_ids")[..., :used]  # no compute on the fixed-width padding
        mask = mask[..., :used]
        ids = ids.reshape(-1, ids.shape[-1]).to(self._device())
        mask = mask.reshape(-1, mask.shape[-1]).to(self._device())
        pixels = self.pixel_values(image.reshape(-1, *image.shape[-3:]).to(self._device()))
        return self.model(ids, mask, pixels)  # the module's call: FSDP2's hooks gather sharded weights

    def _graphed_forward(self) -> GraphedActionLogits | None:
        """The CUDA-graph runner when this forward may use one (no grad, plain CUDA parameters), else None."""
        if not self.cuda_graphs or torch.is_grad_enabled():
            return None
        probe = self.model.projector.fc1.weight
        # moved, cast, sharded or replaced parameters (a graph reads the old storage), or LoRA adapters added or
        # merged since (a graph replays the forward it captured): decide and capture again
        local = probe.to_local() if isinstance(probe, DTensor) else probe
        adapted = adapters_active(self.model.projector.fc1)
        # (the center crop is captured with the forward)
        key = (type(probe), probe.device, probe.dtype, local.data_ptr(), adapted, self.center_crop)
        if self._graphed is None or self._graphed[0] != key:
            graphed = GraphedActionLogits(self.model, prepare=self._prepare_images) if graphs_supported(self.model) \
                else None
            self.__dict__["_graphed"] = (key, graphed)
        return self._graphed[1]

    def forward(self, tensordict: TensorDictBase, **kwargs: Any) -> TensorDictBase:
        """Preprocesses the observation, then samples (RANDOM exploration) or takes the argmax of every token."""
        try:
            self._decision_inputs(tensordict)
            return super().forward(tensordict, **kwargs)
        finally:
            self._forget_inputs()

    def _forget_inputs(self) -> None:
        """Drops what :meth:`_decision_inputs` knew of its inputs: valid for one forward only."""
        self.__dict__["_known_prompts"] = self.__dict__["_known_logits"] = None

    def launch(self, tensordict: TensorDictBase) -> LaunchedDecision:
        """Queues a sampling decision for ``tensordict`` on the model's device and returns without waiting.

        The first half of :meth:`forward` for a caller that has other work while the GPU computes (a rollout
        pool queues the next batch's forward behind this one before it post-processes this one): the
        preprocessing, the logits, the sampling and the copies of the results to (pinned) host memory are
        all queued; nothing waits for the GPU. :meth:`finish` waits (asleep) and decodes.
        """
        cuda = self._device().type == "cuda"
        started = torch.cuda.Event(enable_timing=True) if cuda else None
        if started is not None:
            started.record()
        try:
            self._decision_inputs(tensordict)
            logits = self._action_logits(tensordict)
        finally:
            self._forget_inputs()
        dist = self._dist_from_logits(logits, tensordict.get(self._tensor_keys.action_mask, None))
        tokens = self._sample_tokens(dist, logits)
        keys = self._tensor_keys
        results = {
            "policy_image": tensordict.get("policy_image"),
            "prompt_ids": tensordict.get("prompt_ids"),
            "prompt_mask": tensordict.get("prompt_mask"),
            keys.action_tokens: tokens,
            keys.log_probs: self._log_prob_tokens(dist, tokens, logits),
        }
        done = None
        if cuda:
            results = {key: _to_host(value) for key, value in results.items()}
            done = torch.cuda.Event(enable_timing=True, blocking=True)  # blocking: finish sleeps on it
            done.record()
        return LaunchedDecision(tensordict.batch_size, results, started, done)

    def finish(self, launched: LaunchedDecision) -> TensorDict:
        """The decision :meth:`launch` queued, on the CPU: ``policy_image``, ``prompt_ids``, ``prompt_mask``,
        the action tokens, their log-probs and the decoded action chunk (what :meth:`forward` writes)."""
        launched.wait()  # asleep: the simulation needs the cores
        results = launched.results
        if launched.done is not None:  # out of pinned memory, which goes back to torch's cache for the next call
            results = {key: value.clone() for key, value in results.items()}
        out = TensorDict(results, batch_size=launched.batch_size)
        keys = self._tensor_keys
        out.set(keys.action_chunk, self.action_tokenizer.decode(out.get(keys.action_tokens)))
        return out

    def get_dist(self, tensordict: TensorDictBase, **kwargs: Any) -> Categorical:
        """``Categorical`` with batch ``[*batch, 8, 7]`` over the 256 action tokens at ``temperature``, recomputed
        (with grad) from the stored ``policy_image`` / ``prompt_ids`` / ``prompt_mask``."""
        return Categorical(logits=self._action_logits(tensordict))

    def log_prob(self, tensordict: TensorDictBase, **kwargs: Any) -> torch.Tensor:
        """Log-probs ``[*batch, 8, 7]`` of the stored ``action_tokens`` (the stored rollout values are left alone)."""
        return self.get_dist(tensordict).log_prob(tensordict.get(self._tensor_keys.action_tokens))
