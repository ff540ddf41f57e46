"""Models: a timm ViT backbone, the projection MLP, the open_clip text tower, and StableRep(+).

- Backbone: any timm ViT (``vit_tiny/small/base/large_patch16_*``), trained from scratch, with
  ``img_size`` configurable; its feature is the CLS token after the final norm.
- Projection head: the paper's 3-layer MLP (768 -> 4096 -> 4096 -> 256 for ViT-B) with
  BatchNorm and ReLU between layers; :func:`convert_sync_batchnorm` makes its statistics global
  for DDP (torch's SyncBatchNorm on GPUs, :class:`GlobalBatchNorm1d` on CPU/gloo, where
  SyncBatchNorm refuses to run).
- Text tower (StableRep+ and CLIP): open_clip's text transformer (width 512, 12 layers, 8 heads,
  context 77, vocab 49408) with its bundled BPE tokenizer, projecting to ``embed_dim``.
- :class:`StableRepModel` ties them together for a method (``stablerep``, ``stablerep_plus``,
  ``simclr``, ``clip``) and carries the learnable logit scale of the image-text loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stablerep.config import TrainConfig
from stablerep.errors import ConfigError

BACKBONES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}
"""Short names accepted for the common backbones (any timm ViT name works too)."""


def timm_name(name: str) -> str:
    return BACKBONES.get(name, name)


def create_backbone(name: str, image_size: int, kwargs: dict[str, Any] | None = None
                    ) -> nn.Module:
    """A randomly initialised timm ViT returning the normalised CLS feature (n, d).

    Args:
        name: a timm ViT name or a short name of :data:`BACKBONES`.
        image_size: input resolution.
        kwargs: further VisionTransformer arguments (``patch_size``, ``depth``,
            ``embed_dim``, ``num_heads`` ...), e.g. a 4-pixel patch for 32 px images.
    """
    import timm

    full = timm_name(name)
    if full not in timm.list_models(full):
        raise ConfigError(f"train.model: {name!r} is not a timm model; e.g. "
                          + ", ".join(BACKBONES.values()))
    try:
        return timm.create_model(full, pretrained=False, num_classes=0, global_pool="token",
                                 img_size=image_size, **(kwargs or {}))
    except (AssertionError, ValueError, TypeError) as e:
        extra = f" with {kwargs}" if kwargs else ""
        raise ConfigError(f"train.model: cannot build {full} at image_size {image_size}{extra} "
                          f"({e})") from None


class ProjectionHead(nn.Module):
    """MLP with BatchNorm + ReLU between layers: in -> hidden -> ... -> out."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover every rank's batch, on any backend.

    torch's SyncBatchNorm runs on GPUs only (DDP rejects it on CPU). This one all-reduces the
    per-feature sums with autograd (two passes: mean, then centred squares), so a CPU/gloo job
    normalises, updates its running statistics and back-propagates as one process holding the
    whole batch would. Without a process group (or in eval mode) it is plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]  # every dim but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        total = float(count.item())
        mean = all_reduce(x.sum(dims)) / total  # (C,)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / total  # (C,) biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                unbiased = var.detach() * total / max(total - 1, 1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, *, cuda: bool) -> nn.Module:
    """BatchNorm layers with statistics over all ranks: SyncBatchNorm on CUDA, else global BN."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        new = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum,
                                module.affine, module.track_running_stats)
        tensors = [*module.parameters(), *module.buffers()]
        if tensors:
            new = new.to(tensors[0].device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, cuda=False)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def create_text_tower(cfg: TrainConfig) -> nn.Module:
    """open_clip's text transformer projecting to ``cfg.embed_dim``."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    text_cfg = CLIPTextCfg(context_length=cfg.text_context, vocab_size=49408,
                           width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers)
    return _build_text_tower(cfg.embed_dim, text_cfg)


def create_tokenizer(context_length: int = 77) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's bundled BPE tokenizer: list of captions -> (n, context_length) int64."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=context_length)
    return lambda texts: tokenizer(list(texts), context_length=context_length)


class StableRepModel(nn.Module):
    """Backbone + the parts a method trains with.

    ``forward(images, tokens)`` returns a dict with ``features`` (n, d) CLS features, and as
    the method needs ``z`` (n, head_out_dim) projections for the multi-positive loss,
    ``image_embeds`` / ``text_embeds`` (n, embed_dim) for the CLIP loss.
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.method = cfg.method
        self.backbone = create_backbone(cfg.model, cfg.image_size, cfg.model_kwargs)
        dim = self.backbone.num_features
        self.head = (ProjectionHead(dim, cfg.head_hidden_dim, cfg.head_out_dim)
                     if cfg.method != "clip" else None)
        if cfg.uses_text:
            self.image_proj = nn.Linear(dim, cfg.embed_dim, bias=False)
            self.text = create_text_tower(cfg)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.image_proj = self.text = self.logit_scale = None

    @property
    def feature_dim(self) -> int:
        return self.backbone.num_features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        features = self.backbone(images)  # (n, d)
        out = {"features": features}
        if self.head is not None:
            out["z"] = self.head(features)  # (n, head_out_dim)
        if self.text is not None and tokens is not None:
            out["image_embeds"] = self.image_proj(features)  # (n, embed_dim)
            out["text_embeds"] = self.text(tokens)  # (captions, embed_dim)
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and 1-d parameters."""
        names = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay",
                                                  lambda: set())()}
        if self.logit_scale is not None:
            names.add("logit_scale")
        if self.text is not None:
            names |= {f"text.{n}" for n, p in self.text.named_parameters()
                      if "positional_embedding" in n or "token_embedding" in n}
        return names


def create_model(cfg: TrainConfig) -> StableRepModel:
    """The model for ``cfg.method``, randomly initialised (seed it before calling)."""
    return StableRepModel(cfg)
