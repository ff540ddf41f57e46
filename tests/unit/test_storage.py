"""Unit tests of stablerep.storage on local paths and memory:// (no servers, no subprocesses).

The same behaviour against the GCS and S3 servers, kills of a real writer process and
injected network failures are in tests/integration/test_storage_servers.py.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import uuid

import pytest

from stablerep import storage, storage_clients
from stablerep.storage import RetryPolicy, StorageError, StorageNotFound

FAST = RetryPolicy(attempts=4, initial_delay_s=0.001, max_delay_s=0.002)


@pytest.fixture
def mem_root():
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-wide)."""
    root = f"memory://unit-{uuid.uuid4().hex[:10]}"
    yield root
    storage.remove(root, recursive=True)


class Flaky:
    """A callable that raises the given errors in order, then returns ``result``."""

    def __init__(self, errors, result="ok"):
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class HttpLike(Exception):
    """An error carrying an HTTP status the way gcsfs's HttpError and aiohttp's do."""

    def __init__(self, code: int):
        super().__init__(f"HTTP {code}")
        self.code = code


# ---------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("uri", "proto", "local"),
    [("data/x", "file", True), ("/abs/x", "file", True), ("file:///abs/x", "file", True),
     ("gs://b/x", "gs", False), ("S3://b/x", "s3", False), ("memory://x", "memory", False)],
)
def test_protocol_and_is_local(uri, proto, local):
    assert storage.protocol(uri) == proto
    assert storage.is_local(uri) is local


def test_join_and_name():
    assert storage.join("gs://b/", "/a/", "b.txt") == "gs://b/a/b.txt"
    assert storage.join("/x", "", "y") == "/x/y"
    assert storage.name("s3://b/p/shard-000001.tar") == "shard-000001.tar"
    assert storage.name("gs://b/folder/") == "folder"


def test_local_path_rejects_remote_uri():
    with pytest.raises(StorageError, match="gs://b/x"):
        storage.local_path("gs://b/x")
    assert storage.local_path("file:///tmp/a") == storage.local_path("/tmp/a")


def test_unknown_scheme_is_a_storage_error_naming_the_uri():
    with pytest.raises(StorageError, match="nosuchproto://b/x"):
        storage.read_bytes("nosuchproto://b/x")


# ---------------------------------------------------------------------------- retries


def test_transient_errors_are_retried_until_success():
    fn = Flaky([ConnectionResetError("reset"), ConnectionResetError("reset")], result=42)
    assert storage.with_retries(fn, uri="gs://b/x", action="read", policy=FAST) == 42
    assert fn.calls == 3


@pytest.mark.parametrize(
    "error",
    [TimeoutError("slow"), HttpLike(503), HttpLike(429), HttpLike(500), HttpLike(408),
     OSError(errno.ECONNRESET, "reset"), OSError(errno.EPIPE, "broken pipe")],
    ids=lambda e: repr(e)[:30],
)
def test_what_counts_as_transient(error):
    fn = Flaky([error])
    assert storage.with_retries(fn, uri="s3://b/x", action="read", policy=FAST) == "ok"
    assert fn.calls == 2


def test_s3fs_style_wrapped_503_is_transient():
    # s3fs raises OSError(EBUSY) from botocore's ClientError; the status is on the cause.
    class ClientError(Exception):
        response = {"Error": {"Code": "ServiceUnavailable"},
                    "ResponseMetadata": {"HTTPStatusCode": 503}}

    wrapped = OSError(errno.EBUSY, "Service Unavailable")
    wrapped.__cause__ = ClientError("503")
    fn = Flaky([wrapped])
    assert storage.with_retries(fn, uri="s3://b/x", action="read", policy=FAST) == "ok"
    assert fn.calls == 2


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [(FileNotFoundError("x"), StorageNotFound, "no such object"),
     (HttpLike(404), StorageNotFound, "no such object"),
     (PermissionError("denied"), StorageError, "permission denied"),
     (HttpLike(403), StorageError, "permission denied"),
     (HttpLike(401), StorageError, "permission denied"),
     (storage.HttpStatusError(403, "Forbidden: https://storage.googleapis.com/b/x"),
      StorageError, "permission denied"),
     # no status, no errno: permanent, and nothing is read into the message's words
     (OSError("Forbidden: https://storage.googleapis.com/b/x"), StorageError,
      "OSError: Forbidden"),
     (ValueError("bad"), StorageError, "ValueError: bad")],
    ids=lambda v: repr(v)[:30],
)
def test_permanent_errors_raise_at_once_naming_the_uri(error, kind, words):
    fn = Flaky([error, error, error])
    with pytest.raises(kind, match=words) as info:
        storage.with_retries(fn, uri="gs://bucket/key.json", action="read", policy=FAST)
    assert fn.calls == 1
    assert "gs://bucket/key.json" in str(info.value)
    assert "cannot read" in str(info.value)
    if kind is StorageError:
        assert not isinstance(info.value, StorageNotFound)


