"""Evaluation-stage speed and accuracy against plain baselines, same features, one run.

Three parts, each timed against its baseline in the same process:

- feature extraction: ``stablerep.evaluation.features.extract`` (DataLoader, inference mode,
  bf16 autocast on a GPU) of a small randomly initialised timm ViT over the 1,797 real
  scikit-learn digits, against a plain loop (the same transform and batches, one forward per
  batch); images/s.
- linear probe: ``stablerep.evaluation.classifiers.linear_probe`` (the full C sweep) against
  scikit-learn's ``LogisticRegression`` (lbfgs) fitted over the same C grid: the same
  stratified held-out split of train, the same standardisation (train mean and unbiased std,
  constant dimensions left unscaled), the same order (strong to weak regularisation, each fit
  warm-started from the previous one), the same absolute gradient tolerance and iteration cap,
  then the chosen C refit on all of train; seconds, chosen C and test top-1 for both.
- few-shot: ``episode_accuracies`` (episodes solved in batches by one L-BFGS run) against a
  loop fitting one ``LogisticRegression`` per episode (same C, tolerance and iteration cap) on
  the same episodes of the same L2-normalised features; seconds and mean query accuracy.

- ImageNet-sized probe (``--size``): ``linear_probe`` over the 45 C values and the refit on
  synthetic features of ImageNet's shape (1.28M x 768, 1,000 classes) times ``--size``; default
  the full size on a GPU and x0.005 on a CPU (6,405 x 768, 10 classes, under a minute). No
  baseline: scikit-learn would take hours at full size.

Threads: ``--threads 0`` (the default) sizes torch and numpy/scikit-learn to the CPUs this
process may use, as the stages do (``stablerep.cpus``); on a machine shared with other jobs,
``--threads 1`` keeps spinning thread pools from making every figure noise.

The probe and few-shot run on two feature sets: the digits features just extracted (real, but
small) and synthetic class-clustered features of ``--n`` x ``--dim`` with ``--classes``
classes (Gaussian clusters with a random per-dimension scale and offset, so standardisation
matters). The default size finishes in a few minutes on 2 CPU cores; ``--n 50000 --dim 768
--classes 100`` is the ImageNet-100-like case. Prints a table (stablerep / baseline seconds,
speed ratio = baseline seconds / stablerep seconds, both accuracies) and writes JSON to
benchmarks/results/evaluation-<device>.json. Absolute times are noisy; the ratios are the point.

    python benchmarks/evaluation.py                  # about a minute on 2 CPU cores
    python benchmarks/evaluation.py --threads 1      # cores shared with other jobs
    python benchmarks/evaluation.py --n 50000 --dim 768 --classes 100 --episodes 600
    python benchmarks/evaluation.py --parts imagenet --size 1   # on a GPU: the full size
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from _common import finish, sync
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from stablerep import cpus
from stablerep.data.augment import create_eval_transform
from stablerep.evaluation.backbones import Backbone, load_backbone
from stablerep.evaluation.classifiers import (
    DEFAULT_C_VALUES,
    episode_accuracies,
    linear_probe,
    sample_episodes,
    stratified_split,
)
from stablerep.evaluation.datasets import ImageList, load_digits_data
from stablerep.evaluation.features import extract


@dataclass
class Row:
    """One comparison of the table."""

    part: str
    case: str
    ours_s: float
    base_s: float
    ours_acc: float | None = None
    base_acc: float | None = None
    note: str = ""

    @property
    def speed(self) -> float:
        return self.base_s / self.ours_s


@dataclass
class FeatureSet:
    """Features of one case: train and test rows with integer labels."""

    name: str
    train_x: np.ndarray  # (n, d) float32
    train_y: np.ndarray  # (n,) int64
    test_x: np.ndarray  # (m, d) float32
    test_y: np.ndarray  # (m,) int64


def race(ours, base, repeats: int) -> tuple[float, float, Any, Any]:
    """Fastest wall times of ``ours()`` and ``base()`` and their last results.

    The two alternate, ``repeats`` rounds: a busy machine hurts both alike.
    """
    best = [float("inf"), float("inf")]
    out: list[Any] = [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ours, base)):
            start = time.perf_counter()
            out[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1], out[0], out[1]


# ----------------------------------------------------------------------- feature extraction


def plain_extract(backbone: Backbone, images: ImageList, *, image_size: int, batch_size: int,
                  device: str, amp_dtype: torch.dtype | None) -> np.ndarray:
    """The straightforward loop: transform, stack, forward, batch after batch."""
    transform = create_eval_transform(image_size)
    model = backbone.model.to(device).eval()
    out = []
    autocast = torch.autocast(device.split(":")[0], dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None)
    with torch.no_grad(), autocast:
        for lo in range(0, len(images), batch_size):
            batch = torch.stack([transform(images[i][0])
                                 for i in range(lo, min(lo + batch_size, len(images)))])
            out.append(model(batch.to(device)).float().cpu())  # (b, d)
    return torch.cat(out).numpy()


def bench_extraction(args: argparse.Namespace, device: str) -> tuple[Row, FeatureSet]:
    """Extraction rate of both loops over digits train + test; the stage's features."""
    data = load_digits_data()
    backbone = load_backbone(f"timm:{args.model}", image_size=args.image_size)
    amp = torch.bfloat16 if device.startswith("cuda") else None
    kw = dict(image_size=args.image_size, batch_size=args.batch_size, device=device,
              amp_dtype=amp)

    def ours():
        feats = [extract(backbone, split, num_workers=0, desc=f"features digits {name}", **kw)
                 for name, split in (("train", data.train), ("test", data.test))]
        sync(device)
        return feats

    def base():
        feats = [plain_extract(backbone, split, **kw) for split in (data.train, data.test)]
        sync(device)
        return feats

    ours()  # warm-up: weights to the device, allocator, kernels
    t_ours, t_base, (tr, te), plain = race(ours, base, args.repeats)
    images = len(data.train) + len(data.test)
    diff = max(float(np.abs(a - b).max()) for a, b in zip((tr.x, te.x), plain, strict=True))
    row = Row("extraction", f"digits {images} img, {args.model} {args.image_size}px",
              t_ours, t_base, note=f"{images / t_ours:,.0f} vs {images / t_base:,.0f} img/s; "
                                   f"features differ by {diff:.1e} at most")
    return row, FeatureSet(f"digits features {tr.x.shape[0]}x{tr.x.shape[1]}, 10 classes",
                           tr.x, tr.y, te.x, te.y)


