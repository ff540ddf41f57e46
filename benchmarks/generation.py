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
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import torch
from _common import finish, matmul_tflops, sync

from stablerep.captions import load_manifest, make_captions
from stablerep.config import CaptionsConfig, GenerateConfig
from stablerep.generation.backends import DiffusersBackend, load_pipeline, resolve_device
from stablerep.generation.runner import generate
from stablerep.generation.shards import image_seed
from stablerep.generation.tiny import save_tiny_pipeline

UNET_TFLOP_512 = 0.89  # per image per UNet call at 512px
VAE_TFLOP_512 = 2.5  # per image decode at 512px


def build_sd15_random(dtype):
    """Stable Diffusion v1.5's architecture with random weights (no download)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablerep.generation.tiny import build_tokenizer

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)




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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--captions", type=int, default=8)
    p.add_argument("-m", "--images-per-caption", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stored-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "dpmsolver++"])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = resolve_device("auto")
    stored = args.stored_size or (args.size if args.arch == "tiny" else 256)
    cfg = GenerateConfig(backend="diffusers", model=f"random-{args.arch}",
                         images_per_caption=args.images_per_caption,
                         guidance_scale=args.guidance, num_inference_steps=args.steps,
                         scheduler=args.scheduler, height=args.size, width=args.size,
                         stored_size=stored, batch_size=args.batch_size, dtype=args.dtype,
                         compile=args.compile)
    base_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_captions(CaptionsConfig(num_captions=args.captions, num_shards=1),
                      str(work / "captions"))
        captions = load_manifest(str(work / "captions")).read_shard(0)
        pairs = list(zip(captions.column("caption_id").to_pylist(),
                         captions.column("caption").to_pylist(), strict=True))
        if args.arch == "tiny":
            pipe = load_pipeline(str(save_tiny_pipeline(work / "tiny")), dtype=base_dtype,
                                 label="tiny")
        else:
            pipe = build_sd15_random(base_dtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
        pipe.scheduler = (DDIMScheduler if args.scheduler == "ddim" else
                          DPMSolverMultistepScheduler).from_config(pipe.scheduler.config)
        run_baseline(pipe, cfg, pairs[:1], work)  # warm-up
        (work / "base").mkdir()
        sync(device)
        start = time.perf_counter()
        n_base = run_baseline(pipe, cfg, pairs, work / "base")
        sync(device)
        t_base = time.perf_counter() - start
        backend = DiffusersBackend(cfg, pipe, cfg.model)
        generate(cfg, captions=str(work / "captions"), out=str(work / "warm"),
                 backend_factory=lambda _: backend)  # warm-up (compile, allocator)
        sync(device)
        start = time.perf_counter()
        results = generate(cfg, captions=str(work / "captions"), out=str(work / "images"),
                           backend_factory=lambda _: backend)
        sync(device)
        t_stage = time.perf_counter() - start
        n_stage = sum(r.samples for r in results)
    rows = [("baseline", n_base, t_base), ("stage", n_stage, t_stage)]
    scale = (args.size / 512) ** 2
    flop_per_image = (args.steps * UNET_TFLOP_512 * (2 if args.guidance > 1 else 1)
                      + VAE_TFLOP_512) * scale * 1e12
    peak = matmul_tflops(device)
    print(f"device {device}  arch {args.arch}  {args.size}px  {args.steps} {args.scheduler} "
          f"steps  guidance {args.guidance}  m {args.images_per_caption}  "
          f"matmul {peak:.3g} TFLOP/s")
    header = f"{'method':<9} {'images':>7} {'seconds':>8} {'img/s':>8} {'ratio':>6}"
    header += f" {'floor %':>8}" if args.arch == "sd15" else ""
    print(header)
    print("-" * len(header))
    out = []
    for name, n, t in rows:
        rate = n / t
        line = f"{name:<9} {n:>7} {t:>8.2f} {rate:>8.2f} {rate / (n_base / t_base):>6.2f}"
        floor = rate * flop_per_image / (peak * 1e12) * 100
        if args.arch == "sd15":
            line += f" {floor:>8.1f}"
        print(line)
        out.append({"method": name, "images": n, "seconds": t, "images_per_s": rate,
                    "ratio": rate / (n_base / t_base), "floor_pct": floor})
    finish(f"generation-{args.arch}-{device.split(':')[0]}",
           {"args": vars(args), "device": device, "matmul_tflops": peak, "results": out},
           device)


if __name__ == "__main__":
    main()
