"""The machine of a GPU run: versions, device, bf16 support and the measured matmul rate.

Prints one line per fact and writes ``machine.json`` where the benchmarks write theirs
(``STABLEREP_BENCH_RESULTS``); the matmul rate is the one the benchmarks' utilisation
figures divide by (bf16 8192^2 GEMM on a GPU, fp32 1024^2 on the CPU).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import finish, matmul_tflops  # noqa: E402


def describe() -> dict:
    """Versions and the device of this process."""
    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "device": "cuda" if cuda
            else "cpu"}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}",
                    bf16=torch.cuda.is_bf16_supported())
    for name in ("timm", "transformers", "diffusers", "open_clip", "sklearn", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def main() -> None:
    info = describe()
    info["matmul_tflops"] = matmul_tflops(info["device"])
    for key, value in info.items():
        print(f"{key:<16} {value}")
    finish("machine", info, info["device"])


if __name__ == "__main__":
    main()