def test_exhausted_transient_errors_name_the_uri_and_the_tries():
    fn = Flaky([ConnectionResetError("reset")] * 10)
    with pytest.raises(StorageError, match=r"s3://b/k: still failing after 4 tries") as info:
        storage.with_retries(fn, uri="s3://b/k", action="list", policy=FAST)
    assert fn.calls == 4
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_classified_by_status_and_errno_not_by_class_name():
    class ServerDisconnectedError(Exception):  # a transport error's name, but no status
        pass

    class Wrapped503(Exception):
        pass

    cause = HttpLike(503)
    wrapped = Wrapped503("wrapped")
    wrapped.__cause__ = cause
    assert storage.is_transient(wrapped)  # the status is found on the cause
    assert not storage.is_transient(ServerDisconnectedError("gone"))
    assert not storage.is_transient(HttpLike(400))
    assert storage.is_transient(OSError(errno.ETIMEDOUT, "timed out"))
    assert not storage.is_transient(OSError(errno.EBUSY, "busy"))  # s3fs's 503 needs its cause
    assert not storage.is_transient(storage.HttpStatusError(403, "Forbidden"))
    assert storage.is_transient(storage.HttpStatusError(502, "Bad Gateway"))


def test_transport_failures_without_a_response_are_transient():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    assert storage.is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b"))
    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b"))
    assert storage.is_transient(aiohttp.ServerDisconnectedError())
    assert storage.is_transient(aiohttp.ClientOSError(errno.ECONNRESET, "reset by peer"))


def test_default_policy_bound_is_stated():
    policy = RetryPolicy()
    assert (policy.attempts, policy.max_sleep_s, policy.deadline_s) == (5, 7.5, 30.0)
    assert RetryPolicy(attempts=6, initial_delay_s=1.0, max_delay_s=4.0).max_sleep_s == 15.0


