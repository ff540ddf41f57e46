"""AdamW with the paper's parameter groups, and the per-iteration warmup + cosine schedule.

No weight decay on biases, norm weights, other 1-d parameters, position embeddings and tokens
(``no_weight_decay`` of the model). The learning rate is ``base_lr * rows per step / 512``
(the reference implementation's rule — per 256 two-view pairs — so the paper's base lr 2e-4 at
1376 captions x 6 images gives its 3.2e-3),
raised linearly over the warmup steps, then cosine-decayed to 0 at the last step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stablerep.config import TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
    """base_lr scaled by the images (rows) per optimizer step / 512."""
    return cfg.base_lr * cfg.captions_per_batch * cfg.crops_per_caption / 512


def _strip_wrappers(name: str) -> str:
    """The parameter name without DDP (``module.``) / torch.compile (``_orig_mod.``) prefixes,
    in whatever order and nesting they were applied."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] = frozenset()
                 ) -> list[dict]:
    """Two AdamW groups: decayed (matrices) and not decayed (biases, norms, 1-d, ``skip``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = _strip_wrappers(name)
        if param.ndim <= 1 or name.endswith(".bias") or clean in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


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
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=warmup, total=total))
