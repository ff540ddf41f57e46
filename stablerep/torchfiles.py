"""Safe loading of torch files from any URI: tensors and plain types only, nothing runs.

Shared by training (resuming a checkpoint) and evaluation (loading one to evaluate); neither
stage imports the other for it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
import zipfile
from typing import Any

import torch

from stablerep import storage
from stablerep.errors import InputError


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