def test_no_try_starts_after_the_deadline(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(storage.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    policy = RetryPolicy(attempts=100, initial_delay_s=1.0, max_delay_s=4.0, deadline_s=10.0)
    fn = Flaky([TimeoutError("slow")] * 100)
    with pytest.raises(StorageError, match=r"still failing after \d+ tries in \d"):
        storage.with_retries(fn, uri="gs://b/x", action="read", policy=policy)
    assert clock[0] <= 10.0 and 3 <= fn.calls < 100


def test_default_policy_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(storage, "DEFAULT_RETRY", RetryPolicy(attempts=2, initial_delay_s=0.001))
    fn = Flaky([TimeoutError()] * 5)
    with pytest.raises(StorageError, match="after 2 tries"):
        storage.with_retries(fn, uri="memory://x", action="read")
    assert fn.calls == 2


def test_backoff_grows_and_is_capped(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    policy = RetryPolicy(attempts=6, initial_delay_s=1.0, max_delay_s=4.0, multiplier=2.0)
    with pytest.raises(StorageError):
        storage.with_retries(Flaky([TimeoutError()] * 9), uri="gs://b/x", action="read",
                             policy=policy)
    assert len(sleeps) == 5
    caps = [1.0, 2.0, 4.0, 4.0, 4.0]  # jitter draws from [cap/2, cap]
    assert all(cap / 2 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))


# ---------------------------------------------------------------------------- local round trips


@pytest.mark.parametrize("form", ["path", "file-uri"])
def test_local_round_trip_and_hashes(tmp_path, form):
    base = str(tmp_path) if form == "path" else f"file://{tmp_path}"
    data = bytes(range(256)) * 100
    assert storage.write_bytes(storage.join(base, "a/b.bin"), data) == hashlib.sha256(
        data).hexdigest()
    assert storage.read_bytes(storage.join(base, "a/b.bin")) == data
    assert (tmp_path / "a" / "b.bin").read_bytes() == data
    assert storage.list_dir(storage.join(base, "a")) == [storage.join(base, "a/b.bin")]
    assert storage.write_json(storage.join(base, "m.json"), {"n": 1}) == hashlib.sha256(
        (tmp_path / "m.json").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "m.json").read_text()) == {"n": 1}


def test_read_json_names_the_uri_on_bad_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StorageError, match="bad.json: not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))


def test_relative_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_text("rel/x.txt", "hi")
    assert (tmp_path / "rel" / "x.txt").read_text() == "hi"
    assert storage.read_text("rel/x.txt") == "hi"
    assert storage.expand("rel/x.txt") == ["rel/x.txt"]


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_publishes_only_at_the_end(tmp_path):
    target = tmp_path / "out.bin"
    with storage.atomic_write(str(target)) as w:
        w.file.write(b"part one ")
        assert not target.exists()
        assert storage.list_dir(str(tmp_path)) == []  # the staged file is hidden
        w.file.write(memoryview(b"part two"))
    assert target.read_bytes() == b"part one part two"
    assert (w.size, w.sha256) == (17, hashlib.sha256(b"part one part two").hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_accepts_buffered_and_parquet_writers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"caption_id": pa.array([1, 2], pa.int64()), "caption": ["a", "b"]})
    with storage.atomic_write(str(tmp_path / "t.parquet")) as w:  # as the captions stage
        pq.write_table(table, w.file)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert w.sha256 == hashlib.sha256((tmp_path / "t.parquet").read_bytes()).hexdigest()
    with storage.atomic_write(str(tmp_path / "buf.bin")) as w2:
        buffered = io.BufferedWriter(w2.file)
        buffered.write(b"x" * 10_000)
        buffered.flush()
    assert w2.size == 10_000


def test_staged_file_is_closed_after_publish_or_failure(tmp_path):
    """Closing the handed-out file again (as IOBase does on garbage collection) is harmless."""
    with storage.atomic_write(str(tmp_path / "a.bin")) as w:
        w.file.write(b"abc")
    assert w.file.closed
    w.file.close()
    with pytest.raises(RuntimeError), storage.atomic_write(str(tmp_path / "b.bin")) as w2:
        w2.file.write(b"x")
        raise RuntimeError
    assert w2.file.closed
    w2.file.close()
    with pytest.raises(ValueError):
        w.file.write(b"late")  # a write after publish cannot go unnoticed


@pytest.mark.parametrize("where", ["local", "memory"])
def test_failed_writer_leaves_nothing_and_keeps_old_content(tmp_path, mem_root, monkeypatch,
                                                            where):
    staging = tmp_path / "staging"
    monkeypatch.setenv("STABLEREP_STAGING_DIR", str(staging))
    root = str(tmp_path / "out") if where == "local" else mem_root
    new, old = storage.join(root, "new.bin"), storage.join(root, "old.bin")
    storage.write_bytes(old, b"old content")
    for uri in (new, old):
        with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(uri) as w:
            w.file.write(b"y" * 100_000)
            raise RuntimeError("boom")
    assert not storage.exists(new)
    assert storage.read_bytes(old) == b"old content"
    assert storage.list_dir(root) == [old]
    if where == "local":  # no staged file left beside the target
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.bin"]
    else:  # the local staging copy of a remote write is removed
        assert list(staging.iterdir()) == []


# ---------------------------------------------------------------------------- listing


def _tree(root: str) -> None:
    for rel in ("d/a.txt", "d/b.json", "d/sub/c.txt", "d/_SUCCESS", "e.txt"):
        storage.write_text(storage.join(root, rel), rel)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_expand_globs_folders_and_plain_uris(tmp_path, mem_root, where):
    root = str(tmp_path) if where == "local" else mem_root
    _tree(root)
    j = lambda rel: storage.join(root, rel)  # noqa: E731
    assert storage.expand(j("d")) == [j("d/a.txt"), j("d/b.json"), j("d/sub/c.txt")]
    assert storage.expand(j("d/*.txt")) == [j("d/a.txt")]
    assert storage.expand([j("e.txt"), j("d/*.txt"), j("e.txt")]) == [j("e.txt"), j("d/a.txt")]
    with pytest.raises(StorageNotFound, match=r"d/\*\.csv: the pattern matches no file"):
        storage.expand(j("d/*.csv"))
    with pytest.raises(StorageNotFound, match="missing.txt"):
        storage.expand([j("e.txt"), j("missing.txt")])


