"""Image augmentations: the paper's recipe, a weaker one, and the evaluation transform.

``stablerep`` (the paper, applied once per image): RandomResizedCrop(scale 0.08-1), ColorJitter
(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale 0.2, GaussianBlur (sigma 0.1-2) p 0.5,
horizontal flip, ImageNet mean/std; optionally a down-and-up resize to 64 or 128 px with a small
probability. ``weak`` (the reference's): RandomResizedCrop(scale 0.5-1) alone. ``none``: resize
+ centre crop.

Training splits the recipe in two. The per-image geometric part (downsample, crop, flip: crops
differ in size) runs in the loader workers on PIL images and yields uint8 tensors
(:func:`create_train_transform`). The photometric part (jitter, grayscale, blur) and the
normalisation run batched on the training device (:class:`BatchAugment`) with per-sample
parameters drawn from the batch's seed, so a resumed run sees the same augmentations. The
flip moves ahead of the colour ops, with which it commutes (the blur kernel is symmetric).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

JITTER_P, GRAYSCALE_P, BLUR_P = 0.8, 0.2, 0.5
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)


class RandomDownsample:
    """With probability ``p``, resize to one of ``sizes`` and back (a low-resolution view)."""

    def __init__(self, p: float, sizes: tuple[int, ...] = (64, 128)):
        self.p, self.sizes = p, sizes

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        w, h = image.size
        small = image.resize((size, size), Image.Resampling.BICUBIC)
        return small.resize((w, h), Image.Resampling.BICUBIC)


def blur_kernel_size(image_size: int) -> int:
    """The Gaussian blur's kernel size: 10% of the image, odd, at least 3 (23 at 224px)."""
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def create_train_transform(kind: str, image_size: int, *, downsample_prob: float = 0.0
                           ) -> Callable[[Image.Image], torch.Tensor]:
    """The per-image part of training augmentation: PIL image -> (3, size, size) uint8 tensor.

    Args:
        kind: ``stablerep`` (crop scale 0.08-1 + flip), ``weak`` (crop 0.5-1) or ``none``
            (resize + centre crop).
        image_size: output side in pixels.
        downsample_prob: probability of a down-and-up resize before the rest.
    """
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "stablerep":
        steps = [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                 T.RandomHorizontalFlip()]
    elif kind == "weak":
        steps = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic)]
    elif kind == "none":
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    if downsample_prob > 0:
        steps.insert(0, RandomDownsample(downsample_prob))
    return T.Compose([*steps, T.PILToTensor()])


