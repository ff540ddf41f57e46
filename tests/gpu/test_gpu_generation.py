"""Generation on the GPU: SD v1.5's architecture at 512 px in fp16 and bf16, channels_last,
torch.compile, and the out-of-memory batch halving finishing a shard with the same images.

The pipeline has random weights (none can be downloaded on the GPU machine): its images are
noise-like, but every kernel, dtype and memory format is the real model's. In smoke mode
(``STABLEREP_GPU_SMOKE=1``, no GPU) the same tests run the tiny pipeline at 64 px on the CPU.
"""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from stablerep.captions import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig
from stablerep.generation.backends import DiffusersBackend, load_pipeline
from stablerep.generation.runner import generate
from stablerep.generation.work import WorkItem

CAPTIONS = ["a red bicycle leaning on a brick wall", "two dogs on a beach at sunset",
            "a bowl of ramen on a wooden table", "a lighthouse in the fog"]


@pytest.fixture(scope="module")
def fp32_pipe(profile, tmp_path_factory):
    """The fp32 pipeline on the CPU, built once; each test takes a deep copy."""
    if profile.sd_arch == "sd15":
        from stablerep.generation.sd15 import build_sd15_random_pipeline

        return build_sd15_random_pipeline(seed=0)
    from stablerep.generation.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "tiny")
    return load_pipeline(str(folder), dtype=torch.float32, label="tiny")


def _cfg(profile, **changes) -> GenerateConfig:
    base = dict(backend="diffusers", model=f"random-{profile.sd_arch}", device=profile.device,
                dtype="fp32" if profile.smoke else "fp16", height=profile.size,
                width=profile.size, num_inference_steps=profile.steps,
                scheduler="dpmsolver++", guidance_scale=2.0, images_per_caption=2,
                stored_size=0, batch_size=4)
    return GenerateConfig(**{**base, **changes})


def _backend(profile, fp32_pipe, **changes) -> DiffusersBackend:
    cfg = _cfg(profile, **changes)
    return DiffusersBackend(cfg, copy.deepcopy(fp32_pipe), cfg.model)


def _items(n: int) -> list[WorkItem]:
    return [WorkItem(i // 2, CAPTIONS[(i // 2) % len(CAPTIONS)], i % 2, 1000 + i)
            for i in range(n)]


def _draw(backend: DiffusersBackend, items: list[WorkItem]) -> np.ndarray:
    """Images (n, H, W, 3) uint8; a NaN anywhere in the float output raises."""
    with np.errstate(invalid="raise"):  # NaN -> uint8 is an "invalid value" cast
        return backend.generate(items)


def _close(a: np.ndarray, b: np.ndarray, *, mean: float, worst: int) -> None:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.mean() <= mean and diff.max() <= worst, (float(diff.mean()), int(diff.max()))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sd15_generation_is_finite_and_batch_independent(profile, fp32_pipe, dtype):
    if profile.smoke and dtype == "fp16":
        pytest.skip("fp16 denoising: CUDA only (smoke mode runs on the CPU)")
    backend = _backend(profile, fp32_pipe, dtype=dtype)
    assert backend.pipe.unet.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if profile.cuda:
        weight = backend.pipe.unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last)
    items = _items(4)
    images = _draw(backend, items)
    assert images.shape == (4, profile.size, profile.size, 3) and images.dtype == np.uint8
    assert 5 < images.mean() < 250 and images.std() > 1  # not blank, not saturated
    again = _draw(backend, items[:2])  # the same seeds in a batch of another size
    _close(images[:2], again, mean=2.0, worst=64)


def test_channels_last_matches_the_default_layout(profile, fp32_pipe):
    if not profile.cuda:
        pytest.skip("channels_last is applied on CUDA only (smoke mode runs on the CPU)")
    items = _items(2)
    last = _draw(_backend(profile, fp32_pipe, channels_last=True), items)
    plain = _draw(_backend(profile, fp32_pipe, channels_last=False), items)
    _close(last, plain, mean=2.0, worst=64)


def test_compiled_unet_matches_eager(profile, fp32_pipe):
    if not profile.cuda:
        pytest.skip("torch.compile of the UNet: CUDA only (inductor on 2 CPU cores is minutes)")
    # 32 images in bf16 with channels_last: the shapes of the generation benchmark's compiled
    # row, which then finds this compile in inductor's cache
    items = _items(32)
    eager = _draw(_backend(profile, fp32_pipe, dtype="bf16", batch_size=32), items)
    compiled = _backend(profile, fp32_pipe, dtype="bf16", batch_size=32, compile=True)
    assert type(compiled.pipe.unet).__name__ == "OptimizedModule"
    _close(_draw(compiled, items), eager, mean=2.0, worst=64)


class OomAbove:
    """A backend that runs out of memory (torch.OutOfMemoryError) on batches above ``limit``."""

    def __init__(self, inner: DiffusersBackend, limit: int):
        self.inner, self.limit, self.model_id = inner, limit, inner.model_id
        self.sizes: list[int] = []  # every call's batch size, failed ones included

    def generate(self, items: list[WorkItem]) -> np.ndarray:
        self.sizes.append(len(items))
        if len(items) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {len(items)} > "
                                         f"{self.limit})")
        return self.inner.generate(items)


def _shard_images(folder: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith((".png", ".jpg")):
                    data = tf.extractfile(member).read()
                    out[member.name] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


def test_out_of_memory_halves_the_batch_and_finishes_the_shard(profile, fp32_pipe, tmp_path):
    make_captions(CaptionsConfig(source="synthetic", num_captions=4, num_shards=1),
                  str(tmp_path / "captions"))
    cfg = _cfg(profile, batch_size=8, image_format="png",
               dtype="fp32" if profile.smoke else "bf16")
    inner = DiffusersBackend(cfg, copy.deepcopy(fp32_pipe), cfg.model)
    oom = OomAbove(inner, limit=2)
    [halved] = generate(cfg, captions=str(tmp_path / "captions"), out=str(tmp_path / "oom"),
                        backend_factory=lambda _: oom)
    assert oom.sizes == [8, 4, 2, 2, 2, 2]  # 8 images: two halvings, then batches of 2
    assert halved.samples == 8 and not halved.failed
    small = dict(cfg.__dict__, batch_size=2)
    [plain] = generate(GenerateConfig(**small), captions=str(tmp_path / "captions"),
                       out=str(tmp_path / "plain"), backend_factory=lambda _: inner)
    assert plain.samples == 8
    got, want = _shard_images(tmp_path / "oom"), _shard_images(tmp_path / "plain")
    assert sorted(got) == sorted(want) and len(got) == 8
    for name in want:  # the same calls of the same sizes: the same pixels
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
