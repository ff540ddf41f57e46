"""Shared by the benchmarks: device sync, the measured matmul rate, the results file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

# STABLEREP_BENCH_RESULTS moves the JSON files (benchmarks/gpu/run.sh points it at its output).
RESULTS = Path(os.environ.get("STABLEREP_BENCH_RESULTS") or Path(__file__).parent / "results")


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU) so wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(device: str) -> float:
    """Measured dense matmul rate (TFLOP/s): bf16 8192^2 on a GPU, fp32 1024^2 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.startswith("cuda") else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def finish(name: str, payload: dict[str, Any], device: str) -> None:
    """Print peak GPU memory (on a GPU) and write ``results/<name>.json``."""
    if device.startswith("cuda"):
        print(f"GPU memory peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"results: {path}")
