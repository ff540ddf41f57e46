"""Checkpoints through storage.py: atomic, with ``latest.json``, pruning, and backbone export.

``<out>/ckpt-{step:08d}.pt`` holds the model, optimizer, schedule, grad scaler, step, data
position, RNG states, the resolved config and a ``model_info`` block; rank 0 publishes it
atomically, then ``latest.json`` pointing at it, then prunes all but the newest
``keep`` checkpoints. A restarted job calls :func:`load_latest` and continues.

:func:`export_backbone` writes the backbone alone as a timm state dict (``backbone.pt``) with
``backbone.json`` naming the timm model and image size, so any timm user can load it:
``timm.create_model(name, img_size=..., num_classes=0, global_pool="token")``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from typing import Any

import numpy as np
import torch

from stablerep import storage
from stablerep.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "stablerep.checkpoint"
LATEST = "latest.json"


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str, state: dict[str, Any], *, step: int, keep: int) -> str:
    """Publish ``state`` as step ``step`` under ``out`` and point latest.json at it."""
    uri = storage.join(out, checkpoint_name(step))
    with storage.atomic_write(uri) as w:
        torch.save({"format": FORMAT, "version": 1, **state}, w.file)
    storage.write_json(storage.join(out, LATEST), {"step": step,
                                                   "checkpoint": checkpoint_name(step),
                                                   "sha256": w.sha256})
    _prune(out, keep)
    log.info("checkpoint: step %d -> %s", step, uri)
    return uri


def _prune(out: str, keep: int) -> None:
    ckpts = sorted(u for u in storage.list_dir(out)
                   if storage.name(u).startswith("ckpt-") and u.endswith(".pt"))
    for uri in ckpts[:-keep]:
        storage.remove(uri)


def read_torch(uri: str, *, what: str = "checkpoint") -> tuple[Any, str]:
    """Unpickle a torch file from any URI on the CPU; returns (object, sha256 of the bytes)."""
    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise InputError(f"{uri}: not a {what} (unreadable: {type(e).__name__}: {e})") from None
    return obj, hashlib.sha256(data).hexdigest()


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Read a checkpoint file (any URI) on the CPU."""
    state, _ = read_torch(uri)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{uri}: not a stablerep checkpoint")
    return state


def load_latest(out: str) -> dict[str, Any] | None:
    """The newest checkpoint under ``out`` (via latest.json), or None."""
    latest = storage.join(out, LATEST)
    if not storage.exists(latest):
        return None
    doc = storage.read_json(latest)
    return load_checkpoint(storage.join(out, doc["checkpoint"]))


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Fail when a checkpoint's model differs from the one this run builds."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in current.items()
             if saved.get(k) != v]
    if diffs:
        raise InputError(f"{where}: the checkpoint is of a different model ({'; '.join(diffs)}); "
                         "use another output folder or the matching config")


def export_backbone(out: str, backbone_state: dict[str, torch.Tensor],
                    info: dict[str, Any]) -> str:
    """Write ``backbone.pt`` (timm state dict) and ``backbone.json`` under ``out``."""
    uri = storage.join(out, "backbone.pt")
    with storage.atomic_write(uri) as w:
        torch.save(backbone_state, w.file)
    storage.write_json(storage.join(out, "backbone.json"), {**info, "sha256": w.sha256,
                                                            "weights": "backbone.pt"})
    return uri
