"""Checkpoints through storage.py: atomic, with ``latest.json``, pruning, and backbone export.

``<out>/ckpt-{step:08d}.pt`` holds the model, optimizer, schedule, grad scaler, step, data
position, RNG states, the resolved config and a ``model_info`` block; rank 0 publishes it
atomically, then ``latest.json`` pointing at it, then prunes all but the newest
``keep`` checkpoints. A restarted job calls :func:`load_latest` and continues.

Everything saved is tensors and plain types (dicts, lists, str, int, float, bool, None): the
numpy and Python RNG states are stored as a tensor and lists of ints. Every torch file is
read with ``weights_only=True``, so a file that would need arbitrary unpickling (a pickled
callable, a class instance) is refused without running any of its code.

:func:`export_backbone` writes the backbone alone as a timm state dict (``backbone.pt``) with
``backbone.json`` naming the timm model and image size, so any timm user can load it:
``timm.create_model(name, img_size=..., num_classes=0, global_pool="token")``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from stablerep import storage
from stablerep.contracts import (
    BACKBONE,
    BACKBONE_JSON,
    LATEST,
    checkpoint_name,
    is_checkpoint,
    read_latest,
    write_latest,
)
from stablerep.errors import ConfigError, InputError
from stablerep.torchfiles import read_torch

__all__ = ["FORMAT", "LATEST", "VERSION", "check_compatible", "check_world_size",
           "checkpoint_name",
           "export_backbone", "load_checkpoint", "load_latest", "read_latest", "read_torch",
           "rng_state", "save_checkpoint", "set_rng_state"]

log = logging.getLogger(__name__)

FORMAT = "stablerep.checkpoint"
VERSION = 2  # 2: RNG states as tensors and plain types (weights_only loading)


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": int(version), "words": [int(w) for w in words],
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str, state: dict[str, Any], *, step: int, keep: int) -> str:
    """Publish ``state`` as step ``step`` under ``out`` and point latest.json at it."""
    uri = storage.join(out, checkpoint_name(step))
    with storage.atomic_write(uri) as w:
        torch.save({"format": FORMAT, "version": VERSION, **state}, w.file)
    write_latest(out, step, w.sha256)
    _prune(out, keep)
    log.info("checkpoint: step %d -> %s", step, uri)
    return uri


def _prune(out: str, keep: int) -> None:
    ckpts = sorted(u for u in storage.list_dir(out) if is_checkpoint(u))
    for uri in ckpts[:-keep]:
        storage.remove(uri)


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Read a checkpoint file (any URI) on the CPU."""
    state, _ = read_torch(uri)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{uri}: not a stablerep checkpoint")
    if state.get("version") != VERSION:
        raise InputError(f"{uri}: a stablerep checkpoint of format version "
                         f"{state.get('version')!r}, this version reads {VERSION}")
    return state


def load_latest(out: str) -> dict[str, Any] | None:
    """The newest checkpoint under ``out`` (via latest.json), or None."""
    uri = read_latest(out)
    return None if uri is None else load_checkpoint(uri)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Fail when a checkpoint's model differs from the one this run builds."""
    absent = {"model_kwargs": {}}  # checkpoints written before the field existed
    diffs = [f"{k}: checkpoint {saved.get(k, absent.get(k))!r}, this run {v!r}"
             for k, v in current.items() if saved.get(k, absent.get(k)) != v]
    if diffs:
        raise InputError(f"{where}: the checkpoint is of a different model ({'; '.join(diffs)}); "
                         "use another output folder or the matching config")


def check_world_size(state: dict[str, Any], world_size: int, where: str) -> None:
    """Refuse to resume a checkpoint written by another number of processes.

    The data position it holds (epoch, micro-batches done) counts each process's own
    micro-batches, read from streams cut per process (:mod:`stablerep.data.loader`); at another
    world size the same count names other captions, so the rest of the epoch would repeat
    some and skip others.

    Args:
        state: the loaded checkpoint (its ``world_size``).
        world_size: this run's number of processes.
        where: the training folder, named in the message.
    """
    saved = state.get("world_size")
    if saved is not None and int(saved) != world_size:
        raise ConfigError(
            f"train.resume: the checkpoint was written by {saved} processes, this run has "
            f"{world_size}; resume with {saved} processes (nodes x processes per node), or "
            f"start over in another train.out (train.resume=false starts over in {where})")


def export_backbone(out: str, backbone_state: dict[str, torch.Tensor],
                    info: dict[str, Any]) -> str:
    """Write ``backbone.pt`` (timm state dict) and ``backbone.json`` under ``out``."""
    uri = storage.join(out, BACKBONE)
    with storage.atomic_write(uri) as w:
        torch.save(backbone_state, w.file)
    storage.write_json(storage.join(out, BACKBONE_JSON), {**info, "sha256": w.sha256,
                                                          "weights": BACKBONE})
    return uri
