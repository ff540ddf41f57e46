"""What the evaluation report shows, before any HTML: published numbers, the formatting of
metrics, and its inputs read from storage (the training loss curve, sample images).

Accuracies are fractions; they are shown as percentages with one decimal, and differences as
percentage points ("pp"). Missing or non-finite values are shown as :data:`MISSING`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from stablerep import storage
from stablerep.contracts import KEY_PATTERN, shard_tar_name
from stablerep.data.shards import CaptionGroup, ShardError, iter_caption_groups

log = logging.getLogger(__name__)

PAPER_MODEL = "StableRep ViT-B/16 (paper)"

PAPER_RESULTS: dict[str, dict[str, float]] = {
    # Fine-grained linear probes (SynCLR table, StableRep ViT-B/16 trained on CC12M synthetic).
    "torchvision:FGVCAircraft": {PAPER_MODEL: 59.2},
    "torchvision:StanfordCars": {PAPER_MODEL: 83.5},
    "torchvision:DTD": {PAPER_MODEL: 80.1},
    "torchvision:Flowers102": {PAPER_MODEL: 97.3},
    "torchvision:OxfordIIITPet": {PAPER_MODEL: 88.3},
    "torchvision:SUN397": {PAPER_MODEL: 74.3},
    "torchvision:Caltech101": {PAPER_MODEL: 94.7},
    "torchvision:Food101": {PAPER_MODEL: 85.1},
    "torchvision:VOC2007": {PAPER_MODEL: 87.9},
    # ImageNet linear probe (StableRep 1x schedule on CC12M synthetic; 73.7 with BN).
    "torchvision:ImageNet": {"StableRep 1x CC12M ViT-B/16 (paper)": 72.8},
}
"""Published linear-probe top-1 (percent) keyed by the data set name the eval stage uses."""

PAPER_ALIASES: dict[str, str] = {
    "imagenet": "torchvision:ImageNet",
    "torchvision:Cars": "torchvision:StanfordCars",
    "torchvision:Pets": "torchvision:OxfordIIITPet",
    "torchvision:Flowers": "torchvision:Flowers102",
    "torchvision:VOC": "torchvision:VOC2007",
}
"""Other spellings of the data sets in :data:`PAPER_RESULTS`."""

PAPER_NOTE = (
    "Published numbers are linear-probe top-1 of a ViT-B/16 trained at paper scale (about 10M "
    "CC12M captions x 10 generated images, 224 px, 15 epochs; fine-grained numbers from the "
    "SynCLR table, ImageNet from the StableRep paper with an SGD probe). They are a reference "
    "point, not a target for a small model trained on a small synthetic set."
)

MISSING = "\u2014"  # em dash


def paper_results(dataset: str) -> dict[str, float]:
    """Published numbers for ``dataset`` (exact name, an alias, or a case-insensitive match)."""
    if dataset in PAPER_RESULTS:
        return PAPER_RESULTS[dataset]
    lowered = {k.lower(): k for k in PAPER_RESULTS}
    for key in (dataset, PAPER_ALIASES.get(dataset, "")):
        if key.lower() in lowered:
            return PAPER_RESULTS[lowered[key.lower()]]
    for alias, target in PAPER_ALIASES.items():
        if alias.lower() == dataset.lower():
            return PAPER_RESULTS[target]
    return {}



# ---------------------------------------------------------------------------- numbers


def num(value: Any) -> float | None:
    """A finite float, or None for anything missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def pct(value: Any) -> str:
    v = num(value)
    return MISSING if v is None else f"{100 * v:.1f}"


def delta(value: Any, base: Any) -> str:
    v, b = num(value), num(base)
    if v is None or b is None:
        return MISSING
    return f"{100 * (v - b):+.1f}"