# ----------------------------------------------------------------------- synthetic features


def synthetic_features(n: int, test: int, dim: int, classes: int, separation: float,
                       seed: int) -> FeatureSet:
    """Gaussian class clusters, then a random per-dimension scale and offset.

    Class means are ``separation / sqrt(dim)`` times a standard normal draw, so the distance
    between two means (in noise standard deviations) does not grow with ``dim``.
    """
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim)) * (separation / np.sqrt(dim))  # (c, d)
    scale = np.exp(rng.standard_normal(dim))  # (d,)
    offset = rng.standard_normal(dim) * 3  # (d,)

    def draw(rows: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(rows) % classes  # balanced
        x = means[y] + rng.standard_normal((rows, dim))  # (rows, d)
        return ((x * scale + offset).astype(np.float32), y.astype(np.int64))

    (trx, try_), (tex, tey) = draw(n), draw(test)
    return FeatureSet(f"synthetic {n}x{dim}, {classes} classes", trx, try_, tex, tey)


# ----------------------------------------------------------------------------- linear probe


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """linear_probe's standardisation in numpy: train mean, unbiased std, constant dims -> 1."""
    mean, std = train.mean(0), train.std(0, ddof=1)
    std = np.where(std > 1e-6 * max(std.max(), 1e-12), std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def zero_gradient(x: np.ndarray, y: np.ndarray) -> float:
    """Largest entry of the mean cross-entropy gradient at zero weights and bias.

    linear_probe's ``tol`` is relative to this; scikit-learn's is absolute on the same
    (sample-averaged) objective, so ``tol * zero_gradient`` is the same stopping rule.
    """
    classes, codes = np.unique(y, return_inverse=True)
    resid = 1.0 / len(classes) - np.eye(len(classes))[codes]  # (n, c)
    return max(float(np.abs(resid.T @ x).max()) / len(x), float(np.abs(resid.mean(0)).max()))


def sklearn_probe(fs: FeatureSet, grid: list[float], *, val_fraction: float, seed: int,
                  max_iter: int, tol: float) -> dict[str, float]:
    """The same protocol as linear_probe with LogisticRegression as the solver."""
    xtr, xte = _standardise(fs.train_x, fs.test_x)
    fit_idx, val_idx = stratified_split(fs.train_y, val_fraction, seed)
    abs_tol = tol * zero_gradient(xtr, fs.train_y)
    clf = LogisticRegression(max_iter=max_iter, tol=abs_tol, warm_start=True)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # ours stops at max_iter silently
        for c in grid:  # increasing C: strong to weak regularisation
            clf.set_params(C=c).fit(xtr[fit_idx], fs.train_y[fit_idx])
            scores.append(clf.score(xtr[val_idx], fs.train_y[val_idx]))
        best = int(np.argmax(scores))  # first maximum: ties -> stronger regularisation
        final = LogisticRegression(C=grid[best], max_iter=max_iter, tol=abs_tol)
        final.fit(xtr, fs.train_y)
    return {"top1": float(final.score(xte, fs.test_y)), "best_c": grid[best],
            "val_top1": float(scores[best])}


def bench_probe(fs: FeatureSet, args: argparse.Namespace, device: str) -> Row:
    """linear_probe against sklearn_probe over the default 45-value C grid."""
    grid = sorted(DEFAULT_C_VALUES)
    opts = dict(val_fraction=0.2, seed=0, max_iter=args.max_iter, tol=1e-3)
    t_ours, t_base, ours, base = race(
        lambda: linear_probe(fs.train_x, fs.train_y, fs.test_x, fs.test_y, c_values=grid,
                             device=device, progress=False, **opts),
        lambda: sklearn_probe(fs, grid, **opts), args.repeats)
    return Row("probe", fs.name, t_ours, t_base, ours.top1, base["top1"],
               f"{len(grid)} C; chosen C {ours.best_c:.3g} vs {base['best_c']:.3g}")


# --------------------------------------------------------------------------------- few-shot


def sklearn_episodes(x: np.ndarray, episodes, *, c: float, max_iter: int,
                     tol: float) -> np.ndarray:
    """Query accuracy of one LogisticRegression per episode, fitted on its support set."""
    accs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for e in episodes:
            clf = LogisticRegression(C=c, max_iter=max_iter, tol=tol)
            clf.fit(x[e.support], e.support_targets)
            accs.append(clf.score(x[e.query], e.query_targets))
    return np.asarray(accs)


def bench_few_shot(fs: FeatureSet, args: argparse.Namespace, device: str) -> Row:
    """episode_accuracies against the per-episode loop, on the test split as the stage does."""
    x = fs.test_x / np.maximum(np.linalg.norm(fs.test_x, axis=1, keepdims=True), 1e-12)
    eps = sample_episodes(fs.test_y, way=args.way, shot=args.shot, query=args.query,
                          episodes=args.episodes, seed=0)
    t_ours, t_base, ours, base = race(
        lambda: episode_accuracies(x, eps, c=1.0, device=device),
        lambda: sklearn_episodes(x, eps, c=1.0, max_iter=500, tol=1e-6), args.repeats)
    return Row("few-shot", fs.name, t_ours, t_base, float(ours.mean()), float(base.mean()),
               f"{args.episodes} episodes {args.way}-way {args.shot}-shot {args.query}-query")


# ------------------------------------------------------------------- ImageNet-sized probe

IMAGENET = (1_281_167, 768, 1000)  # train rows, ViT-B feature dimensions, classes


def imagenet_features(size: float, device: str, seed: int = 0) -> FeatureSet:
    """Synthetic class-clustered features of ImageNet's shape times ``size``.

    Rows scale with ``size``; classes too, but never below 10; the test split has 50 rows per
    class (ImageNet's val). Drawn with torch on ``device`` (float32: 1.28M x 768 is 3.9 GB).
    """
    rows, dim, classes = IMAGENET
    n, c = max(int(rows * size), 20), max(int(classes * size), 10)
    g = torch.Generator(device=device).manual_seed(seed)
    means = torch.randn(c, dim, generator=g, device=device) * (4.0 / dim**0.5)  # (c, d)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.arange(m, device=device) % c  # balanced
        x = means[y] + torch.randn(m, dim, generator=g, device=device)  # (m, d)
        return x.cpu().numpy(), y.cpu().numpy()

    (trx, try_), (tex, tey) = draw(n), draw(50 * c)
    return FeatureSet(f"imagenet x{size:g}: {n}x{dim}, {c} classes", trx, try_, tex, tey)


def bench_imagenet_probe(args: argparse.Namespace, device: str) -> Row:
    """linear_probe (all of DEFAULT_C_VALUES, refit) on ImageNet-shaped features; no baseline.

    scikit-learn would take hours at full size, so the row's baseline time is its own.
    """
    fs = imagenet_features(args.size, device)
    sync(device)
    start = time.perf_counter()
    probe = linear_probe(fs.train_x, fs.train_y, fs.test_x, fs.test_y,
                         c_values=list(DEFAULT_C_VALUES), device=device,
                         max_iter=args.max_iter, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    return Row("probe-in", fs.name, seconds, seconds, probe.top1, None,
               f"{len(DEFAULT_C_VALUES)} C + refit, chosen C {probe.best_c:.3g}, "
               f"held-out top-1 {probe.val_top1:.4f}")


# ------------------------------------------------------------------------------------ main


def print_table(rows: list[Row]) -> None:
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    header = (f"{'part':<10} {'case':<36} {'ours s':>8} {'base s':>8} {'speed x':>8} "
              f"{'ours acc':>9} {'base acc':>9}  note")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.part:<10} {r.case:<36} {r.ours_s:>8.2f} {r.base_s:>8.2f} {r.speed:>8.2f} "
              f"{acc(r.ours_acc):>9} {acc(r.base_acc):>9}  {r.note}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="synthetic train rows")
    p.add_argument("--test", type=int, default=None, help="synthetic test rows [n / 5]")
    p.add_argument("--dim", type=int, default=256, help="synthetic feature dimensions")
    p.add_argument("--classes", type=int, default=20, help="synthetic classes")
    p.add_argument("--separation", type=float, default=4.0,
                   help="distance scale of the synthetic class means (noise std units)")
    p.add_argument("--model", default="vit_tiny", help="backbone of the extraction part")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per probe fit")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shot", type=int, default=5)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--repeats", type=int, default=1, help="best of this many rounds per part")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads of torch and of numpy/scikit-learn (BLAS, OpenMP); "
                        "0 = the usable CPUs, as the stages size them (stablerep.cpus)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=float, default=None,
                   help="ImageNet-sized probe case (1.28M x 768, 1000 classes) times this; "
                        "default 1 on a GPU, 0.005 on the CPU (6,405 x 768, 10 classes, "
                        "under a minute); 0 skips it")
    p.add_argument("--parts", default="extraction,probe,few-shot,imagenet",
                   help="comma-separated parts to run")
    p.add_argument("--skip-few-shot", action="store_true", help="extraction and probe only")
    p.add_argument("--smoke", action="store_true",
                   help="toy size: 1,000 x 32 synthetic features, 5 classes, 20 episodes")
    args = p.parse_args()
    if args.smoke:
        args.n, args.dim, args.classes, args.episodes, args.max_iter = 1000, 32, 5, 20, 30
    return args


