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

import hashlib
import io
import logging
import pickle
import pickletools
import random
import zipfile
from typing import Any

import numpy as np
import torch

from stablerep import storage
from stablerep.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "stablerep.checkpoint"
LATEST = "latest.json"
VERSION = 2  # 2: RNG states as tensors and plain types (weights_only loading)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


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


def _unsafe_globals(data: bytes) -> list[str] | None:
    """What a torch file imports that weights_only loading refuses; None when ``data`` is
    neither a zip-format torch file nor a pickle (then it is no torch file at all)."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - a damaged archive
            return None
    try:  # the legacy format starts with a pickle; only scanned, never loaded
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception:  # noqa: BLE001 - no pickle either
        return None
    return []  # a pickle: torch's own message names what it refused


def read_torch(uri: str, *, what: str = "checkpoint") -> tuple[Any, str]:
    """Load a torch file from any URI on the CPU, tensors and plain types only.

    Returns:
        (object, sha256 of the bytes).

    Raises:
        InputError: the file is unreadable, or holds objects that loading would have to
            construct by running code from the file (it is refused, nothing of it runs).
    """
    data = storage.read_bytes(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(data)
        if unsafe is None:
            raise InputError(f"{uri}: not a {what} (unreadable: neither a torch zip archive "
                             "nor a pickle)") from None
        detail = f" (it imports {', '.join(unsafe[:5])})" if unsafe else f" ({_reason(e)})"
        raise InputError(f"{uri}: refused to load: it holds objects other than tensors and "
                         f"plain types{detail}; only a {what} saved as tensors and plain "
                         "types is read, and nothing in the file was run") from None
    except Exception as e:  # noqa: BLE001 - any other failure means a bad file
        raise InputError(f"{uri}: not a {what} (unreadable: {type(e).__name__}: "
                         f"{_reason(e)})") from None
    return obj, hashlib.sha256(data).hexdigest()


def _reason(e: BaseException) -> str:
    """The most specific line of a torch loading error (torch's are several lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (named or lines or [type(e).__name__])[0].split(". ")[0][:200]


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Read a checkpoint file (any URI) on the CPU."""
    state, _ = read_torch(uri)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{uri}: not a stablerep checkpoint")
    if state.get("version") != VERSION:
        raise InputError(f"{uri}: a stablerep checkpoint of format version "
                         f"{state.get('version')!r}, this version reads {VERSION}")
    return state


def read_latest(out: str) -> str | None:
    """The checkpoint URI ``out/latest.json`` points at, or None when there is no latest.json.

    Raises:
        InputError: latest.json is not UTF-8 JSON of the form {"checkpoint": "ckpt-*.pt", ...}.
    """
    latest = storage.join(out, LATEST)
    if not storage.exists(latest):
        return None
    expected = 'a JSON object {"step": N, "checkpoint": "ckpt-NNNNNNNN.pt", ...}'
    doc = storage.read_json(latest, what=expected)
    name = doc.get("checkpoint") if isinstance(doc, dict) else None
    if not (isinstance(name, str) and name.startswith("ckpt-") and name.endswith(".pt")
            and "/" not in name):
        got = type(doc).__name__ if not isinstance(doc, dict) else f"checkpoint={name!r}"
        raise InputError(f"{latest}: got {got}, expected {expected}")
    return storage.join(out, name)


def load_latest(out: str) -> dict[str, Any] | None:
    """The newest checkpoint under ``out`` (via latest.json), or None."""
    uri = read_latest(out)
    return None if uri is None else load_checkpoint(uri)


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
