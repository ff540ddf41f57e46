"""Every byte in and out of stablerep: URIs, atomic publish, listing, retries.

This module is the only one that touches fsspec (with :mod:`stablerep.storage_clients`, which
sets up its client libraries and classifies their failures). A location is a URI string: a
plain path, ``file://``, ``gs://`` (gcsfs), ``s3://`` (s3fs) or ``memory://``. Credentials
always come from the environment (Application Default Credentials for GCS; the AWS variables,
profiles or IRSA for S3; ``STORAGE_EMULATOR_HOST`` / ``AWS_ENDPOINT_URL`` for emulators), never
from configs.

Writes are *atomic*: :func:`atomic_write` hands out a file that is staged privately (a hidden
temporary file beside a local target; a local temporary file uploaded in one request for an
object store) and published under its final name only when the ``with`` block ends cleanly.
A writer that raises or is killed leaves nothing under the final name. Every call
retries transient failures (5xx, 408, 429, connection resets, timeouts) with exponential
backoff in one layer, :func:`with_retries` (the client libraries' own retries are off), within
the bound :class:`RetryPolicy` states; permanent failures (missing object or bucket, denied
credentials) raise :class:`StorageError` at once, naming the URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from stablerep.errors import InputError, StablerepError
from stablerep.local_paths import blocking_file, describe_path_error, who_and_owner
from stablerep.storage_clients import HttpStatusError as HttpStatusError  # re-exported
from stablerep.storage_clients import (
    client_single_try,
    http_status,
    is_transient,
    single_try_gcs_class,
    storage_options,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE_PROTOCOLS = ("gs", "gcs", "s3", "s3a", "memory")
TEMP_PREFIX = ".stablerep-tmp-"
"""Name prefix of staged local files; listings never show them."""


class StorageError(StablerepError):
    """A storage operation failed for a reason retrying will not fix."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object, folder or bucket does not exist."""


class ContentError(StorageError, InputError):
    """The object exists but its bytes are not what was expected (encoding, JSON, shape)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently transient storage failures are retried.

    The one retry policy of every storage call (client libraries do not retry underneath
    it). The defaults give up on a persistent failure after 5 tries and at most 7.5 s of
    sleeping (0.5 + 1 + 2 + 4 s, each drawn from [half, all] of that), and never start a try
    more than ``deadline_s`` after the first.
    """

    attempts: int = 5  # total tries, the first included
    initial_delay_s: float = 0.5  # cap on the delay before the second try
    max_delay_s: float = 8.0  # cap on one delay
    multiplier: float = 2.0  # growth of the delay cap per try
    deadline_s: float = 30.0  # no try starts later than this after the first

    @property
    def max_sleep_s(self) -> float:
        """The most time spent sleeping between tries."""
        return sum(min(self.initial_delay_s * self.multiplier ** i, self.max_delay_s)
                   for i in range(self.attempts - 1))


DEFAULT_RETRY = RetryPolicy()


# ---------------------------------------------------------------------------- URIs


def protocol(uri: str) -> str:
    """The URI's scheme (``file`` for plain paths)."""
    uri = str(uri)
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return protocol(uri) in ("file", "local")


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI."""
    uri = str(uri)
    if not is_local(uri):
        raise StorageError(f"{uri}: expected a local path or file:// URI")
    return Path(uri.split("://", 1)[1] if "://" in uri else uri).expanduser()


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (no normalisation of ``..``)."""
    out = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def name(uri: str) -> str:
    """The last path component of a URI."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it."""
    uri = str(uri)
    if is_local(uri):
        return fsspec.filesystem("file"), str(local_path(uri).absolute())
    proto = protocol(uri)
    try:
        if proto in ("gs", "gcs"):
            cls = single_try_gcs_class(fsspec.get_filesystem_class(proto))
            options = {**cls._get_kwargs_from_urls(uri), **storage_options(proto)}
            return cls(**options), cls._strip_protocol(uri)
        fs, path = fsspec.core.url_to_fs(uri, **storage_options(proto))
    except (ImportError, ValueError) as e:
        raise StorageError(f"{uri}: unsupported storage URI ({e})") from None
    client_single_try(proto, fs)
    return fs, path


