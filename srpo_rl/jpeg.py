"""The JPEG round trip of the reference LIBERO rollout: every camera frame is JPEG-encoded and decoded
(quality 95, TensorFlow's default) before the policy's resize, as OpenVLA-OFT saw its training images.

It runs in the policy (:func:`srpo_rl.policy.preprocess_images`) or, with
``LiberoVecEnv(jpeg_quality=95)`` and ``OpenVLAOFTPolicy(jpeg_quality=None)``, in the simulation worker
processes: there it costs no time of the policy's process, whose threads share one GIL
(``benchmarks/gil_contention.py`` measures what a busy thread does to the round trip there). Both places
call :func:`jpeg_roundtrip` on the same rotated ``[H, W, 3]`` frame, so the images are the same bytes.

Example:
    >>> import numpy as np
    >>> jpeg_roundtrip(np.zeros((256, 256, 3), dtype=np.uint8)).shape
    (256, 256, 3)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["JPEG_QUALITY", "check_jpeg_quality", "jpeg_roundtrip"]

#: The reference's quality (TensorFlow's ``encode_jpeg`` default).
JPEG_QUALITY = 95


def check_jpeg_quality(quality: int | None) -> int | None:
    """``quality`` if it is ``None`` (no round trip) or an int in 1..100; else a ``ValueError`` naming it."""
    if quality is None:
        return None
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"jpeg_quality must be None (no JPEG round trip) or an int in 1..100; got {quality!r}")
    return quality


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> the same image JPEG-encoded at ``quality`` and decoded again (PIL)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))
