"""Training-step throughput: the stage's step against a plain baseline, same model, same run.

A step = forward, multi-positive loss, backward, AdamW update, on a fixed batch of n captions x
k images held on the device (no data loading: this measures the step itself).

- baseline: the straightforward loop — fp32 (CPU) or autocast fp16 with a GradScaler (GPU),
  ``loss.item()`` and a device synchronisation every step, no compile;
- stage: ``stablerep.training.trainer.compute_loss`` with the trainer's settings — bf16
  autocast on a GPU (fp32 on CPU), fused AdamW on a GPU, no per-step host sync, optional
  ``torch.compile``.

On a GPU the table also reports model FLOPs utilisation: a ViT-B/16 forward is about 35 GFLOP
per image at 224px and a training step about 3x that, scaled by (image_size/224)^2 for other
sizes, against the measured bf16 matmul rate.

    python benchmarks/training.py --model vit_tiny --image-size 32 --captions 16 -k 2
    python benchmarks/training.py --model vit_base --image-size 224 --captions 64 -k 6 --compile
    python benchmarks/training.py --hog      # the stage's step beside a CPU hog, < 1 minute

``--hog`` measures the stage's step (CPU) quiet, then beside a process that keeps one core
busy: once with torch's default threads (one per core, as before stablerep.cpus) and once with
the threads ``stablerep.cpus.size_threads`` picks in a container whose CPU limit is the cores
the hog leaves (a fake ``cpu.max``); the sized rate should fall in proportion to the cores
taken, the unsized one falls much further (every parallel region waits for the thread whose
core the hog holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import finish, matmul_tflops, sync

from stablerep import cpus
from stablerep.captions import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig, TrainConfig
from stablerep.data.loader import Batch, CaptionBatches, Layout, create_loader, iterate
from stablerep.data.shards import discover
from stablerep.distributed import DistEnv
from stablerep.generation.runner import generate
from stablerep.losses import multi_positive_loss
from stablerep.models import create_model
from stablerep.training.optim import create_optimizer
from stablerep.training.trainer import compute_loss

VIT_B16_FWD_GFLOP = 35.0


def make_batch(cfg: TrainConfig, n: int, device: str) -> Batch:
    k = cfg.crops_per_caption
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n * k, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    return Batch(images=images, labels=torch.arange(n).repeat_interleave(k),
                 texts=[f"caption {i}" for i in range(n)], caption_ids=torch.arange(n), index=0)


def baseline_step(cfg: TrainConfig, batch: Batch, device: str):
    """The straightforward step, as a closure over its model and optimizer."""
    torch.manual_seed(0)
    model = create_model(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1)
    cuda = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    labels = batch.labels.to(device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            loss = multi_positive_loss(model(batch.images)["z"], labels,
                                       temperature=cfg.temperature)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        loss.item()  # the per-step host sync of a typical loop
        sync(device)

    return step


def stage_step(cfg: TrainConfig, batch: Batch, device: str):
    """The trainer's step, as a closure over its model and optimizer."""
    torch.manual_seed(0)
    model = create_model(cfg).to(device).train()
    opt = create_optimizer(model, cfg, skip=model.no_weight_decay())
    env = DistEnv(device=device)
    net = torch.compile(model) if cfg.compile else model
    amp = torch.bfloat16 if device.startswith("cuda") else None

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=amp or torch.float32,
                            enabled=amp is not None):
            loss, _ = compute_loss(net, batch, cfg, env)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device: str, steps: int) -> float:
    for _ in range(3):  # warm-up (compile, allocator, autotuning)
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def hog_case(cfg: TrainConfig, batch: Batch, steps: int, repeats: int) -> None:
    """The stage's CPU step quiet, then beside a one-core hog unsized and sized; prints rates."""
    step = stage_step(cfg, batch, "cpu")
    cores = cpus.affinity_cpus()
    rows = batch.images.shape[0]

    def rate(threads: int) -> float:
        torch.set_num_threads(threads)
        return rows / min(timed(step, "cpu", steps) for _ in range(repeats))

    quiet = rate(cores)
    print(f"quiet: {quiet:.1f} img/s", flush=True)
    # the hog spins until its parent is gone (even if this process is killed)
    hog = subprocess.Popen([sys.executable, "-c", "import os\nparent = os.getppid()\n"
                            "while os.getppid() == parent:\n    pass\n"])
    try:
        time.sleep(0.5)
        unsized = rate(cores)
        with tempfile.TemporaryDirectory() as root:  # a container limited to the free cores
            Path(root, "cpu.max").write_text(f"{max(cores - 1, 1) * 100000} 100000\n")
            sized = rate(cpus.size_threads("bench-hog", cgroup_root=root).intra_op)
    finally:
        hog.kill()
        hog.wait()
    expected = quiet * max(cores - 1, 1) / cores
    print(f"CPU step, {cores} cores, {rows} images/step, pid {os.getpid()}")
    print(f"quiet, {cores} threads:                  {quiet:8.1f} img/s")
    print(f"beside a 1-core hog, {cores} threads (unsized): {unsized:8.1f} img/s "
          f"({unsized / quiet:.2f}x quiet)")
    print(f"beside a 1-core hog, {torch.get_num_threads()} threads (sized):   {sized:8.1f} img/s "
          f"({sized / quiet:.2f}x quiet; in proportion: {expected:.1f})")
    finish("training-hog", {"cores": cores, "images_per_step": rows, "quiet": quiet,
                            "hog_unsized": unsized, "hog_sized": sized,
                            "sized_threads": torch.get_num_threads()}, "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--captions", type=int, default=16)
    p.add_argument("-k", "--images-per-caption", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--head-hidden", type=int, default=4096)
    p.add_argument("--hog", action="store_true",
                   help="the CPU step beside a one-core hog, with and without thread sizing")
    add_data_args(p)
    args = p.parse_args()
    if args.smoke:
        args.model, args.image_size, args.captions, args.images_per_caption = "vit_tiny", 32, 4, 2
        args.steps, args.repeats, args.head_hidden, args.data_steps = 2, 1, 64, 3
        args.stored_size = 64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(model=args.model, image_size=args.image_size,
                      images_per_caption=args.images_per_caption,
                      captions_per_batch=args.captions, compile=args.compile,
                      head_hidden_dim=args.head_hidden)
    if args.hog:
        hog_case(cfg, make_batch(cfg, args.captions, "cpu"), args.steps, args.repeats)
        return
    batch = make_batch(cfg, args.captions, device)
    rows = batch.images.shape[0]
    steps = {"baseline": baseline_step(cfg, batch, device),
             "stage": stage_step(cfg, batch, device)}
    # Alternate the two, best of --repeats rounds each: a busy machine hurts both alike.
    best = {name: float("inf") for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            best[name] = min(best[name], timed(step, device, args.steps))
    t_base, t_stage = best["baseline"], best["stage"]
    peak = matmul_tflops(device)
    flop_per_img = 3 * VIT_B16_FWD_GFLOP * 1e9 * (args.image_size / 224) ** 2
    print(f"device {device}  model {args.model}  {args.image_size}px  batch {args.captions} "
          f"captions x {args.images_per_caption} = {rows} images  matmul {peak:.3g} TFLOP/s")
    header = f"{'method':<9} {'s/step':>8} {'img/s':>9} {'ratio':>6}"
    mfu = args.model in ("vit_base", "vit_base_patch16_224") and device.startswith("cuda")
    header += f" {'MFU %':>6}" if mfu else ""
    print(header)
    print("-" * len(header))
    out = []
    for name, t in (("baseline", t_base), ("stage", t_stage)):
        rate = rows / t
        line = f"{name:<9} {t:>8.4f} {rate:>9.1f} {t_base / t:>6.2f}"
        util = rate * flop_per_img / (peak * 1e12) * 100
        if mfu:
            line += f" {util:>6.1f}"
        print(line)
        out.append({"method": name, "seconds_per_step": t, "images_per_s": rate,
                    "ratio": t_base / t, "mfu_pct": util if mfu else None})
    data = bench_data_path(cfg, args, device) if args.data_steps else None
    finish(f"training-{args.model}-{device}",
           {"args": vars(args), "device": device, "matmul_tflops": peak, "results": out,
            "data_path": data}, device)


# ------------------------------------------------ the data path: loader alone and end to end


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Options of the data-path part (shards on the local disk through the real loader)."""
    p.add_argument("--data-steps", type=int, default=0,
                   help="steps of the loader-alone and end-to-end parts (0 = skip them)")
    p.add_argument("--workers", type=int, default=0,
                   help="loader processes [the machine's cores - 1]")
    p.add_argument("--stored-size", type=int, default=256, help="pixels of the shard images")
    p.add_argument("--smoke", action="store_true",
                   help="toy size on the CPU: vit_tiny 32 px, 4 captions x 2, a few steps")


class NoiseBackend:
    """Smooth random images (a generation stand-in): shards whose JPEGs decode like photos."""

    model_id = "benchmark/noise"

    def __init__(self, size: int):
        self.size = size

    def generate(self, items) -> np.ndarray:
        out = np.empty((len(items), self.size, self.size, 3), np.uint8)  # (N, H, W, 3)
        for i, item in enumerate(items):
            coarse = np.random.default_rng(item.seed).integers(0, 256, (16, 16, 3), np.uint8)
            out[i] = coarse.repeat(self.size // 16, 0).repeat(self.size // 16, 1)
        return out


def write_shards(root: Path, captions: int, m: int, size: int) -> str:
    """``captions`` x ``m`` JPEG images of ``size`` px in 4 shards under ``root``; the folder."""
    make_captions(CaptionsConfig(num_captions=captions, num_shards=4), str(root / "captions"))
    cfg = GenerateConfig(backend="diffusers", model="benchmark/noise", images_per_caption=m,
                         height=size, width=size, stored_size=0, batch_size=256,
                         all_shards=True, encode_workers=max(2, os.cpu_count() or 2))
    generate(cfg, captions=str(root / "captions"), out=str(root / "images"),
             backend_factory=lambda _: NoiseBackend(size))
    return str(root / "images")


def loader_for(cfg: TrainConfig, images: str, workers: int, cuda: bool):
    shards = discover([images])
    dataset = CaptionBatches(shards, cfg, Layout.create(cfg, shards, 1), rank=0, world_size=1)
    dataset.set_epoch(0)
    return iterate(create_loader(dataset, num_workers=workers, pin_memory=cuda))


def rate_of(batches, steps: int, consume) -> float:
    """Images/s over ``steps`` batches after the first (worker start-up not counted)."""
    consume(next(batches))
    start, rows = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(batches)
        consume(batch)
        rows += batch.images.shape[0]
    return rows / (time.perf_counter() - start)


def bench_data_path(cfg: TrainConfig, args: argparse.Namespace, device: str) -> dict:
    """Loader alone, stage step alone (fixed batch) and the two together, images/s."""
    workers = args.workers or max(1, (os.cpu_count() or 2) - 1)
    k = cfg.crops_per_caption
    data_cfg = dataclasses.replace(cfg, augmentation="none" if args.smoke else cfg.augmentation)
    with tempfile.TemporaryDirectory() as tmp:
        images = write_shards(Path(tmp), (args.data_steps + 2) * cfg.captions_per_batch,
                              max(k, 2), args.stored_size)
        loader_rate = rate_of(loader_for(data_cfg, images, workers, device != "cpu"),
                              args.data_steps, lambda b: None)
        step = stage_step(cfg, make_batch(cfg, cfg.captions_per_batch, device), device)
        step_rate = cfg.captions_per_batch * k / timed(step, device, args.data_steps)
        run = stage_batch_step(cfg, device)
        e2e_rate = rate_of(loader_for(data_cfg, images, workers, device != "cpu"),
                           args.data_steps, run)
    print(f"data path: {workers} loader workers, {args.stored_size}px JPEG shards on the "
          f"local disk, {cfg.captions_per_batch} captions x {k} images per step")
    header = f"{'part':<12} {'img/s':>9}"
    print(header)
    print("-" * len(header))
    rates = {"loader": loader_rate, "step": step_rate, "end_to_end": e2e_rate}
    for name, rate in rates.items():
        print(f"{name:<12} {rate:>9.1f}")
    bound = "loader" if loader_rate < step_rate else "step"
    print(f"bound by the {bound}; end to end reaches "
          f"{e2e_rate / min(loader_rate, step_rate) * 100:.0f}% of the slower part")
    return {"workers": workers, **{f"{k}_images_per_s": v for k, v in rates.items()},
            "bound_by": bound}


def stage_batch_step(cfg: TrainConfig, device: str):
    """The trainer's step on each loaded batch (moved to the device), synchronised."""
    torch.manual_seed(0)
    model = create_model(cfg).to(device).train()
    opt = create_optimizer(model, cfg, skip=model.no_weight_decay())
    env = DistEnv(device=device)
    amp = torch.bfloat16 if device.startswith("cuda") else None

    def step(batch: Batch) -> None:
        batch = dataclasses.replace(batch, images=batch.images.to(device, non_blocking=True))
        with torch.autocast(device.split(":")[0], dtype=amp or torch.float32,
                            enabled=amp is not None):
            loss, _ = compute_loss(model, batch, cfg, env)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    return step


if __name__ == "__main__":
    main()