def count(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return MISSING if value is None else str(value)
    return f"{value:,}"


def get(d: dict | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


METRICS = (
    # key, label, path to the value, path to the +- (or None)
    ("top1", "Linear probe top-1", ("linear_probe", "top1"), None),
    ("top5", "Linear probe top-5", ("linear_probe", "top5"), None),
    ("few", "Few-shot", ("few_shot", "mean"), ("few_shot", "ci95")),
    ("knn", "kNN top-1", ("knn", "top1"), None),
)


def metric_text(result: dict | None, path: Sequence[str], ci_path: Sequence[str] | None) -> str:
    text = pct(get(result, *path))
    if ci_path and text != MISSING and num(get(result, *ci_path)) is not None:
        text += f" \u00b1 {pct(get(result, *ci_path))}"
    return text


def dataset_names(metrics: dict, baseline: dict | None) -> list[str]:
    names = list((metrics.get("datasets") or {}).keys())
    for name in (get(baseline, "datasets") or {}):
        if name not in names:
            names.append(name)
    return names


def few_shot_label(metrics: dict, baseline: dict | None) -> str:
    for doc in (metrics, baseline):
        for result in (get(doc, "datasets") or {}).values():
            fs = get(result, "few_shot")
            if isinstance(fs, dict) and "way" in fs and "shot" in fs:
                return f"Few-shot {fs['way']}-way {fs['shot']}-shot"
    return "Few-shot"


def resolve_baseline(metrics: dict, baseline: dict | None) -> dict | None:
    """The given baseline, else the one the eval stage stores inside metrics.json."""
    if baseline is None and isinstance(metrics.get("baseline"), dict):
        return metrics["baseline"]
    return baseline


def model_text(model: Any) -> str:
    """The model line: the timm name called with its ``model_kwargs`` (which override what
    the name says, e.g. ``vit_tiny_patch16_224(patch_size=4, depth=4)``), then the rest."""
    if not isinstance(model, dict):
        return str(model) if model else MISSING
    parts = []
    kwargs = model.get("model_kwargs")
    call = (f"({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
            if isinstance(kwargs, dict) and kwargs else "")
    if model.get("timm_model") is not None or call:
        parts.append(f"{model.get('timm_model') or 'timm model'}{call}")
    for key, label in (("image_size", "image size "), ("feature_dim", "feature dim ")):
        if model.get(key) is not None:
            parts.append(f"{label}{model[key]}")
    parts += [f"{k} {v}" for k, v in model.items()
              if k not in ("timm_model", "image_size", "feature_dim")
              and isinstance(v, (str, int, float))]
    return ", ".join(parts) or MISSING


# ---------------------------------------------------------------------------- images

_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
THUMBNAIL_PX = 256


def _mime(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_data_uri(data: bytes, *, max_px: int = THUMBNAIL_PX) -> str | None:
    """A ``data:`` URI for an encoded image, downscaled (JPEG) when larger than ``max_px``.

    Small JPEG/PNG/WebP/GIF images are embedded byte for byte; an image that cannot be
    decoded yields ``None``.
    """
    from PIL import Image, UnidentifiedImageError

    mime = _mime(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if mime is not None and max(im.size) <= max_px:
                return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            im.load()
            im.thumbnail((max_px, max_px))
            buf = io.BytesIO()
            if im.mode in ("RGBA", "LA", "P"):
                im.convert("RGBA").save(buf, format="PNG")
                mime = "image/png"
            else:
                im.convert("RGB").save(buf, format="JPEG", quality=85)
                mime = "image/jpeg"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# ---------------------------------------------------------------------------- inputs


def read_loss_curve(metrics_jsonl_uri: str) -> list[tuple[int, float]]:
    """``(step, loss)`` from a training run's ``metrics.jsonl``, sorted by step.

    Lines without a numeric ``step`` and ``loss`` (or not JSON) are skipped; when a step
    appears more than once (a resumed run) the last line wins. Non-finite losses are kept
    (the plot leaves them out).
    """
    by_step: dict[int, float] = {}
    skipped = 0
    for line in storage.read_text(metrics_jsonl_uri).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and "loss" not in record and "knn_top1" in record:
            continue  # a kNN check line, not a training step
        step, loss = get(record, "step"), get(record, "loss")
        if (isinstance(step, bool) or not isinstance(step, (int, float))
                or isinstance(loss, bool) or not isinstance(loss, (int, float))):
            skipped += 1
            continue
        by_step[int(step)] = float(loss)
    if skipped:
        log.warning("%s: skipped %d lines without a step and loss", metrics_jsonl_uri, skipped)
    return sorted(by_step.items())


def _by_j(group: CaptionGroup) -> list[bytes]:
    """The group's images ordered by the ``j`` of their keys (stored order otherwise)."""
    def j(item: tuple[str, bytes]) -> int:
        m = KEY_PATTERN.fullmatch(item[0].rsplit("/", 1)[-1])
        return int(m["j"]) if m else 0
    return [image for _, image in sorted(zip(group.keys, group.images, strict=True), key=j)]


def read_sample_grid(images_uri: str, *, captions: int = 6,
                     per_caption: int = 4) -> list[tuple[str, list[bytes]]]:
    """The first ``captions`` captions of ``<images>/shard-000000.tar`` with up to
    ``per_caption`` of their images each, as ``(caption, [encoded image, ...])``.

    The shard is read by the data layer's reader
    (:func:`stablerep.data.shards.iter_caption_groups`), so the report shows the samples
    training reads: a sample without an image or a txt member is skipped and logged. Images
    are ordered by ``j``. The tar is streamed and reading stops once the requested captions
    are complete, so only the start of a large shard is downloaded; a shard that ends early
    (truncated) or is too corrupt yields what was read before; a missing one raises
    :class:`~stablerep.storage.StorageNotFound`.
    """
    if captions <= 0 or per_caption <= 0:
        return []
    uri = storage.join(images_uri, shard_tar_name(0))
    out: list[tuple[str, list[bytes]]] = []
    groups = iter_caption_groups(uri)
    try:
        for group in groups:
            out.append((group.caption.strip(), _by_j(group)[:per_caption]))
            if len(out) == captions:
                break
    except ShardError as e:
        log.warning("%s: stopped reading samples: %s", uri, e)
    finally:
        groups.close()
    return out
