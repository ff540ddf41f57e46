"""The batched (on-device) photometric augmentation against the per-image PIL recipe.

The reference is the recipe as the workers applied it before the split (torchvision's PIL
transforms, one image at a time); the batched path is the worker's crop/flip to uint8 followed
by :class:`BatchAugment`. The two draw different random numbers, so they are compared in
distribution: parameter draws against torchvision's own ``get_params``, the share of grayscale
outputs, and the pixel mean/std over a batch; each op is compared exactly with torchvision's
single-image functional op.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from stablerep.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    blur_kernel_size,
    colour_jitter,
    create_train_transform,
    draw_photometric,
    gaussian_blur,
    seeded,
)

SIZE = 64


def reference_transform(image_size: int) -> T.Compose:
    """The paper's recipe, per PIL image, as the loader workers ran it before the split."""
    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _sources(count: int = 6, side: int = 80) -> list[Image.Image]:
    """Photo-like images: smooth colour fields with some texture."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, 6, 6))).float()
        field = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic")[0]
        field = field + torch.from_numpy(rng.normal(0, 0.05, (3, side, side))).float()
        pixels = (field.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out.append(Image.fromarray(pixels))
    return out


def _reference_outputs(n: int) -> torch.Tensor:
    sources, transform = _sources(), reference_transform(SIZE)
    return seeded(1, lambda: torch.stack([transform(sources[i % len(sources)])
                                          for i in range(n)]))  # (n, 3, S, S)


def _batched_outputs(n: int) -> torch.Tensor:
    sources, crop = _sources(), create_train_transform("stablerep", SIZE)
    raw = seeded(2, lambda: torch.stack([crop(sources[i % len(sources)]) for i in range(n)]))
    assert raw.dtype == torch.uint8 and raw.shape == (n, 3, SIZE, SIZE)
    return torch.cat([BatchAugment("stablerep", SIZE)(raw[i:i + 64], seed=i)
                      for i in range(0, n, 64)])


def _is_gray(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + mean  # (n, 3, S, S) in [0, 1]
    return (rgb.amax(1) - rgb.amin(1)).amax(dim=(1, 2)) < 2 / 255  # (n,)


def test_output_statistics_match_the_per_image_recipe() -> None:
    n = 512
    old, new = _reference_outputs(n), _batched_outputs(n)
    assert torch.isfinite(new).all() and new.shape == old.shape
    gray_old, gray_new = _is_gray(old).float().mean(), _is_gray(new).float().mean()
    assert abs(gray_old - 0.2) < 0.05 and abs(gray_new - 0.2) < 0.05, (gray_old, gray_new)
    # per-channel mean and std of output pixels over the batch
    m_old, m_new = old.mean(dim=(0, 2, 3)), new.mean(dim=(0, 2, 3))
    s_old, s_new = old.std(dim=(0, 2, 3)), new.std(dim=(0, 2, 3))
    assert torch.allclose(m_old, m_new, atol=0.08), (m_old, m_new)
    assert torch.allclose(s_old, s_new, rtol=0.06), (s_old, s_new)
    # texture: mean absolute horizontal gradient (blur and crop scale drive it)
    g_old = (old[..., 1:] - old[..., :-1]).abs().mean()
    g_new = (new[..., 1:] - new[..., :-1]).abs().mean()
    assert abs(g_old - g_new) / g_old < 0.1, (g_old, g_new)


def test_parameter_draws_follow_torchvisions_distributions() -> None:
    n = 20000
    p = draw_photometric(n, seed=5)
    assert abs(p["jitter"].float().mean() - 0.8) < 0.015
    assert abs(p["gray"].float().mean() - 0.2) < 0.015
    assert abs(p["blur"].float().mean() - 0.5) < 0.015
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    torch.manual_seed(5)
    ref = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
           for _ in range(4000)]
    ref_factors = torch.tensor([r[1:] for r in ref])  # (4000, 4)
    ref_sigma = torch.tensor([T.GaussianBlur.get_params(0.1, 2.0) for _ in range(4000)])
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    for col in range(4):
        got, want = p["factors"][:, col].quantile(q), ref_factors[:, col].quantile(q)
        assert torch.allclose(got, want, atol=0.03), (col, got, want)
    assert torch.allclose(p["sigma"].quantile(q), ref_sigma.quantile(q), atol=0.06)
    # the op order: each op at each stage a quarter of the time, as torch.randperm(4)
    share = torch.stack([(p["order"] == op).float().mean(0) for op in range(4)])  # (op, stage)
    assert torch.allclose(share, torch.full((4, 4), 0.25), atol=0.02)
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # each a permutation


def test_each_op_equals_torchvisions_single_image_op() -> None:
    x = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    f = torch.tensor([0.7, 1.3, 0.95, 1.4])
    hue = torch.tensor([-0.1, 0.03, 0.08, -0.05])
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for op, fn in enumerate(ops):
        factors = torch.zeros(4, 4)
        factors[:, op] = hue if op == 3 else f
        order = torch.tensor([[op, *[o for o in range(4) if o != op]]] * 4)
        # the other three ops at identity factors (hue 0, the rest 1)
        factors[:, [o for o in range(3) if o != op]] = 1.0
        got = colour_jitter(x.clone(), order, factors)
        want = torch.stack([fn(x[i], float(factors[i, op])) for i in range(4)])
        assert torch.allclose(got, want, atol=1e-5), fn.__name__
    sigma = torch.tensor([0.1, 0.8, 1.5, 2.0])
    want = torch.stack([F.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2) for i in range(4)])
    assert torch.allclose(gaussian_blur(x, sigma, 7), want, atol=1e-5)


@pytest.mark.parametrize("kind", ["stablerep", "none"])
def test_the_same_seed_gives_the_same_augmentation(kind: str) -> None:
    raw = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    aug = BatchAugment(kind, 32)
    assert torch.equal(aug(raw, 7), aug(raw, 7))
    if kind == "none":  # conversion and normalisation alone, as ToTensor + Normalize
        want = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(raw.float() / 255)
        assert torch.allclose(aug(raw, 7), want, atol=1e-6)
        assert torch.equal(aug(raw, 7), aug(raw, 8))
    else:
        assert not torch.equal(aug(raw, 7), aug(raw, 8))


def test_an_autocast_region_leaves_the_augmentation_in_float32() -> None:
    raw = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1))
    aug = BatchAugment("stablerep", 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = aug(raw, 3)
    assert inside.dtype == torch.float32 and torch.equal(inside, aug(raw, 3))
