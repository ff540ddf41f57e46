"""The images contract: sample keys, per-image seeds, image encoding and WebDataset tar shards.

A shard ``images/shard-{i:06d}.tar`` holds one WebDataset sample per *image* in the layout
img2dataset and open_clip use: members ``{key}.jpg`` (or ``.webp``/``.png``), ``{key}.txt``
(the caption) and ``{key}.json`` (metadata), with ``key = {caption_id:012d}_{j:03d}``. The m
images of a caption are adjacent. ``images/shard-{i:06d}.json`` is written after the tar: a
shard exists only when its json exists.

Tars are written with fixed metadata (mtime 0, uid/gid 0, mode 0444, USTAR), so the same
images give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

SHARD_JSON_KIND = "stablerep.images.shard"
MANIFEST_KIND = "stablerep.images"


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def sample_key(caption_id: int, j: int) -> str:
    """The WebDataset key of image ``j`` of caption ``caption_id`` (no dots)."""
    return f"{caption_id:012d}_{j:03d}"


def parse_key(key: str) -> tuple[int, int]:
    """Inverse of :func:`sample_key`."""
    caption_id, j = key.rsplit("_", 1)
    return int(caption_id), int(j)


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


class TarShardWriter:
    """Writes WebDataset samples to a binary stream as a deterministic USTAR tar."""

    def __init__(self, stream: BinaryIO):
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extension (``jpg``, ``txt``, ``json``) to bytes."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()


def sample_members(image: bytes, fmt: str, caption: str, meta: dict[str, Any]) -> dict[str, bytes]:
    """The tar members of one sample, in a fixed order."""
    return {
        fmt: image,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }
