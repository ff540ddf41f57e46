"""Generation throughput: the stage against plain diffusers calls, same model, same process.

(a) baseline: the diffusers pipeline called once per caption with default settings
    (``pipe(prompt, num_images_per_prompt=m, generator=[...])``, PIL output, JPEG saved in the
    loop; fp32 on CPU, fp16 on a GPU, no channels_last, no compile);
(b) stage: ``stablerep.generation.runner.generate`` on the same captions and settings
    (batched captions x images, text encoded once per caption, overlapped encoding and
    upload, fp16/bf16 + channels_last on a GPU, optional torch.compile).

Models: ``--arch tiny`` (the offline random-weight tiny SD, CPU-friendly) or ``--arch sd15``
(the real Stable Diffusion v1.5 architecture with random weights; throughput does not depend on
weights: use on a GPU). On a GPU the table also gives the fraction of the compute floor
reached: one SD v1.5 UNet call costs about 0.89 TFLOP per image at 512px (doubled by
guidance), the VAE decode about 2.5 TFLOP per image, against the measured bf16 matmul rate.

    python benchmarks/generation.py --arch tiny --captions 8 -m 4 --size 64 --steps 10
    python benchmarks/generation.py --arch sd15 --size 512 --steps 25 --scheduler dpmsolver++
    python benchmarks/generation.py --arch sd15 --size 512 --steps 25 --scheduler dpmsolver++ \
        --batch-size 16 32 64 --dtype fp16 bf16 --compile --compile-batch-size 32
    python benchmarks/generation.py --smoke      # the same code paths at toy size on the CPU

Several --batch-size / --dtype values give one stage row each (one model build, one baseline);
--compile adds the compiled rows (at --compile-batch-size).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
from _common import finish, matmul_tflops, sync

from stablerep.captions import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig
from stablerep.contracts import load_captions_manifest
from stablerep.generation.backends import DiffusersBackend, load_pipeline, resolve_device
from stablerep.generation.runner import generate
from stablerep.generation.shards import image_seed
from stablerep.generation.tiny import save_tiny_pipeline

UNET_TFLOP_512 = 0.89  # per image per UNet call at 512px
VAE_TFLOP_512 = 2.5  # per image decode at 512px


def build_sd15_random(dtype):
    """Stable Diffusion v1.5's architecture with random weights (no download)."""
    from stablerep.generation.sd15 import build_sd15_random_pipeline

    return build_sd15_random_pipeline(dtype=dtype)


def run_baseline(pipe, cfg: GenerateConfig, captions: list[tuple[int, str]], out: Path) -> int:
    """One pipeline call per caption, the way a first script would do it."""
    count = 0
    for cid, text in captions:
        generators = [torch.Generator("cpu").manual_seed(image_seed(cfg.seed, cid, j))
                      for j in range(cfg.images_per_caption)]
        images = pipe(text, num_images_per_prompt=cfg.images_per_caption,
                      num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
                      generator=generators).images
        for j, image in enumerate(images):
            buf = io.BytesIO()
            image.resize((cfg.stored_size,) * 2).save(buf, format="JPEG", quality=95)
            (out / f"{cid}_{j}.jpg").write_bytes(buf.getvalue())
            count += 1
    return count


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--captions", type=int, default=8)
    p.add_argument("-m", "--images-per-caption", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stored-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmsolver++"])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, nargs="+", default=[16],
                   help="images per denoising call; several values: one stage row each")
    p.add_argument("--dtype", nargs="+", default=["auto"],
                   choices=["auto", "fp32", "fp16", "bf16"], help="one stage row per value")
    p.add_argument("--compile", action="store_true", help="also time the compiled UNet")
    p.add_argument("--compile-batch-size", type=int, nargs="*", default=None,
                   help="batch sizes of the compiled rows [all of --batch-size]")
    p.add_argument("--baseline-captions", type=int, default=0,
                   help="captions of the per-caption baseline [all of --captions]")
    p.add_argument("--smoke", action="store_true",
                   help="toy size on the CPU: tiny arch, 64 px, 2 steps, 2 captions x 2")
    args = p.parse_args()
    if args.smoke:
        args.arch, args.size, args.steps, args.captions = "tiny", 64, 2, 2
        args.images_per_caption, args.batch_size = 2, [4]
    return args


def stage_configs(args: argparse.Namespace) -> list[tuple[str, bool, int]]:
    """(dtype, compile, batch size) of every stage row, eager rows first."""
    rows = [(d, False, b) for d in args.dtype for b in args.batch_size]
    if args.compile:
        sizes = args.batch_size if args.compile_batch_size is None else args.compile_batch_size
        rows += [(d, True, b) for d in args.dtype for b in sizes]
    return rows


