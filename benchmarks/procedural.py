"""Procedural backend throughput on one CPU core against its target (100 img/s per core).

Renders ``--images`` grammar captions (drawn by the procedural caption source) with their own
seeds through ``ProceduralBackend.generate`` in batches of 64, at each ``--sizes`` edge, after
one warm-up batch (fonts load and glyphs are cached on first use), in this single process
(numpy and PIL use one thread here). Prints a table -- size, images, wall seconds, img/s,
img per CPU-second (the figure to read on a shared machine), the target and the ratio of img/s
to it -- and writes JSON to benchmarks/results/procedural.json. Image encoding and tar writing
are not included.

    python benchmarks/procedural.py [--images 2000] [--sizes 32 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from stablerep.captions.procedural import draw_captions
from stablerep.config import GenerateConfig, ProceduralCaptionsConfig
from stablerep.generation.procedural import ProceduralBackend
from stablerep.generation.shards import image_seed
from stablerep.generation.work import WorkItem

RESULTS = Path(__file__).parent / "results"
TARGET_IMG_S = 100.0  # "hundreds of images/s on one core"
BATCH = 64


def measure(size: int, items: list[WorkItem]) -> dict[str, float]:
    """Render ``items`` at ``size`` px; seconds and img/s after a warm-up batch."""
    backend = ProceduralBackend(GenerateConfig(backend="procedural", height=size, width=size))
    backend.generate(items[:BATCH])
    start, cpu_start = time.perf_counter(), time.process_time()
    for pos in range(0, len(items), BATCH):
        backend.generate(items[pos:pos + BATCH])
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {"size": size, "images": len(items), "seconds": round(seconds, 3),
            "img_per_s": round(len(items) / seconds, 1), "cpu_seconds": round(cpu, 3),
            "img_per_cpu_s": round(len(items) / cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    captions = [c for c, _ in draw_captions(ProceduralCaptionsConfig(), args.images, seed=0)]
    items = [WorkItem(i, c, 0, image_seed(0, i, 0)) for i, c in enumerate(captions)]
    rows = [measure(size, items) for size in args.sizes]
    print(f"{'size':>5} {'images':>7} {'seconds':>8} {'img/s':>8} {'img/cpu-s':>10} "
          f"{'target':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['size']:>5} {r['images']:>7} {r['seconds']:>8.2f} {r['img_per_s']:>8.1f} "
              f"{r['img_per_cpu_s']:>10.1f} {TARGET_IMG_S:>7.0f} "
              f"{r['img_per_s'] / TARGET_IMG_S:>6.2f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "procedural.json"
    path.write_text(json.dumps({"target_img_per_s": TARGET_IMG_S, "rows": rows}, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
