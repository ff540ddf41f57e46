"""AdamW with the paper's parameter groups, and the per-iteration warmup + cosine schedule.

No weight decay on biases, norm weights, other 1-d parameters, position embeddings and tokens
(``no_weight_decay`` of the model). The learning rate is ``base_lr * rows per step / 512``
(the reference implementation's rule — per 256 two-view pairs — so the paper's base lr 2e-4 at
1376 captions x 6 images gives its 3.2e-3),
raised linearly over the warmup steps, then cosine-decayed to 0 at the last step.
"""

from __future__ import annotations

import glob
import math

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import unwrap_model
from torch import nn

from stablerep.config import TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
    """base_lr scaled by the images (rows) per optimizer step / 512."""
    return cfg.base_lr * cfg.captions_per_batch * cfg.crops_per_caption / 512


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] = frozenset()
                 ) -> list[dict]:
    """Two AdamW groups: decayed (matrices) and not decayed (biases, norms, 1-d, ``skip``).

    timm sorts the parameters (``ndim <= 1``, ``.bias``, or a name in ``skip``, names taken
    inside any DDP / torch.compile wrappers); both groups are always returned, decayed
    first, the layout of the optimizer state in existing checkpoints.

    Args:
        model: the model, wrapped or not.
        weight_decay: the decayed group's rate.
        skip: further parameter names of the unwrapped model left without decay.
    """
    # a nonzero marker rate: timm puts everything in one group when the rate is 0
    sorted_groups = param_groups_weight_decay(
        unwrap_model(model), weight_decay=1.0,
        no_weight_decay_list=[glob.escape(name) for name in sorted(skip)])
    by_rate = {g["weight_decay"]: g["params"] for g in sorted_groups}
    return [{"params": by_rate.get(1.0, []), "weight_decay": weight_decay},
            {"params": by_rate.get(0.0, []), "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, cfg: TrainConfig, skip: set[str] = frozenset()
                     ) -> torch.optim.AdamW:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, skip), lr=peak_lr(cfg),
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=True if on_cuda else None)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def create_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int
                     ) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_factor`, stepped once per optimizer step.

    A LambdaLR rather than timm's ``CosineLRScheduler``: this curve holds the peak for two
    steps (the last warmup step and the first cosine step), which timm's (warmup ending
    one step below the peak) cannot give; its state in checkpoints is LambdaLR's.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=warmup, total=total))