def draw_photometric(count: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-sample jitter/grayscale/blur parameters of ``count`` images, from ``seed`` alone.

    The distributions are torchvision's ``RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8)``,
    ``RandomGrayscale(0.2)`` and ``RandomApply(GaussianBlur(sigma=(0.1, 2)), 0.5)``: factors
    uniform in [0.6, 1.4] (hue shift in [-0.1, 0.1]), the four jitter ops in a random order.
    Every value is drawn for every sample (a fixed number of draws), on the CPU.

    Returns:
        ``jitter``/``gray``/``blur`` (count,) bool; ``order`` (count, 4) op indices
        (0 brightness, 1 contrast, 2 saturation, 3 hue); ``factors`` (count, 4) float;
        ``sigma`` (count,) float.
    """
    g = torch.Generator().manual_seed(int(seed))

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(count, *shape, generator=g)

    jitter = torch.rand(count, generator=g) < JITTER_P
    order = torch.argsort(torch.rand(count, 4, generator=g), dim=1)
    lo = torch.tensor([1 - JITTER[0], 1 - JITTER[1], 1 - JITTER[2], -JITTER[3]])
    hi = torch.tensor([1 + JITTER[0], 1 + JITTER[1], 1 + JITTER[2], JITTER[3]])
    factors = lo + (hi - lo) * torch.rand(count, 4, generator=g)
    gray = torch.rand(count, generator=g) < GRAYSCALE_P
    blur = torch.rand(count, generator=g) < BLUR_P
    sigma = uniform(*BLUR_SIGMA)
    return {"jitter": jitter, "order": order, "factors": factors, "gray": gray, "blur": blur,
            "sigma": sigma}


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # x (m, 3, H, W) in [0, 1]; other broadcastable to x; f (m,) -> f*x + (1-f)*other
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Add ``shift`` (m,) turns to the HSV hue of x (m, 3, H, W) in [0, 1]; s and v stay.

    With v = max, c = max - min (v * s) and h6 the hue in sixths, each channel is
    v - c * clamp(min(k, 4 - k), 0, 1) for k = (5, 3, 1) + h6 mod 6 (the HSV -> RGB map).
    """
    r, g, b = x.unbind(1)
    v, arg = x.max(1)  # (m, H, W); ties go to r, then g, as in RGB -> HSV
    c = v - x.amin(1)
    cc = torch.where(c > 0, c, torch.ones_like(c))
    h6 = torch.where(arg == 0, (g - b) / cc,
                     torch.where(arg == 1, (b - r) / cc + 2, (r - g) / cc + 4))
    h6 = (h6 + 6 * shift.view(-1, 1, 1)).remainder_(6).unsqueeze(1)  # (m, 1, H, W)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6).remainder_(6)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


def _adjust(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One jitter op on ``x`` (m, 3, H, W) with per-sample factors ``f`` (m,)."""
    if op == 0:  # brightness: blend with black
        return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)
    if op == 1:  # contrast: blend with the mean grey level of each image
        return _blend(x, F.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:  # saturation: blend with the grayscale image
        return _blend(x, F.rgb_to_grayscale(x), f)
    return _rotate_hue(x, f)


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices where the CPU bool ``mask`` (m,) holds, on ``device`` (no device sync)."""
    return mask.nonzero().squeeze(1).to(device, non_blocking=True)


def colour_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-sample ColorJitter, batched: at each of 4 stages, each op runs on the samples
    whose order puts it there. x (m, 3, H, W) in [0, 1] on any device; order, factors
    (m, 4) on the CPU."""
    f = factors.to(x.device, non_blocking=True)
    for stage in range(4):
        for op in range(4):
            mask = order[:, stage] == op  # (m,) CPU
            if mask.any():
                rows = _rows(mask, x.device)
                x[rows] = _adjust(x[rows], op, f[rows, op])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-sample Gaussian blur as two 1-D passes (reflect padding, as torchvision's).

    x (m, C, H, W) float; sigma (m,); kernel odd.
    """
    m, c, h, w = x.shape
    sigma = sigma.to(x.device, non_blocking=True)
    t = torch.linspace(-(kernel // 2), kernel // 2, kernel, device=x.device)  # (k,)
    k1 = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)  # (m, k)
    k1 = (k1 / k1.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # (m*C, k)
    pad = kernel // 2
    y = nnf.pad(x.reshape(1, m * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = nnf.conv2d(y, k1.view(m * c, 1, 1, kernel), groups=m * c)  # along W
    y = nnf.conv2d(y, k1.view(m * c, 1, kernel, 1), groups=m * c)  # along H
    return y.view(m, c, h, w)


class BatchAugment:
    """The batched part of training augmentation: uint8 images -> normalised float images.

    Args:
        kind: the augmentation (``stablerep`` adds jitter, grayscale and blur; the others
            only convert and normalise).
        image_size: the image side (sets the blur kernel).
    """

    def __init__(self, kind: str, image_size: int):
        self.photometric = kind == "stablerep"
        self.kernel = blur_kernel_size(image_size)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """images (B, 3, H, W) uint8 on any device -> (B, 3, H, W) float32, normalised.

        float32 throughout, also inside the caller's autocast region.
        """
        with torch.autocast(images.device.type, enabled=False):
            x = images.float().div_(255)
            if self.photometric:
                x = self.photometric_ops(x, draw_photometric(x.shape[0], seed))
            return F.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))

    def photometric_ops(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Jitter, grayscale, blur (in that order) on x (B, 3, H, W) in [0, 1].

        ``p`` (from :func:`draw_photometric`) stays on the CPU, where the rows each op takes
        are found, so the device never waits for the host.
        """
        if p["jitter"].any():
            on = p["jitter"]
            rows = _rows(on, x.device)
            x[rows] = colour_jitter(x[rows], p["order"][on], p["factors"][on])
        if p["gray"].any():
            rows = _rows(p["gray"], x.device)
            x[rows] = F.rgb_to_grayscale(x[rows], 3)
        if p["blur"].any():
            rows = _rows(p["blur"], x.device)
            x[rows] = gaussian_blur(x[rows], p["sigma"][p["blur"]], self.kernel)
        return x


def create_eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (shorter side to size * 256/224) + centre crop + ImageNet normalisation."""
    resize = int(round(image_size * 256 / 224))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def seeded(seed: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` with torch's and Python's RNG seeded by ``seed``; the caller's state is kept."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return fn()
        finally:
            random.setstate(state)
