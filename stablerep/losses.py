"""Contrastive losses: the multi-positive loss of StableRep and the CLIP image-text loss.

Both are pure functions of local embeddings plus an injectable ``gather`` that returns the
global batch (identity in one process; an all-gather that carries gradients under
torch.distributed — see :mod:`stablerep.distributed`). Each rank computes its own rows against
the global batch; with equal local batch sizes the mean of the per-rank losses equals the loss
of one process holding the whole batch, and DDP's gradient averaging makes the gradients equal
too (the all-gather's backward sums every rank's contribution to each local embedding).

The model owns the CLIP logit scale (:mod:`stablerep.models`); the trainer passes it in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Maps a local tensor (n, ...) to the global one (world * n, ...), rank-major."""

SELF_MASK = -1e9  # finite, so 0 * log q stays 0 where q underflows


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    return x


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half/bfloat16 are upcast; float64 is kept, not rounded down)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def multi_positive_loss(
    embeds: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    gather: Gather = identity_gather,
    rank: int = 0,
) -> torch.Tensor:
    """StableRep's multi-positive contrastive loss H(p, q) for this rank's rows.

    For anchor i, the target p_i is uniform over the *other* samples with the same label and
    the prediction q_i is a softmax over all other samples of h_i . h_j / temperature.
    Anchors without a positive contribute 0. With two crops per image as the only positives
    this is SimCLR's loss.

    Args:
        embeds: (n, d) local embeddings (normalised here).
        labels: (n,) int labels, already globally unique across ranks (e.g. offset by
            rank * captions per rank).
        temperature: softmax temperature tau.
        gather: local -> global gather for embeddings and labels (identity for one process).
        rank: this process's rank; its rows sit at [rank * n, (rank + 1) * n) globally.

    Returns:
        Scalar: mean over the local anchors.
    """
    with torch.autocast(embeds.device.type, enabled=False):  # fp32 even inside autocast
        return _multi_positive_loss(embeds, labels, temperature, gather, rank)


def _multi_positive_loss(embeds, labels, temperature, gather, rank):
    local = F.normalize(_upcast(embeds), dim=-1)  # (n, d)
    n = local.shape[0]
    every = gather(local)  # (N, d)
    every_labels = gather(labels)  # (N,)
    logits = local @ every.T / temperature  # (n, N)
    own = torch.arange(n, device=local.device) + rank * n  # columns of the anchors themselves
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(n, device=local.device), own] = True
    logits = logits.masked_fill(self_mask, SELF_MASK)
    positives = (labels[:, None] == every_labels[None, :]) & ~self_mask  # (n, N)
    log_q = F.log_softmax(logits, dim=-1)  # (n, N)
    p = positives.to(log_q.dtype) / positives.sum(1, keepdim=True).clamp(min=1)  # (n, N)
    return -(p * log_q).sum(1).mean()


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: Gather = identity_gather,
    rank: int = 0,
) -> torch.Tensor:
    """Symmetric image-text InfoNCE (CLIP) for this rank's rows against the global batch.

    Args:
        image_embeds: (n, d) local image embeddings (normalised here).
        text_embeds: (n, d) local text embeddings, row i matching image row i.
        logit_scale: scalar log of the inverse temperature (exp() is taken here).
        gather: local -> global gather.
        rank: this process's rank.

    Returns:
        Scalar: (L_i2t + L_t2i) / 2 over the local rows.
    """
    with torch.autocast(image_embeds.device.type, enabled=False):  # fp32 even inside autocast
        return _clip_loss(image_embeds, text_embeds, logit_scale, gather, rank)


def _clip_loss(image_embeds, text_embeds, logit_scale, gather, rank):
    img = F.normalize(_upcast(image_embeds), dim=-1)  # (n, d)
    txt = F.normalize(_upcast(text_embeds), dim=-1)  # (n, d)
    scale = _upcast(logit_scale).exp()
    n = img.shape[0]
    target = torch.arange(n, device=img.device) + rank * n  # (n,)
    logits_i2t = scale * img @ gather(txt).T  # (n, N)
    logits_t2i = scale * txt @ gather(img).T  # (n, N)
    return (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
