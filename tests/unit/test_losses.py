"""The contrastive losses against independent reference computations (pure CPU, fast).

References are written here from PAPER.md's formula, not from stablerep.losses: a float64
double loop for the multi-positive loss, SimCLR's NT-Xent, a naive CLIP loss, finite
differences, and simulated ranks through the injectable gather.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stablerep.losses import clip_loss, multi_positive_loss

# Uneven positives per label; label 2 is an anchor with no positive.
LABELS = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]


def naive_multi_positive(embeds: torch.Tensor, labels: list[int], tau: float) -> float:
    """PAPER.md's H(p, q) as a float64 double loop over anchors i and others j."""
    h = [row.detach().double() / row.detach().double().norm() for row in embeds]
    n = len(h)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        pos = [j for j in others if labels[j] == labels[i]]
        count = max(len(pos), 1)
        sims = {j: float(h[i] @ h[j]) / tau for j in others}
        top = max(sims.values())
        log_z = top + math.log(sum(math.exp(s - top) for s in sims.values()))
        total += -sum((1.0 / count) * (sims[j] - log_z) for j in pos)
    return total / n


def naive_clip(img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> float:
    img = F.normalize(img.double(), dim=-1)
    txt = F.normalize(txt.double(), dim=-1)
    logits = math.exp(logit_scale) * img @ txt.T
    n = logits.shape[0]
    i2t = -sum(float(logits[i, i] - torch.logsumexp(logits[i, :], 0)) for i in range(n)) / n
    t2i = -sum(float(logits[i, i] - torch.logsumexp(logits[:, i], 0)) for i in range(n)) / n
    return (i2t + t2i) / 2


# ---------------------------------------------------------------- 1. the formula


@pytest.mark.parametrize("tau", [0.1, 0.08, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_multi_positive_matches_naive_double_loop(tau: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(LABELS), 16, generator=g) * 3  # float32, not normalised
    got = multi_positive_loss(embeds, torch.tensor(LABELS), temperature=tau)
    assert got.dtype == torch.float32
    want = naive_multi_positive(embeds, LABELS, tau)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_anchor_without_positive_contributes_zero_but_counts_in_the_mean() -> None:
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(len(LABELS), 8, generator=g, dtype=torch.float64)
    labels = torch.tensor(LABELS)
    full = multi_positive_loss(embeds, labels, temperature=0.1)
    lonely = LABELS.index(2)
    # The lonely anchor's own term is 0: the per-anchor sum over the others equals n * loss.
    per_anchor = []
    for i in range(len(LABELS)):
        perm = [i] + [j for j in range(len(LABELS)) if j != i]
        # Row 0 of a permuted batch is anchor i; with rank 0 and n == 1 via a gather that
        # returns the whole (permuted) batch, the loss is anchor i's term alone.
        whole = F.normalize(embeds[perm], dim=-1)
        term = multi_positive_loss(embeds[i : i + 1], labels[i : i + 1], temperature=0.1,
                                   gather=lambda x, w=whole, p=perm: (
                                       w if x.is_floating_point() else labels[p]),
                                   rank=0)
        per_anchor.append(term.item())
    assert per_anchor[lonely] == 0.0
    assert all(t > 0 for k, t in enumerate(per_anchor) if k != lonely)
    # Mean over *all* anchors, the lonely one included in the denominator.
    assert full.item() == pytest.approx(sum(per_anchor) / len(LABELS), rel=1e-12)
    assert full.item() == pytest.approx(naive_multi_positive(embeds, LABELS, 0.1), rel=1e-12)
    # All anchors lonely: the loss is exactly 0 (and its gradient too).
    e = embeds.clone().requires_grad_(True)
    zero = multi_positive_loss(e, torch.arange(len(LABELS)), temperature=0.1)
    zero.backward()
    assert zero.item() == 0.0
    assert torch.count_nonzero(e.grad) == 0


def test_scale_invariant_in_the_embeddings() -> None:
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(len(LABELS), 8, generator=g, dtype=torch.float64)
    labels = torch.tensor(LABELS)
    scales = torch.rand(len(LABELS), 1, generator=g, dtype=torch.float64) * 10 + 0.1
    a = multi_positive_loss(embeds, labels, temperature=0.1)
    b = multi_positive_loss(embeds * scales, labels, temperature=0.1)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- 2. SimCLR


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_two_crops_is_simclr_nt_xent(tau: float) -> None:
    g = torch.Generator().manual_seed(4)
    n = 6
    z1 = torch.randn(n, 12, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    # SimCLR: 2N views, anchor k's positive is its other crop, cross-entropy over the 2N-1 others.
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / tau
    keep = ~torch.eye(2 * n, dtype=torch.bool)
    logits = sim[keep].view(2 * n, 2 * n - 1)  # diagonal removed
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    target = torch.where(partner > torch.arange(2 * n), partner - 1, partner)
    nt_xent = F.cross_entropy(logits, target)

    labels = torch.cat([torch.arange(n), torch.arange(n)])
    ours = multi_positive_loss(torch.cat([z1, z2]), labels, temperature=tau)
    torch.testing.assert_close(ours, nt_xent, rtol=1e-12, atol=0)
    # Interleaved order (crop pairs adjacent) gives the same number.
    inter = torch.stack([z1, z2], 1).reshape(2 * n, -1)
    ours_inter = multi_positive_loss(inter, torch.arange(n).repeat_interleave(2), temperature=tau)
    torch.testing.assert_close(ours_inter, nt_xent, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- 3. gradients


def test_gradcheck_multi_positive() -> None:
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    assert torch.autograd.gradcheck(
        lambda e: multi_positive_loss(e, labels, temperature=0.1), (embeds,))


def test_gradcheck_clip() -> None:
    g = torch.Generator().manual_seed(6)
    img = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: clip_loss(a, b, s), (img, txt, scale))


def _central_difference(f, x: torch.Tensor, idx: tuple[int, int], eps: float = 1e-6) -> float:
    plus, minus = x.detach().clone(), x.detach().clone()
    plus[idx] += eps
    minus[idx] -= eps
    return (f(plus).item() - f(minus).item()) / (2 * eps)


def test_autograd_matches_hand_finite_differences() -> None:
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor(LABELS)
    embeds = torch.randn(len(LABELS), 5, generator=g, dtype=torch.float64, requires_grad=True)

    def mp(e):
        return multi_positive_loss(e, labels, temperature=0.08)

    mp(embeds).backward()
    for idx in [(0, 0), (5, 3), (9, 4)]:  # (5, *) is the anchor without a positive
        assert embeds.grad[idx].item() == pytest.approx(
            _central_difference(mp, embeds, idx), rel=1e-6, abs=1e-9)

    img = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    scale = torch.tensor(2.5, dtype=torch.float64)

    def cl(a):
        return clip_loss(a, txt, scale)

    cl(img).backward()
    for idx in [(0, 1), (4, 4)]:
        assert img.grad[idx].item() == pytest.approx(
            _central_difference(cl, img, idx), rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- 4. simulated ranks


def _simulate_ranks(raw_chunks, loss_of_rank):
    """Run every rank's loss through a gather that mimics the autograd all-gather.

    ``raw_chunks`` is a list (one per modality) of lists (one per rank) of raw embedding
    chunks. On rank r, the gather returns the concatenation where slice r is the live tensor it
    was given, and every other slice j is ``normalize(leaf_j)`` for a fresh leaf copy of rank
    j's chunk: the gradient each rank's loss sends to slice j lands on that leaf, which is what
    the all-gather's backward routes to rank j (and normalisation there is the same function).
    Non-float inputs (labels) are gathered plainly. Returns the per-rank losses and, per
    modality and chunk, the gradient summed over all ranks' losses.
    """
    world = len(raw_chunks[0])
    grads = [[torch.zeros_like(c) for c in chunks] for chunks in raw_chunks]
    losses = []
    for r in range(world):
        live = [chunks[r].detach().clone().requires_grad_(True) for chunks in raw_chunks]
        leaves = [[c.detach().clone().requires_grad_(True) for c in chunks]
                  for chunks in raw_chunks]
        normed = [[F.normalize(c, dim=-1) for c in mod] for mod in leaves]

        def gather(x, r=r, normed=normed, leaves=leaves):
            if not x.is_floating_point():
                return x  # labels: caller passes the already-global labels by closure
            # Which modality: the live slice is normalize(raw chunk r) of one of them.
            mod = next(m for m in range(len(raw_chunks))
                       if torch.equal(x.detach(), normed[m][r].detach()))
            return torch.cat([x if j == r else normed[mod][j] for j in range(world)])

        loss = loss_of_rank(r, live, gather)
        loss.backward()
        losses.append(loss.detach())
        for m in range(len(raw_chunks)):
            grads[m][r] += live[m].grad
            for j in range(world):
                if j != r and leaves[m][j].grad is not None:
                    grads[m][j] += leaves[m][j].grad
    return losses, grads


@pytest.mark.parametrize("world", [2, 4])
def test_multi_positive_simulated_ranks_equal_one_process(world: int) -> None:
    g = torch.Generator().manual_seed(10 + world)
    n = 5
    # Global labels with positives straddling rank boundaries, uneven counts, one lonely.
    global_labels = torch.randint(0, world * n // 2, (world * n,), generator=g)
    global_labels[0] = 10_000
    full_embeds = torch.randn(world * n, 8, generator=g, dtype=torch.float64)
    chunks = list(full_embeds.chunk(world))
    label_chunks = list(global_labels.chunk(world))

    def loss_of_rank(r, live, gather):
        def gather_all(x):
            return global_labels if not x.is_floating_point() else gather(x)

        return multi_positive_loss(live[0], label_chunks[r], temperature=0.1,
                                   gather=gather_all, rank=r)

    losses, grads = _simulate_ranks([chunks], loss_of_rank)

    whole = full_embeds.clone().requires_grad_(True)
    full = multi_positive_loss(whole, global_labels, temperature=0.1)
    full.backward()
    torch.testing.assert_close(torch.stack(losses).mean(), full.detach(), rtol=1e-6, atol=0)
    # DDP averages gradients over ranks: (sum over ranks) / W == the one-process gradient.
    torch.testing.assert_close(torch.cat(grads[0]) / world, whole.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("world", [2, 4])
def test_clip_simulated_ranks_equal_one_process(world: int) -> None:
    g = torch.Generator().manual_seed(20 + world)
    n = 3
    img = torch.randn(world * n, 8, generator=g, dtype=torch.float64)
    txt = torch.randn(world * n, 8, generator=g, dtype=torch.float64)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)

    def loss_of_rank(r, live, gather):
        return clip_loss(live[0], live[1], scale, gather=gather, rank=r)

    losses, grads = _simulate_ranks([list(img.chunk(world)), list(txt.chunk(world))],
                                    loss_of_rank)

    wi, wt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    full = clip_loss(wi, wt, scale)
    full.backward()
    torch.testing.assert_close(torch.stack(losses).mean(), full.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat(grads[0]) / world, wi.grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads[1]) / world, wt.grad, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- 5. CLIP


@pytest.mark.parametrize("logit_scale", [0.0, math.log(1 / 0.07), math.log(100)])
def test_clip_matches_naive(logit_scale: float) -> None:
    g = torch.Generator().manual_seed(30)
    img = torch.randn(7, 16, generator=g) * 2
    txt = torch.randn(7, 16, generator=g) * 0.5
    got = clip_loss(img, txt, torch.tensor(logit_scale))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_clip(img, txt, logit_scale), rel=1e-5)


def test_clip_loss_trains_the_logit_scale_it_is_given() -> None:
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # the model's initial scale
    g = torch.Generator().manual_seed(31)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss = clip_loss(img, txt, scale)
    assert loss.item() == pytest.approx(naive_clip(img, txt, math.log(1 / 0.07)), rel=1e-5)
    loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad.item() != 0


# ---------------------------------------------------------------- 6. robustness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_temperature_identical_embeddings_is_finite(dtype: torch.dtype) -> None:
    embeds = torch.ones(len(LABELS), 8, dtype=dtype, requires_grad=True)
    loss = multi_positive_loss(embeds, torch.tensor(LABELS), temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(embeds.grad).all()
    # All others equally similar: q uniform over the n - 1 others; 9 of 10 anchors have positives.
    n = len(LABELS)
    assert loss.item() == pytest.approx((n - 1) / n * math.log(n - 1), rel=1e-5)


def test_tiny_temperature_spread_embeddings_is_finite() -> None:
    g = torch.Generator().manual_seed(40)
    embeds = torch.randn(len(LABELS), 4, generator=g, requires_grad=True)
    loss = multi_positive_loss(embeds, torch.tensor(LABELS), temperature=0.01)
    loss.backward()  # q underflows to 0 for some j; p is 0 there, the self-mask is finite
    assert torch.isfinite(loss) and torch.isfinite(embeds.grad).all()
    assert loss.item() == pytest.approx(naive_multi_positive(embeds, LABELS, 0.01), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_run_in_fp32_under_autocast(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(41)
    embeds = torch.randn(len(LABELS), 8, generator=g)
    txt = torch.randn(len(LABELS), 8, generator=g)
    labels = torch.tensor(LABELS)
    want_mp = multi_positive_loss(embeds.to(dtype).float(), labels, temperature=0.1)
    want_clip = clip_loss(embeds.to(dtype).float(), txt.to(dtype).float(), torch.tensor(2.0))
    with torch.autocast("cpu", dtype=dtype):
        got_mp = multi_positive_loss(embeds.to(dtype), labels, temperature=0.1)
        got_clip = clip_loss(embeds.to(dtype), txt.to(dtype), torch.tensor(2.0))
    assert got_mp.dtype == got_clip.dtype == torch.float32
    torch.testing.assert_close(got_mp, want_mp, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_clip, want_clip, rtol=1e-6, atol=0)
