"""Training-loader throughput and shared-memory footprint against a plain webdataset pipeline.

Data: 256px JPEG shards written to a temporary folder (photo-like colour fields with texture).
Work: the paper's augmentation at ``--image-size`` for n captions x k images per micro-batch.

- stage: ``CaptionBatches`` workers decode, crop, flip and resize to uint8; jitter, grayscale,
  blur and normalisation run batched in the training process (``BatchAugment``, on the GPU when
  there is one);
- baseline: ``webdataset`` + torchvision v2 transforms doing the whole recipe per image in the
  workers (PIL colour ops, 2-D blur kernel) and sending normalised float32 batches.

Rows: images/s of one worker (one thread, no DataLoader), images/s of one process reading
``--workers`` DataLoader workers (the stage including its batched augmentation), the batched
augmentation alone, and the bytes in flight in /dev/shm: one batch x workers x prefetch factor
(4 for both). On a CPU the training process computes on one thread, as a worker does (more
threads beside busy workers oversubscribe the cores). Prints the table and writes JSON to benchmarks/results/loader-<device>.json.

    python benchmarks/loader.py [--captions 8 -k 2 --image-size 224 --workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from _common import finish, sync
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from stablerep.config import TrainConfig
from stablerep.contracts import TarShardWriter, sample_key, sample_members
from stablerep.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    blur_kernel_size,
)
from stablerep.data.loader import CaptionBatches, Layout, create_loader, iterate
from stablerep.data.shards import ShardRef, discover

PREFETCH = 4  # the stage's DataLoader prefetch factor; the baseline gets the same


def _jpeg(rng: np.random.Generator, side: int) -> bytes:
    coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, 8, 8))).float()
    field = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")[0]
    field += torch.from_numpy(rng.normal(0, 0.06, (3, side, side))).float()
    pixels = (field.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: Path, shards: int, captions: int, m: int, side: int
                 ) -> list[ShardRef]:
    """``shards`` finished shards of ``captions`` captions x ``m`` JPEG images each."""
    rng, cid = np.random.default_rng(0), 0
    for index in range(shards):
        stem = f"shard-{index:06d}"
        with open(folder / f"{stem}.tar", "wb") as f:
            writer = TarShardWriter(f)
            for _ in range(captions):
                for j in range(m):
                    writer.write(sample_key(cid, j), sample_members(
                        _jpeg(rng, side), "jpg", f"caption {cid}", {"caption_id": cid}))
                cid += 1
            writer.close()
        (folder / f"{stem}.json").write_text(json.dumps({
            "tar": f"{stem}.tar", "num_captions": captions, "num_samples": captions * m,
            "images_per_caption": m,
            "sha256": hashlib.sha256((folder / f"{stem}.tar").read_bytes()).hexdigest()}))
    return discover([str(folder)])


def baseline_transform(size: int) -> v2.Compose:
    """The recipe as a plain torchvision v2 pipeline: PIL in, normalised float32 out."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def baseline_dataset(shards: list[ShardRef], size: int, batch: int) -> wds.WebDataset:
    return (wds.WebDataset([s.uri for s in shards], shardshuffle=False, empty_check=False)
            .decode("pil").to_tuple("jpg").map_tuple(baseline_transform(size))
            .batched(batch, partial=False))


def _rate(batches, rows_of) -> float:
    """Images/s over ``batches`` after the first (worker start-up and warm-up)."""
    it = iter(batches)
    next(it)
    start, rows = time.perf_counter(), 0
    for b in it:
        rows += rows_of(b)
    return rows / (time.perf_counter() - start)


def stage_rates(shards: list[ShardRef], cfg: TrainConfig, device: str) -> dict[str, float]:
    """The stage's worker rate (in process, one thread) and process rate (DataLoader)."""
    ds = CaptionBatches(shards, cfg, Layout.create(cfg, shards, 1), rank=0, world_size=1)
    ds.set_epoch(0)
    worker = _rate(ds, lambda b: b.images.shape[0])
    aug = BatchAugment(cfg.augmentation, cfg.image_size)
    loader = create_loader(ds, num_workers=cfg.num_workers, pin_memory=device == "cuda")

    def augmented():
        for b in iterate(loader):
            x = aug(b.images.to(device, non_blocking=True), b.seed)
            sync(device)
            yield x

    ds.set_epoch(1)
    return {"worker": worker, "process": _rate(augmented(), lambda x: x.shape[0])}


def augment_rate(cfg: TrainConfig, rows: int, device: str, reps: int = 3) -> float:
    """Images/s of the batched augmentation alone on ``device``."""
    g = torch.Generator().manual_seed(0)
    size = cfg.image_size
    raw = torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    aug = BatchAugment(cfg.augmentation, size)
    aug(raw, 0)
    sync(device)
    start = time.perf_counter()
    for i in range(reps):
        aug(raw, i + 1)
    sync(device)
    return rows * reps / (time.perf_counter() - start)


def baseline_rates(shards: list[ShardRef], size: int, rows: int, workers: int
                   ) -> dict[str, float]:
    worker = _rate(baseline_dataset(shards, size, rows), lambda b: b[0].shape[0])
    loader = DataLoader(baseline_dataset(shards, size, rows), batch_size=None,
                        num_workers=workers, prefetch_factor=PREFETCH if workers else None)
    return {"worker": worker, "process": _rate(loader, lambda b: b[0].shape[0])}


def table(stage: dict[str, float], base: dict[str, float]) -> list[dict]:
    """Rows (figure, stage, baseline, ratio); ratio > 1 is better for the stage."""
    rows = []
    for key, label, higher in [("worker", "images/s per worker", True),
                               ("process", "images/s per process", True),
                               ("augment", "batched augment images/s", True),
                               ("shm_mb", "/dev/shm MB in flight", False)]:
        s, b = stage.get(key), base.get(key)
        ratio = None if s is None or b is None else (s / b if higher else b / s)
        rows.append({"figure": label, "stage": s, "baseline": b, "ratio": ratio})
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captions", type=int, default=8, help="captions per micro-batch (n)")
    p.add_argument("-k", "--images-per-caption", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--source-size", type=int, default=256, help="stored JPEG side")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--captions-per-shard", type=int, default=24)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # as in a DataLoader worker (and the CPU training process)
    n, k, size = args.captions, args.images_per_caption, args.image_size
    cfg = TrainConfig(image_size=size, captions_per_batch=n, images_per_caption=k,
                      num_workers=args.workers, augmentation="stablerep")
    rows = n * cfg.crops_per_caption
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp), args.shards, args.captions_per_shard, k,
                              args.source_size)
        stage = stage_rates(shards, cfg, device)
        stage["augment"] = augment_rate(cfg, rows, device)
        base = baseline_rates(shards, size, rows, args.workers)
    pixels = rows * 3 * size * size
    stage["shm_mb"] = pixels * 1 * args.workers * PREFETCH / 1e6  # uint8
    base["shm_mb"] = pixels * 4 * args.workers * PREFETCH / 1e6  # float32
    results = table(stage, base)
    print(f"device {device}  {size}px from {args.source_size}px JPEG  batch {n} captions x "
          f"{cfg.crops_per_caption} = {rows} images  {args.workers} workers x prefetch "
          f"{PREFETCH}  (baseline: webdataset + torchvision v2)")
    header = f"{'figure':<28} {'stage':>9} {'baseline':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['figure']:<28} {_fmt(r['stage']):>9} {_fmt(r['baseline']):>9} {ratio:>6}")
    finish(f"loader-{device}", {"args": vars(args), "device": device, "results": results},
           device)


if __name__ == "__main__":
    main()