def main() -> None:
    args = parse_args()
    device = args.device
    threads = args.threads or cpus.size_threads("bench").intra_op  # as the stages do
    torch.set_num_threads(threads)
    threadpool_limits(threads)  # numpy's BLAS and scikit-learn's OpenMP alike
    parts = set(args.parts.split(","))
    if args.skip_few_shot:
        parts.discard("few-shot")
    if args.size is None:
        args.size = 1.0 if device.startswith("cuda") else 0.005
    rows, sets = [], []
    if "extraction" in parts:
        extraction, digits = bench_extraction(args, device)
        rows.append(extraction)
        sets.append(digits)
    sets.append(synthetic_features(args.n, args.test or max(args.n // 5, 1), args.dim,
                                   args.classes, args.separation, seed=0))
    for fs in sets:
        if "probe" in parts:
            rows.append(bench_probe(fs, args, device))
        if "few-shot" in parts:
            rows.append(bench_few_shot(fs, args, device))
    if "imagenet" in parts and args.size:
        rows.append(bench_imagenet_probe(args, device))
    print(f"device {device}  torch threads {torch.get_num_threads()}  "
          "baseline: plain loop (extraction), scikit-learn LogisticRegression (probe, few-shot)")
    print_table(rows)
    finish(f"evaluation-{device.split(':')[0]}",
           {"args": vars(args), "device": device, "torch_threads": torch.get_num_threads(),
            "results": [{**asdict(r), "speed_ratio": r.speed} for r in rows]}, device)


if __name__ == "__main__":
    main()
