"""Image augmentations: the paper's recipe, a weaker one, and the evaluation transform.

``stablerep`` (the paper, applied once per image): RandomResizedCrop(scale 0.08-1), ColorJitter
(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale 0.2, GaussianBlur (sigma 0.1-2) p 0.5,
horizontal flip, ImageNet mean/std; optionally a down-and-up resize to 64 or 128 px with a small
probability. ``weak`` (the reference's): RandomResizedCrop(scale 0.5-1) alone. ``none``: resize
+ centre crop.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _blur_kernel(image_size: int) -> int:
    k = max(3, int(0.1 * image_size))
    return k if k % 2 else k + 1


def create_train_transform(kind: str, image_size: int, *, downsample_prob: float = 0.0
                           ) -> Callable[[Image.Image], torch.Tensor]:
    """The training transform: PIL image -> (3, image_size, image_size) float tensor."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "stablerep":
        steps = [
            T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(_blur_kernel(image_size), sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    elif kind == "weak":
        steps = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic)]
    elif kind == "none":
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    if downsample_prob > 0:
        steps.insert(0, RandomDownsample(downsample_prob))
    return T.Compose(steps + normalize)


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
