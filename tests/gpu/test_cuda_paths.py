"""GPU tier: the CUDA code paths (fp16 generation, bf16 training step, bf16 features).

Skipped, saying why, on a machine without CUDA (CI has none); run them where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_tiny_generation_on_cuda_fp16(tmp_path):
    from stablerep.config import GenerateConfig
    from stablerep.generation.backends import create_backend
    from stablerep.generation.work import WorkItem

    cfg = GenerateConfig(backend="tiny", tiny_cache=str(tmp_path), height=64, width=64,
                         num_inference_steps=4, device="cuda", dtype="fp16")
    backend = create_backend(cfg)
    items = [WorkItem(i, f"a photo of object {i}", 0, 1000 + i) for i in range(8)]
    images = backend.generate(items)
    assert images.shape == (8, 64, 64, 3) and images.dtype.name == "uint8"
    again = backend.generate(items[:3])  # the same seeds, another batch size
    assert abs(again.astype(int) - images[:3].astype(int)).max() <= 8


def test_training_step_on_cuda_bf16():
    from stablerep.config import TrainConfig
    from stablerep.data.loader import Batch
    from stablerep.distributed import DistEnv
    from stablerep.models import create_model
    from stablerep.training.optim import create_optimizer
    from stablerep.training.trainer import train_step

    cfg = TrainConfig(model="vit_tiny", image_size=32, head_hidden_dim=64, head_out_dim=32,
                      captions_per_batch=8, images_per_caption=2)
    env = DistEnv(device="cuda")
    model = create_model(cfg).to("cuda")
    opt = create_optimizer(model, cfg)
    batch = Batch(images=torch.randn(16, 3, 32, 32), labels=torch.arange(8).repeat_interleave(2),
                  texts=[str(i) for i in range(8)], caption_ids=torch.arange(8), index=0)
    before = next(model.parameters()).detach().clone()
    totals = train_step(model, opt, [batch], cfg, env,
                        autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    assert torch.isfinite(totals["loss"]).item()
    assert not torch.equal(before, next(model.parameters()).detach())
