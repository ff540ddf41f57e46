"""Evaluation on the GPU: bf16 feature extraction, every classifier on the device, and
`stablerep eval` end to end with ``--device cuda``.

The features come from a randomly initialised timm ViT (no weights can be downloaded there)
over class-coloured synthetic images written as an image folder, so no scikit-learn data set
is needed. In smoke mode (``STABLEREP_GPU_SMOKE=1``, no GPU) the same tests run on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablerep.evaluation.backbones import load_backbone
from stablerep.evaluation.classifiers import (
    episode_accuracies,
    knn_accuracy,
    linear_probe,
    sample_episodes,
)

CLASSES = ("red", "green", "blue", "grey")
RUN_TIMEOUT_S = 300


def _write_folder(root: Path, per_class: int) -> Path:
    """``train/<class>/*.png`` and ``test/<class>/*.png``: noisy tints, one per class."""
    rng = np.random.default_rng(0)
    tints = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
             "grey": (120, 120, 120)}
    for split in ("train", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise = rng.integers(-60, 60, (48, 48, 3))
                pixels = np.clip(np.array(tints[name]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _model_spec(profile) -> tuple[str, int]:
    return ("timm:vit_base_patch16_224", 224) if profile.cuda else ("timm:vit_tiny_patch16_224",
                                                                    32)


def test_bf16_features_match_fp32(profile, tmp_path):
    from stablerep.evaluation.datasets import load_imagefolder
    from stablerep.evaluation.features import extract

    if not profile.cuda:
        pytest.skip("bf16 autocast of the features: CUDA only (smoke mode runs on the CPU)")
    spec, size = _model_spec(profile)
    backbone = load_backbone(spec, image_size=size)
    images = load_imagefolder(str(_write_folder(tmp_path / "imgs", per_class=8))).train
    kw = dict(image_size=size, batch_size=16, device="cuda", num_workers=0, desc="gpu test")
    low = extract(backbone, images, amp_dtype=torch.bfloat16, **kw).x
    full = extract(backbone, images, amp_dtype=None, **kw).x
    cos = (low * full).sum(1) / np.linalg.norm(low, axis=1) / np.linalg.norm(full, axis=1)
    assert np.isfinite(low).all() and cos.min() > 0.99, cos.min()


def test_classifiers_on_the_device_match_the_cpu(profile):
    rng = np.random.default_rng(0)
    n, dim, classes = (5000, 256, 20) if profile.cuda else (600, 32, 5)
    means = rng.standard_normal((classes, dim)) * 4 / np.sqrt(dim)
    y = np.arange(n) % classes
    x = (means[y] + rng.standard_normal((n, dim))).astype(np.float32)
    tx, ty = x[: n // 5], y[: n // 5]
    grid = list(np.logspace(-4, 2, 7))
    dev = linear_probe(x, y, tx, ty, c_values=grid, device=profile.device, progress=False)
    cpu = linear_probe(x, y, tx, ty, c_values=grid, device="cpu", progress=False)
    assert dev.best_c == cpu.best_c and abs(dev.top1 - cpu.top1) <= 0.01
    assert dev.top1 > 2.0 / classes  # far above chance
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    eps = sample_episodes(y, way=5, shot=5, query=10, episodes=40, seed=0)
    acc_dev = episode_accuracies(unit, eps, c=1.0, device=profile.device)
    acc_cpu = episode_accuracies(unit, eps, c=1.0, device="cpu")
    assert abs(float(acc_dev.mean()) - float(acc_cpu.mean())) <= 0.01
    knn_dev = knn_accuracy(x, y, tx, ty, k=20, device=profile.device)
    knn_cpu = knn_accuracy(x, y, tx, ty, k=20, device="cpu")
    assert abs(knn_dev - knn_cpu) <= 0.01 and knn_dev > 2.0 / classes


def test_eval_cli_on_the_device(profile, tmp_path):
    spec, size = _model_spec(profile)
    folder = _write_folder(tmp_path / "imgs", per_class=20)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "stablerep.cli", "eval", "--checkpoint", spec,
           "--datasets", f"imagefolder:{folder}", "--baseline", "none", "--episodes", "20",
           "--device", profile.device, "--out", str(out), "--set", f"eval.image_size={size}",
           "--set", "eval.probe_num_c=9", "--set", "eval.num_workers=2",
           "--set", "eval.few_shot_way=3", "--set", "eval.few_shot_query=10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    [result] = metrics["datasets"].values()
    assert result["num_classes"] == len(CLASSES) and result["corrupt_images"] == 0
    # tints are linearly separable: every classifier is far above chance (0.25)
    assert result["linear_probe"]["top1"] > 0.6
    assert result["few_shot"]["mean"] > 0.6 and result["knn"]["top1"] > 0.6
    assert (out / "report.html").exists()
