"""Device and precision choice, one rule for every stage.

``auto`` means CUDA when a GPU is visible, else the CPU; asking for CUDA where there is none is a
configuration error naming the field. Precisions are spelled ``fp32``, ``fp16``, ``bf16``.
torch is imported on first use, so commands fail fast on bad input without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stablerep.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, *, field: str) -> str:
    """``auto`` -> ``cuda``/``cpu``; a CUDA request without a GPU fails naming ``field``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {name} requested but no CUDA device is available")
    return name


def resolve_dtype(name: str, device: str, *, auto_cuda: str) -> torch.dtype:
    """``auto`` -> ``auto_cuda`` on a GPU and fp32 on the CPU; else the named precision."""
    import torch

    if name == "auto":
        name = auto_cuda if device.startswith("cuda") else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