def test_remove_missing_and_recursive(tmp_path):
    _tree(str(tmp_path))
    storage.remove(str(tmp_path / "nope"))  # missing_ok by default
    with pytest.raises(StorageNotFound, match="nope"):
        storage.remove(str(tmp_path / "nope"), missing_ok=False)
    storage.remove(str(tmp_path / "d"), recursive=True)
    assert storage.list_dir(str(tmp_path)) == [str(tmp_path / "e.txt")]


# ---------------------------------------------------------------------------- local cache


def test_cache_local_passes_local_paths_through(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert storage.cache_local(str(tmp_path / "f.txt"), cache_root=tmp_path / "c") == \
        tmp_path / "f.txt"
    assert storage.cache_local(f"file://{tmp_path}") == tmp_path
    assert not (tmp_path / "c").exists()
    with pytest.raises(StorageNotFound, match="missing"):
        storage.cache_local(str(tmp_path / "missing"))


def test_cache_local_copies_a_memory_file_once(tmp_path, mem_root):
    uri = storage.join(mem_root, "w.bin")
    storage.write_bytes(uri, b"weights")
    first = storage.cache_local(uri, cache_root=tmp_path)
    assert first.read_bytes() == b"weights"
    storage.remove(uri)
    assert storage.cache_local(uri, cache_root=tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left behind


# ---------------------------------------------------------------------------- gcsfs internals
# storage_clients.py switches gcsfs's own retries off through private names (gcsfs has no option for
# it); these tests fail when a gcsfs release changes them, before a bucket would show it.


def _gcs_classes() -> list[type]:
    import gcsfs.core

    classes = [gcsfs.core.GCSFileSystem]
    try:  # what fsspec serves for gs:// unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
        from gcsfs.extended_gcsfs import ExtendedGcsFileSystem
    except ImportError as e:
        print(f"gcsfs.extended_gcsfs not importable ({e}): only GCSFileSystem checked")
    else:
        classes.append(ExtendedGcsFileSystem)
    return classes


def test_gcsfs_request_methods_are_still_decorated_coroutines() -> None:
    import inspect

    import gcsfs.core

    for name in storage_clients.GCS_RETRIED_METHODS:
        decorated = vars(gcsfs.core.GCSFileSystem).get(name)
        assert decorated is not None, f"gcsfs.core.GCSFileSystem.{name} is gone"
        raw = getattr(decorated, "__wrapped__", None)
        assert raw is not None, f"GCSFileSystem.{name} has no __wrapped__ (no retry decorator?)"
        assert inspect.iscoroutinefunction(raw) and raw is not decorated, name


@pytest.mark.parametrize("base", _gcs_classes(), ids=lambda c: c.__name__)
def test_every_gcs_request_path_reaches_a_single_try_method(base: type) -> None:
    cls = storage_clients.single_try_gcs_class(base)
    assert issubclass(cls, base) and cls._cache is base._cache
    for name in storage_clients.GCS_RETRIED_METHODS:
        # the chain a call (and each super() call) walks down; it must meet ours before
        # gcsfs's decorated one, and ours does not call further down
        chain = [vars(c)[name] for c in cls.__mro__ if name in vars(c)]
        ours = [i for i, f in enumerate(chain) if getattr(f, "single_try", False)]
        decorated = [i for i, f in enumerate(chain) if hasattr(f, "__wrapped__")]
        assert ours and decorated and ours[0] < decorated[0], (name, chain)


def test_gcsfs_still_raises_what_the_single_try_methods_translate() -> None:
    import requests.exceptions
    from gcsfs.retry import validate_response

    with pytest.raises(OSError) as denied:
        validate_response(403, b'{"error": {"message": "denied"}}', "b/k")
    assert type(denied.value) is OSError and denied.value.errno is None  # read as HTTP 403
    with pytest.raises(requests.exceptions.ProxyError):  # read as HTTP 502
        validate_response(502, b"", "b/k")