def time_stage(pipe, cfg: GenerateConfig, work: Path, name: str,
               device: str) -> tuple[int, float]:
    """Images and seconds of the stage (generation, JPEG encoding, shard writing).

    The backend casts ``pipe`` in place (dtype, channels_last, compiled UNet): rows run in
    the order of :func:`stage_configs`, compiled ones last.
    """
    backend = DiffusersBackend(cfg, pipe, cfg.model)
    # warm-up: one caption (kernels, allocator); a whole batch when compiling (its shapes)
    warm = max(1, cfg.batch_size // cfg.images_per_caption) if cfg.compile else 1
    make_captions(CaptionsConfig(num_captions=warm, num_shards=1), str(work / f"{name}-wcap"))
    generate(cfg, captions=str(work / f"{name}-wcap"), out=str(work / f"{name}-warm"),
             backend_factory=lambda _: backend)
    sync(device)
    start = time.perf_counter()
    results = generate(cfg, captions=str(work / "captions"), out=str(work / name),
                       backend_factory=lambda _: backend)
    sync(device)
    return sum(r.samples for r in results), time.perf_counter() - start


def time_baseline(pipe, cfg: GenerateConfig, pairs, work: Path, device: str,
                  dtype) -> tuple[int, float]:
    """Images and seconds of plain diffusers called once per caption (default settings)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = (DDIMScheduler if cfg.scheduler == "ddim" else
                      DPMSolverMultistepScheduler).from_config(pipe.scheduler.config)
    run_baseline(pipe, cfg, pairs[:1], work)  # warm-up
    (work / "base").mkdir()
    sync(device)
    start = time.perf_counter()
    n = run_baseline(pipe, cfg, pairs, work / "base")
    sync(device)
    return n, time.perf_counter() - start


def save_partial(args, device: str, peak: float, rows: list[dict]) -> None:
    """The rows so far, in the results file that :func:`finish` writes at the end."""
    import json

    from _common import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"generation-{args.arch}-{device.split(':')[0]}.json"
    path.write_text(json.dumps({"args": vars(args), "device": device, "matmul_tflops": peak,
                                "partial": True, "results": rows}, indent=2))


def print_rows(args, device: str, peak: float, rows: list[dict]) -> None:
    print(f"device {device}  arch {args.arch}  {args.size}px  {args.steps} {args.scheduler} "
          f"steps  guidance {args.guidance}  m {args.images_per_caption}  "
          f"matmul {peak:.3g} TFLOP/s")
    header = (f"{'method':<9} {'dtype':>5} {'compile':>7} {'batch':>5} {'images':>7} "
              f"{'seconds':>8} {'img/s':>8} {'ratio':>6} {'floor %':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<9} {r['dtype']:>5} {str(r['compile']).lower():>7} "
              f"{r['batch_size']:>5} {r['images']:>7} {r['seconds']:>8.2f} "
              f"{r['images_per_s']:>8.2f} {r['ratio']:>6.2f} "
              + ("       -" if r["floor_pct"] is None else f"{r['floor_pct']:>8.2f}"))


def main() -> None:
    args = parse_args()
    device = resolve_device("auto")
    stored = args.stored_size or (args.size if args.arch == "tiny" else 256)
    cuda = device.startswith("cuda")
    base_dtype = torch.float16 if cuda else torch.float32
    flop_per_image = (args.steps * UNET_TFLOP_512 * (2 if args.guidance > 1 else 1)
                      + VAE_TFLOP_512) * (args.size / 512) ** 2 * 1e12
    peak = matmul_tflops(device)
    rows: list[dict] = []

    def add(method: str, dtype: str, compiled: bool, batch: int, n: int, t: float) -> None:
        rate = n / t
        rows.append({"method": method, "dtype": dtype, "compile": compiled,
                     "batch_size": batch, "images": n, "seconds": t, "images_per_s": rate,
                     "ratio": rate / rows[0]["images_per_s"] if rows else 1.0,
                     "floor_pct": (rate * flop_per_image / (peak * 1e12) * 100
                                   if args.arch == "sd15" else None)})

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_captions(CaptionsConfig(num_captions=args.captions, num_shards=1),
                      str(work / "captions"))
        table = load_captions_manifest(str(work / "captions")).read_shard(0)
        pairs = list(zip(table.column("caption_id").to_pylist(),
                         table.column("caption").to_pylist(), strict=True))
        if args.arch == "tiny":
            master = load_pipeline(str(save_tiny_pipeline(work / "tiny")), dtype=torch.float32,
                                   label="tiny")
        else:
            master = build_sd15_random(None)
        cfg = GenerateConfig(backend="diffusers", model=f"random-{args.arch}",
                             images_per_caption=args.images_per_caption,
                             guidance_scale=args.guidance, num_inference_steps=args.steps,
                             scheduler=args.scheduler, height=args.size, width=args.size,
                             stored_size=stored)
        base_pairs = pairs[:args.baseline_captions or len(pairs)]
        n, t = time_baseline(master, cfg, base_pairs, work, device, base_dtype)
        add("baseline", str(base_dtype).split(".")[-1].replace("float", "fp"), False, 0, n, t)
        for i, (dtype, compiled, batch) in enumerate(stage_configs(args)):
            run_cfg = GenerateConfig(**{**cfg.__dict__, "batch_size": batch, "dtype": dtype,
                                        "compile": compiled})
            n, t = time_stage(master, run_cfg, work, f"stage{i}", device)
            add("stage", dtype, compiled, batch, n, t)
            print(f"stage {dtype} compile={compiled} batch {batch}: {n / t:.2f} img/s",
                  flush=True)
            save_partial(args, device, peak, rows)  # a run stopped by its cap keeps its rows
    print_rows(args, device, peak, rows)
    finish(f"generation-{args.arch}-{device.split(':')[0]}",
           {"args": vars(args), "device": device, "matmul_tflops": peak,
            "tflop_per_image": flop_per_image / 1e12, "results": rows}, device)


if __name__ == "__main__":
    main()
