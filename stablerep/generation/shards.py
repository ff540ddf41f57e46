"""Per-image seeds and image encoding for the images contract.

The shard format itself (sample keys, members, shard records, the deterministic tar writer)
lives in :mod:`stablerep.contracts`; import it from there.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

__all__ = ["encode_image", "image_seed", "resize_shorter", "stored_dims"]


def image_seed(global_seed: int, caption_id: int, j: int) -> int:
    """The seed of image ``j`` of caption ``caption_id``: independent of sharding/batching."""
    digest = hashlib.blake2b(f"{global_seed}:{caption_id}:{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def stored_dims(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size`` (0 keeps the size)."""
    if size <= 0 or min(width, height) == size:
        return width, height
    scale = size / min(width, height)
    return round(width * scale), round(height * scale)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic, antialiased); 0 keeps the size."""
    dims = stored_dims(*image.size, size)
    if dims == image.size:
        return image
    return image.resize(dims, Image.Resampling.BICUBIC)


def encode_image(pixels: np.ndarray, *, stored_size: int, fmt: str, quality: int) -> bytes:
    """Encode one (H, W, 3) uint8 image after resizing its shorter side to ``stored_size``."""
    image = resize_shorter(Image.fromarray(pixels, mode="RGB"), stored_size)
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=4)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()
