"""Device and precision choice, one rule for every stage.

A device is spelled ``auto``, ``cpu``, ``cuda`` or (where a stage can use one chosen GPU)
``cuda:N``; :func:`check_device` is the one validator every stage's config calls, so a typo
fails before any work. ``auto`` means CUDA when a GPU is visible, else the CPU; asking for CUDA
where there is none is a configuration error naming the field. Precisions are spelled
``fp32``, ``fp16``, ``bf16``. torch is imported on first use, so commands fail fast on bad
input without loading it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from stablerep.errors import ConfigError

if TYPE_CHECKING:
    import torch


DEVICES = ("auto", "cpu", "cuda")
"""Device names every stage takes; ``cuda:N`` is added where a stage uses one chosen GPU."""

_INDEXED = re.compile(r"cuda:\d+")


def device_help(*, indexed: bool = True) -> str:
    """The accepted device spellings as text, e.g. ``auto, cpu, cuda or cuda:N``."""
    names = [*DEVICES, "cuda:N"] if indexed else list(DEVICES)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def check_device(name: Any, *, field: str, indexed: bool = True) -> None:
    """Refuse a device name that no stage understands, naming ``field``.

    Args:
        name: the configured device.
        field: the config field, e.g. ``train.device``, for the message.
        indexed: whether ``cuda:N`` (one chosen GPU) is accepted.
    """
    if isinstance(name, str) and (name in DEVICES or (indexed and _INDEXED.fullmatch(name))):
        return
    raise ConfigError(f"{field}: got {name!r}, expected {device_help(indexed=indexed)}")


def resolve_device(name: str, *, field: str) -> str:
    """``auto`` -> ``cuda``/``cpu``; a CUDA request without a GPU fails naming ``field``."""
    check_device(name, field=field)
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
