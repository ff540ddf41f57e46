"""Stable Diffusion v1.5's architecture with random weights, built offline from its configs.

Throughput does not depend on the weights, so this pipeline measures what the real model
would (the GPU benchmarks and tests use it where no weights can be downloaded). The UNet,
VAE and CLIP text encoder take SD v1.5's published sizes; the tokenizer is the offline CLIP
BPE tokenizer of :mod:`stablerep.generation.tiny`. The images are noise-like, not pictures.
"""

from __future__ import annotations

UNET_BLOCKS = (320, 640, 1280, 1280)  # SD v1.5 UNet channel widths
VAE_BLOCKS = (128, 256, 512, 512)  # SD v1.5 VAE channel widths


def build_sd15_random_pipeline(*, seed: int = 0, dtype=None):
    """A ``StableDiffusionPipeline`` with SD v1.5's architecture and seeded random weights.

    Args:
        seed: torch seed of the weight initialisation.
        dtype: torch dtype to cast the modules to (None keeps fp32).

    Returns:
        The pipeline on the CPU, DDIM scheduler with SD v1.5's noise schedule, no safety
        checker.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from stablerep.generation.tiny import build_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=UNET_BLOCKS, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            sample_size=512, block_out_channels=VAE_BLOCKS,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12,
            num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe if dtype is None else pipe.to(dtype=dtype)
