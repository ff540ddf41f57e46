"""Frozen features: extracted once per (weights, data set, split, input size), then cached.

Extraction runs the backbone without gradients in batches (bf16 autocast on a GPU), shows
progress with images/s, and skips (and counts) images that cannot be decoded; a split in
which none decodes is an error and is not cached. The cache is a ``.npz`` per split under
``<feature_cache>/<backbone key>/<data set>/``, read and written through storage.py, so a
rerun — or the baseline of another run — reuses it.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from stablerep import storage
from stablerep.data.augment import create_eval_transform
from stablerep.errors import InputError
from stablerep.evaluation.backbones import Backbone
from stablerep.evaluation.datasets import ImageList
from stablerep.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Features of one split."""

    x: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n,) int64
    corrupt: int  # images skipped because they could not be decoded
    cached: bool  # read from the cache


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, images: ImageList, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, label = self.images[i]
        if image is None:
            return None, label
        return self.transform(image), label


def _collate(items):
    good = [(x, y) for x, y in items if x is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


def extract(backbone: Backbone, images: ImageList, *, image_size: int, batch_size: int,
            device: str, amp_dtype: torch.dtype | None, num_workers: int, desc: str
            ) -> Features:
    """Run the backbone over a split (no gradients).

    Features stay on ``device`` until the split is done and are copied to the host once, so
    on a GPU the next batch's loading overlaps the current forward instead of waiting for a
    per-batch copy.
    """
    loader = DataLoader(_Transformed(images, create_eval_transform(image_size)),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.startswith("cuda"))
    model = backbone.model.to(device).eval()
    xs, ys, corrupt = [], [], 0
    autocast = (torch.autocast(device.split(":")[0], dtype=amp_dtype) if amp_dtype
                else torch.autocast("cpu", enabled=False))
    with Progress(desc, unit="img", total=len(images), interval_s=15) as progress, \
            torch.inference_mode(), autocast:
        for x, y, bad in loader:
            corrupt += bad
            if x is not None:
                xs.append(model(x.to(device, non_blocking=True)).float())  # (b, d) on device
                ys.append(y)
            progress.update(bad + (0 if x is None else len(x)))
    if corrupt:
        log.warning("%s: skipped %d images that could not be decoded", desc, corrupt)
    # one copy to the host at the end: no per-batch device sync stalls the loader
    feats = torch.cat(xs).cpu().numpy() if xs else np.zeros((0, 0), np.float32)
    labels = torch.cat(ys).numpy().astype(np.int64) if ys else np.zeros(0, np.int64)
    return Features(feats.astype(np.float32), labels, corrupt, cached=False)


def cache_uri(root: str, backbone: Backbone, dataset: str, split: str, image_size: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_")
    return storage.join(root, backbone.key, f"{safe}-{image_size}px", f"{split}.npz")


def load_cached(uri: str) -> Features | None:
    if not storage.exists(uri):
        return None
    with np.load(io.BytesIO(storage.read_bytes(uri))) as npz:
        return Features(npz["x"], npz["y"], int(npz["corrupt"]), cached=True)


def save_cached(uri: str, feats: Features) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=feats.x, y=feats.y, corrupt=np.array(feats.corrupt))
    storage.write_bytes(uri, buf.getvalue())


def features_for(backbone: Backbone, images: ImageList, *, cache_root: str, dataset: str,
                 split: str, image_size: int, **kwargs) -> Features:
    """Cached features of a split, extracting (and caching) them on a miss."""
    uri = cache_uri(cache_root, backbone, dataset, split, image_size)
    cached = load_cached(uri)
    if cached is not None:
        log.info("features: %s %s from cache %s", dataset, split, uri)
        return cached
    feats = extract(backbone, images, image_size=image_size,
                    desc=f"features {dataset} {split}", **kwargs)
    if len(feats.y) == 0:  # nothing to cache: every image failed to decode
        raise InputError(f"{dataset}: no image could be read in its {split} split "
                         f"({feats.corrupt} files tried; none decodes as an image)")
    save_cached(uri, feats)
    return feats