def _to_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Turn a path returned by ``fs`` back into a URI of the same form as ``like``."""
    if is_local(like):
        return f"file://{path}" if str(like).startswith("file://") else path
    proto = protocol(like)
    return f"{proto}://{path.split('://', 1)[-1].lstrip('/')}"


# ---------------------------------------------------------------------------- retries
#
# One layer retries: this one. The client libraries' own retries are switched off where the
# filesystems are made (stablerep.storage_clients), which also tells transient failures from
# permanent ones (is_transient).

def check_output_folder(uri: str, *, field: str) -> None:
    """Refuse, before any work, a local output folder that a regular file stands in for, or
    that this process's user cannot create or write (a container's UID on a mounted folder).

    Nothing is created; remote URIs have no such problem (a prefix is never a file).

    Args:
        uri: the folder a stage will write under.
        field: the config field (or flag) it came from, named in the error.
    """
    if not is_local(uri):
        return
    path = local_path(uri)
    blocker = blocking_file(path)
    if blocker == path:
        raise StorageError(f"{field}: {uri} is a regular file, expected a folder")
    if blocker is not None:
        raise StorageError(f"{field}: {uri} runs through {blocker}, a regular file, expected "
                           "a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{field}: {uri}: permission denied {who_and_owner(existing)}; "
                           "expected a folder this user can write")


def _permanent_error(exc: BaseException, uri: str, action: str) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    if is_local(uri) and (problem := describe_path_error(exc, path=local_path(uri))):
        return StorageError(f"cannot {action} {uri}: {problem}")
    status = http_status(exc)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, FileNotFoundError) or status == 404:
        return StorageNotFound(f"cannot {action} {uri}: no such object, folder or bucket")
    if isinstance(exc, PermissionError) or status in (401, 403):
        return StorageError(
            f"cannot {action} {uri}: permission denied ({detail}); credentials come from the "
            "environment (GOOGLE_APPLICATION_CREDENTIALS / ADC for gs://, AWS_* or IRSA for s3://)"
        )
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {detail}")


def _backoff_s(policy: RetryPolicy, failures: int) -> float:
    """The cap on the sleep after the ``failures``-th failed try."""
    return min(policy.initial_delay_s * policy.multiplier ** (failures - 1), policy.max_delay_s)


def with_retries(
    fn: Callable[[], T], *, uri: str, action: str, policy: RetryPolicy | None = None
) -> T:
    """Run ``fn``, retrying transient failures; raise :class:`StorageError` otherwise.

    The only retry loop around storage calls (the client libraries' own are off), bounded
    by ``policy``: at most ``attempts`` tries, and no try starts after ``deadline_s``.

    Args:
        fn: the operation, without arguments; it must be safe to repeat.
        uri: the location it works on (named in errors and logs).
        action: a verb phrase for messages, e.g. ``"read"``.
        policy: attempts and backoff; ``None`` means :data:`DEFAULT_RETRY` at call time.
    """
    policy = policy or DEFAULT_RETRY
    start = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise _permanent_error(exc, uri, action) from exc
            sleep = _backoff_s(policy, attempt) * (0.5 + random.random() / 2)
            elapsed = time.monotonic() - start
            if attempt == policy.attempts or elapsed + sleep > policy.deadline_s:
                raise StorageError(
                    f"cannot {action} {uri}: still failing after {attempt} tries in "
                    f"{elapsed:.1f}s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
            log.warning(
                "transient error on %s %s (%s: %s); try %d/%d in %.1fs",
                action, uri, type(exc).__name__, exc, attempt + 1, policy.attempts, sleep,
            )
            time.sleep(sleep)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- reads


def exists(uri: str) -> bool:
    """Whether an object or folder exists at ``uri``."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), uri=uri, action="check")


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a folder (a prefix with objects under it, on object stores)."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.isdir(path), uri=uri, action="check")


def read_bytes(uri: str) -> bytes:
    """The whole content of the object at ``uri``."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), uri=uri, action="read")


def read_text(uri: str, encoding: str = "utf-8", *, what: str = "") -> str:
    """The object at ``uri`` decoded as text.

    Args:
        uri: the object.
        encoding: its text encoding; bytes that are not valid in it raise
            :class:`ContentError` naming the URI and the first bad byte.
        what: what the file should be, for that message (default "a UTF-8 text file").
    """
    data = read_bytes(uri)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 1].hex()
        raise ContentError(f"{uri}: not {encoding.upper()} text (byte 0x{bad} at offset "
                           f"{e.start}); expected {what or f'a {encoding.upper()} text file'}"
                           ) from None


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true or false", type(None): "null"}


def _json_kind(tp: type) -> str:
    return _JSON_KINDS.get(tp, tp.__name__)


def read_json(uri: str, *, expect: type | tuple[type, ...] | None = None,
              what: str = "") -> Any:
    """The object at ``uri`` parsed as JSON (UTF-8).

    Args:
        uri: the object.
        expect: the type(s) the top-level value must have, e.g. ``dict``; any other raises
            :class:`ContentError` naming the URI and what was found.
        what: what the file should be (e.g. "the captions manifest that `stablerep captions`
            writes"), said in every error about its bytes.

    Raises:
        ContentError: the bytes are not UTF-8, not JSON, or not of the ``expect`` type.
    """
    text = read_text(uri, what=what or "a UTF-8 JSON file").removeprefix("\ufeff")  # BOM ok
    hint = f"; expected {what}" if what else ""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ContentError(f"{uri}: not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise ContentError(f"{uri}: not valid JSON (nested too deeply){hint}") from None
    if expect is not None and not isinstance(doc, expect):
        wanted = " or ".join(dict.fromkeys(
            _json_kind(t) for t in (expect if isinstance(expect, tuple) else (expect,))))
        raise ContentError(f"{uri}: expected a JSON file holding {wanted}, got "
                           f"{_json_kind(type(doc))}")
    return doc


def size(uri: str) -> int:
    """Size in bytes of the object at ``uri``."""
    fs, path = filesystem(uri)
    return int(with_retries(lambda: fs.size(path), uri=uri, action="stat"))


@contextlib.contextmanager
def open_read(uri: str, *, compression: str | None = None) -> Iterator[io.BufferedIOBase]:
    """Open ``uri`` for streaming binary reads.

    Args:
        uri: the object.
        compression: ``None``, ``"gzip"``, ``"zstd"``, ... or ``"infer"`` (from the suffix).
    """
    fs, path = filesystem(uri)
    handle = with_retries(
        lambda: fs.open(path, "rb", compression=compression), uri=uri, action="open"
    )
    try:
        yield handle
    finally:
        handle.close()


def list_dir(uri: str) -> list[str]:
    """Sorted URIs of the entries directly under the folder ``uri`` (staged files hidden)."""
    fs, path = filesystem(uri)
    entries = with_retries(lambda: fs.ls(path, detail=False), uri=uri, action="list")
    out = [_to_uri(fs, p, uri) for p in entries if not name(p).startswith(TEMP_PREFIX)]
    return sorted(u for u in out if u.rstrip("/") != str(uri).rstrip("/"))


def glob(pattern: str) -> list[str]:
    """Sorted URIs matching a glob pattern (``*``, ``**``, ``?``, ``[...]``)."""
    fs, path = filesystem(pattern)
    found = with_retries(lambda: fs.glob(path), uri=pattern, action="list")
    return sorted(_to_uri(fs, p, pattern) for p in found if not name(p).startswith(TEMP_PREFIX))


def expand(uris: list[str] | str) -> list[str]:
    """Expand globs and folders into a sorted, de-duplicated list of object URIs.

    A plain URI must exist; a glob must match at least one object; a folder contributes the
    files below it (recursively).
    """
    if isinstance(uris, str):
        uris = [uris]
    out: list[str] = []
    for uri in uris:
        if any(ch in uri for ch in "*?["):
            matches = [u for u in glob(uri) if not is_dir(u)]
            if not matches:
                raise StorageNotFound(f"{uri}: the pattern matches no file")
            out.extend(matches)
        elif is_dir(uri):
            fs, path = filesystem(uri)
            found = with_retries(lambda p=path, f=fs: f.find(p), uri=uri, action="list")
            files = [_to_uri(fs, p, uri) for p in found if not name(p).startswith((".", "_"))]
            if not files:
                raise StorageNotFound(f"{uri}: the folder holds no file")
            out.extend(sorted(files))
        elif exists(uri):
            out.append(uri)
        else:
            raise StorageNotFound(f"{uri}: no such file, folder or bucket")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- writes


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes (sha256) and counts what passes through it."""

    def __init__(self, raw: io.BufferedIOBase):
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._raw.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        # IOBase.close() (also run at garbage collection) flushes; the staged file may be
        # closed by then (published or discarded).
        if not self._raw.closed:
            self._raw.flush()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class AtomicWrite:
    """The staged file of :func:`atomic_write`; ``sha256`` and ``size`` are set on publish."""

    def __init__(self, uri: str, policy: RetryPolicy | None):
        self.uri = str(uri)
        self.policy = policy
        self.sha256: str | None = None
        self.size: int | None = None
        try:
            if is_local(self.uri):
                final = local_path(self.uri)
                final.parent.mkdir(parents=True, exist_ok=True)
                self._staged = final.parent / f"{TEMP_PREFIX}{final.name}.{staging_owner()}"
            else:
                fd, staged = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=_staging_dir())
                os.close(fd)
                self._staged = Path(staged)
            self._raw = open(self._staged, "wb")  # noqa: SIM115 - closed in publish/discard
        except OSError as e:
            if (error := self._path_error(e)) is None:
                raise
            raise error from None
        self.file = _HashingFile(self._raw)

    @property
    def staged_path(self) -> Path:
        """The private file the bytes go to until :meth:`publish`."""
        return self._staged

    def _path_error(self, exc: OSError) -> StorageError | None:
        """A wrong local path as one :class:`StorageError`; None for other errors."""
        if is_local(self.uri) and local_path(self.uri).is_dir():
            return StorageError(f"cannot write {self.uri}: it is a folder, expected a file")
        problem = describe_path_error(exc)
        return StorageError(f"cannot write {self.uri}: {problem}") if problem else None

    def publish(self) -> None:
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self.file.close()
        self.sha256, self.size = self.file.sha256, self.file.size
        if is_local(self.uri):
            try:
                os.replace(self._staged, local_path(self.uri))
            except OSError as e:
                if (error := self._path_error(e)) is None:
                    raise
                raise error from None
            return
        fs, path = filesystem(self.uri)
        try:
            # One upload request: the object store makes the object visible only when
            # the upload completes, so a killed writer leaves nothing behind.
            with_retries(
                lambda: fs.put_file(str(self._staged), path),
                uri=self.uri, action="write", policy=self.policy,
            )
        finally:
            self._staged.unlink(missing_ok=True)

    def discard(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._raw.close()
            self.file.close()
        self._staged.unlink(missing_ok=True)


def staging_owner() -> str:
    """``{host}.{pid}.{token}``: the suffix that makes a staged local name unique per writer.

    Writers on other machines may share a local volume; the host and pid let a cleanup tell
    whether the writer of a staged file is provably dead (see :func:`parse_staging_owner`).
    """
    host = socket.gethostname().replace("/", "_") or "unknown-host"
    return f"{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def parse_staging_owner(suffix: str) -> tuple[str, int] | None:
    """(host, pid) from a :func:`staging_owner` suffix; None for any other form."""
    parts = suffix.rsplit(".", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _staging_dir() -> str:
    path = os.environ.get("STABLEREP_STAGING_DIR") or tempfile.gettempdir()
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_write(uri: str, *, policy: RetryPolicy | None = None) -> Iterator[AtomicWrite]:
    """Stage a write to ``uri`` and publish it only if the block ends without error.

    Usage::

        with atomic_write("gs://b/x.parquet") as w:
            pq.write_table(table, w.file)
        print(w.sha256)
    """
    staged = AtomicWrite(uri, policy)
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    try:
        staged.publish()
    except BaseException:
        staged.discard()
        raise


def write_bytes(uri: str, data: bytes) -> str:
    """Atomically write ``data`` to ``uri``; returns its sha256."""
    with atomic_write(uri) as w:
        w.file.write(data)
    assert w.sha256 is not None
    return w.sha256


def write_text(uri: str, text: str) -> str:
    """Atomically write UTF-8 ``text`` to ``uri``; returns its sha256."""
    return write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> str:
    """Atomically write ``obj`` as indented JSON to ``uri``; returns its sha256."""
    return write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove(uri: str, *, recursive: bool = False, missing_ok: bool = True) -> None:
    """Delete the object (or, with ``recursive``, the folder) at ``uri``."""
    fs, path = filesystem(uri)

    def _rm() -> None:
        # s3fs deletes a missing key without complaint; ask first when that matters.
        if not missing_ok and not fs.exists(path):
            raise FileNotFoundError(path)
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            if not missing_ok:
                raise

    with_retries(_rm, uri=uri, action="delete")


# ---------------------------------------------------------------------------- local cache


def cache_dir() -> Path:
    """Where remote files are cached locally (``STABLEREP_CACHE`` or ~/.cache/stablerep)."""
    root = os.environ.get("STABLEREP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "stablerep"
    )
    return Path(root)


def cache_local(uri: str, *, cache_root: str | os.PathLike | None = None) -> Path:
    """A local copy of a remote file or folder, downloaded once; local URIs pass through.

    The copy is made in a staging folder and renamed into place when complete, so a killed
    download is redone rather than half-used.
    """
    if is_local(uri):
        path = local_path(uri)
        if not path.exists():
            raise StorageNotFound(f"{uri}: no such file or folder")
        return path
    root = Path(cache_root) if cache_root else cache_dir()
    key = hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16]
    target = root / f"{name(uri)}-{key}"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root))
    fs, path = filesystem(uri)
    try:
        if is_dir(uri):
            with_retries(
                lambda: fs.get(path.rstrip("/") + "/", str(staging / "d") + "/", recursive=True),
                uri=uri, action="download",
            )
        elif exists(uri):
            (staging / "d").parent.mkdir(parents=True, exist_ok=True)
            with_retries(lambda: fs.get_file(path, str(staging / "d")), uri=uri, action="download")
        else:
            raise StorageNotFound(f"{uri}: no such file or folder")
        try:
            os.replace(staging / "d", target)
        except OSError:
            if not target.exists():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("cached %s at %s", uri, target)
    return target
