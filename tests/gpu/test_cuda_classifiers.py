"""GPU tier: the probe, few-shot episodes and kNN on CUDA give the CPU's figures.

Skipped, saying why, on a machine without CUDA; run them where a GPU is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from stablerep.evaluation.classifiers import few_shot, knn_accuracy, linear_probe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=1 / 3, random_state=0, stratify=y)


def test_knn_on_cuda_equals_cpu(digits):
    xtr, xte, ytr, yte = digits
    assert knn_accuracy(xtr, ytr, xte, yte, device="cuda") == knn_accuracy(xtr, ytr, xte, yte)


def test_few_shot_on_cuda_close_to_cpu(digits):
    _, xte, _, yte = digits
    cpu = few_shot(xte, yte, episodes=50, progress=False)
    gpu = few_shot(xte, yte, episodes=50, device="cuda", progress=False)
    assert abs(cpu.mean - gpu.mean) <= 0.01


def test_probe_on_cuda_close_to_cpu(digits):
    xtr, xte, ytr, yte = digits
    grid = list(np.logspace(-4, 2, 7))
    cpu = linear_probe(xtr, ytr, xte, yte, c_values=grid, progress=False)
    gpu = linear_probe(xtr, ytr, xte, yte, c_values=grid, device="cuda", progress=False)
    assert abs(cpu.top1 - gpu.top1) <= 0.01
