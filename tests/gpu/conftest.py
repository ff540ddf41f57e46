"""The GPU tier's sizes: the real ones on a CUDA device, toy ones in the CPU smoke mode.

Every test of tests/gpu takes the ``profile`` fixture. With a CUDA device it gives the sizes
the issue asks for (SD v1.5's architecture at 512 px, ViT-B/16 at 224 px); without one the
tests skip, saying why, unless ``STABLEREP_GPU_SMOKE=1`` is set: then the same tests run on the
CPU at toy size (tiny SD at 64 px, ViT-Ti at 32 px), so their code paths are exercised where
no GPU is (``benchmarks/gpu/run.sh --smoke`` does this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Profile:
    """Sizes and device of one GPU-tier run."""

    device: str  # cuda or cpu (smoke)
    smoke: bool
    sd_arch: str  # sd15 (SD v1.5 architecture, random weights) or tiny
    size: int  # generation height = width, pixels
    steps: int  # denoising steps in the tests
    vit: str  # training / feature model
    vit_size: int  # its image size
    captions: int  # captions per training batch in the step tests
    k: int  # images per caption in the step tests
    train_steps: int  # `stablerep train` steps of the resume test
    cli_model: tuple[str, ...]  # model options of the `stablerep train` runs
    workers: int  # loader processes of the `stablerep train` runs

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


GPU = Profile(device="cuda", smoke=False, sd_arch="sd15", size=512, steps=10, vit="vit_base",
              vit_size=224, captions=43, k=6, train_steps=200,
              cli_model=("--model", "vit_small", "--image-size", "64"), workers=4)
SMOKE = Profile(device="cpu", smoke=True, sd_arch="tiny", size=64, steps=2, vit="vit_tiny",
                vit_size=32, captions=4, k=2, train_steps=6,
                cli_model=("--model", "vit_tiny", "--image-size", "32", "--set",
                           "train.head_hidden_dim=64", "--set", "train.head_out_dim=32"),
                workers=0)


def smoke_mode() -> bool:
    return os.environ.get("STABLEREP_GPU_SMOKE") == "1"


@pytest.fixture(scope="session")
def profile() -> Profile:
    """The real sizes on CUDA, the toy sizes in smoke mode; otherwise the test skips."""
    if torch.cuda.is_available():
        return GPU
    if smoke_mode():
        return SMOKE
    pytest.skip("no CUDA device on this machine (STABLEREP_GPU_SMOKE=1 runs the toy sizes "
                "on the CPU)")

