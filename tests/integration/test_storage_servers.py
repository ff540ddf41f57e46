"""stablerep.storage against real servers on loopback, real processes and real network faults.

- Round trips on every backend (local path, file://, memory://, gs:// on the GCS emulator,
  s3:// on moto); the local and memory variants are not marked ``integration``.
- Atomic publish: a writer *process* is SIGKILLed in the middle of a write; nothing appears
  under the final name, and an existing object keeps its old content.
- Retries: a loopback proxy (tests/integration/_storage_proxy.py) in front of the S3 or GCS
  server answers the first requests with 503, resets the connection, or denies everything.
  stablerep's ``with_retries`` is the only retry layer (botocore, s3fs and gcsfs try each
  request once), so the proxy sees exactly one request per stablerep try, and a persistent
  503 gives up within the bound ``RetryPolicy`` states.
- The local cache of remote files and folders; missing buckets.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from stablerep import storage
from stablerep.storage import RetryPolicy, StorageError, StorageNotFound

HERE = Path(__file__).parent
WRITER = HERE / "_storage_writer.py"


def _load_helper(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FlakyProxy = _load_helper("_storage_proxy").FlakyProxy

SERVER_BACKENDS = [pytest.param("gs", marks=pytest.mark.integration),
                   pytest.param("s3", marks=pytest.mark.integration)]
ALL_BACKENDS = ["local", "file", "memory", *SERVER_BACKENDS]


@pytest.fixture(autouse=True)
def fast_retries_and_private_staging(monkeypatch, tmp_path):
    """Small retry delays, and a staging folder per test (so leftovers can be inspected)."""
    monkeypatch.setattr(storage, "DEFAULT_RETRY",
                        RetryPolicy(attempts=4, initial_delay_s=0.01, max_delay_s=0.05))
    monkeypatch.setenv("STABLEREP_STAGING_DIR", str(tmp_path / "staging"))


def _bucket(request, backend: str) -> str:
    return request.getfixturevalue({"gs": "gcs_bucket", "s3": "s3_bucket"}[backend])


@pytest.fixture(params=ALL_BACKENDS)
def root(request, tmp_path):
    """A fresh, empty folder URI on one backend."""
    backend = request.param
    if backend == "local":
        yield str(tmp_path / "root")
    elif backend == "file":
        yield f"file://{tmp_path}/root"
    elif backend == "memory":
        uri = f"memory://it-{uuid.uuid4().hex[:10]}"
        yield uri
        storage.remove(uri, recursive=True)
    else:
        yield storage.join(_bucket(request, backend), "prefix")


def _staged_leftovers(tmp_path: Path, root: str) -> list[Path]:
    """Staged files: hidden beside a local target, or in the staging folder for remote ones."""
    if storage.is_local(root):
        folder = storage.local_path(root)
        return sorted(folder.glob(f"{storage.TEMP_PREFIX}*")) if folder.exists() else []
    staging = tmp_path / "staging"
    return sorted(staging.iterdir()) if staging.exists() else []


# ---------------------------------------------------------------------------- round trips


def test_bytes_text_json_round_trip(root):
    data = os.urandom(300_000)
    assert storage.write_bytes(storage.join(root, "a/blob.bin"), data) == \
        hashlib.sha256(data).hexdigest()
    assert storage.read_bytes(storage.join(root, "a/blob.bin")) == data
    assert storage.size(storage.join(root, "a/blob.bin")) == len(data)

    text = "a caption — with ünïcode\nand two lines"
    assert storage.write_text(storage.join(root, "a/t.txt"), text) == \
        hashlib.sha256(text.encode()).hexdigest()
    assert storage.read_text(storage.join(root, "a/t.txt")) == text

    doc = {"count": 3, "parts": ["part-000000.parquet"], "seed": 0, "nested": {"x": 1.5}}
    sha = storage.write_json(storage.join(root, "manifest.json"), doc)
    assert storage.read_json(storage.join(root, "manifest.json")) == doc
    assert sha == hashlib.sha256(storage.read_bytes(storage.join(root, "manifest.json"))).hexdigest()

    assert storage.exists(storage.join(root, "a/t.txt"))
    assert storage.exists(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a/nope.txt"))
    assert storage.is_dir(storage.join(root, "a"))
    assert not storage.is_dir(storage.join(root, "a/t.txt"))


def test_overwrite_replaces_content(root):
    uri = storage.join(root, "latest.json")
    storage.write_json(uri, {"step": 1})
    storage.write_json(uri, {"step": 2})
    assert storage.read_json(uri) == {"step": 2}
    assert storage.list_dir(root) == [uri]


def test_parquet_round_trip(root):
    table = pa.table({
        "caption_id": pa.array([0, 1, 2], pa.int64()),
        "caption": ["a dog", "two cats", "a red car"],
        "source": ["s", "s", "t"],
    })
    uri = storage.join(root, "captions/part-000000.parquet")
    with storage.atomic_write(uri) as w:  # as the captions stage writes its parts
        pq.write_table(table, w.file, compression="zstd")
    assert pq.read_table(io.BytesIO(storage.read_bytes(uri))).equals(table)
    assert w.sha256 == hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    assert w.size == storage.size(uri)


@pytest.mark.parametrize(
    ("compression", "suffix", "encode"),
    [(None, ".txt", lambda b: b), ("gzip", ".gz", gzip.compress),
     ("zstd", ".zst", lambda b: zstandard.ZstdCompressor().compress(b))],
)
def test_open_read_streams_and_decompresses(root, compression, suffix, encode):
    plain = b"".join(b"caption number %d\n" % i for i in range(50_000))  # ~1 MB
    uri = storage.join(root, f"captions{suffix}")
    storage.write_bytes(uri, encode(plain))
    for how in (compression, "infer"):
        chunks = []
        with storage.open_read(uri, compression=how) as f:
            while chunk := f.read(64 * 1024):
                chunks.append(chunk)
        assert len(chunks) > 1
        assert b"".join(chunks) == plain


def test_missing_objects_raise_not_found_naming_the_uri(root):
    storage.write_text(storage.join(root, "present.txt"), "x")
    missing = storage.join(root, "missing.txt")
    with pytest.raises(StorageNotFound, match=re.escape(missing)):
        storage.read_bytes(missing)
    with pytest.raises(StorageNotFound, match=re.escape(missing)):
        storage.size(missing)
    with pytest.raises(StorageNotFound, match=re.escape(missing)), storage.open_read(missing):
        pass
    with pytest.raises(StorageNotFound, match=re.escape(storage.join(root, "no-folder"))):
        storage.list_dir(storage.join(root, "no-folder"))


def _make_tree(root: str) -> dict[str, str]:
    files = {rel: storage.join(root, rel) for rel in
             ("d/a.txt", "d/b.json", "d/sub/c.txt", "d/sub/deeper/d.txt", "d/_SUCCESS", "e.txt")}
    for rel, uri in files.items():
        storage.write_text(uri, rel)
    return files


def test_list_dir_and_glob(root):
    f = _make_tree(root)
    d, sub = storage.join(root, "d"), storage.join(root, "d/sub")
    assert storage.list_dir(root) == [d, f["e.txt"]]
    assert storage.list_dir(d + "/") == [f["d/_SUCCESS"], f["d/a.txt"], f["d/b.json"], sub]
    assert storage.glob(storage.join(root, "d/*.txt")) == [f["d/a.txt"]]
    assert storage.glob(storage.join(root, "d/?.json")) == [f["d/b.json"]]
    assert storage.glob(storage.join(root, "d/**/*.txt")) == \
        [f["d/a.txt"], f["d/sub/c.txt"], f["d/sub/deeper/d.txt"]]
    assert storage.glob(storage.join(root, "d/*.csv")) == []


def test_expand(root):
    f = _make_tree(root)
    files_under_d = [f["d/a.txt"], f["d/b.json"], f["d/sub/c.txt"], f["d/sub/deeper/d.txt"]]
    assert storage.expand(storage.join(root, "d")) == files_under_d  # _SUCCESS is skipped
    assert storage.expand(storage.join(root, "d/**/*.txt")) == \
        [f["d/a.txt"], f["d/sub/c.txt"], f["d/sub/deeper/d.txt"]]
    assert storage.expand(f["e.txt"]) == [f["e.txt"]]
    assert storage.expand([f["e.txt"], storage.join(root, "d"), f["d/a.txt"]]) == \
        [f["e.txt"], *files_under_d]

    missing = storage.join(root, "d/missing.txt")
    with pytest.raises(StorageNotFound, match=re.escape(missing)):
        storage.expand([f["e.txt"], missing])
    with pytest.raises(StorageNotFound, match="matches no file"):
        storage.expand(storage.join(root, "d/*.csv"))


def test_remove(root):
    f = _make_tree(root)
    storage.remove(f["e.txt"])
    assert not storage.exists(f["e.txt"])
    storage.remove(storage.join(root, "d/sub"), recursive=True)
    assert not storage.exists(f["d/sub/c.txt"])
    assert not storage.exists(f["d/sub/deeper/d.txt"])
    assert storage.list_dir(storage.join(root, "d")) == [f["d/_SUCCESS"], f["d/a.txt"],
                                                         f["d/b.json"]]
    storage.remove(f["e.txt"])  # already gone: fine by default
    with pytest.raises(StorageNotFound, match="e.txt"):
        storage.remove(f["e.txt"], missing_ok=False)


def test_failed_writer_leaves_nothing_and_keeps_old_content(root, tmp_path):
    new, old = storage.join(root, "new.bin"), storage.join(root, "old.bin")
    storage.write_bytes(old, b"old content")
    for uri in (new, old):
        with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(uri) as w:
            w.file.write(os.urandom(1 << 20))
            assert _staged_leftovers(tmp_path, root), "the write was not staged"
            raise RuntimeError("boom")
    assert not storage.exists(new)
    assert storage.read_bytes(old) == b"old content"
    assert storage.list_dir(root) == [old]
    assert _staged_leftovers(tmp_path, root) == []


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_changes_by_other_clients_are_seen(request, backend):
    """Listings are not cached: another process's (here: another client's) writes and deletes
    show at once in list_dir, exists and read_bytes (pods write shards side by side)."""
    bucket = _bucket(request, backend)
    folder = storage.join(bucket, "shards")
    storage.write_text(storage.join(folder, "shard-0.json"), "0")
    assert storage.list_dir(folder) == [storage.join(folder, "shard-0.json")]
    assert not storage.exists(storage.join(folder, "shard-1.json"))

    options = {"token": "anon"} if backend == "gs" else {}
    other = fsspec.filesystem(backend, skip_instance_cache=True, **options)
    other.pipe_file(f"{bucket.split('://')[1]}/shards/shard-1.json", b"1")
    other.rm_file(f"{bucket.split('://')[1]}/shards/shard-0.json")

    assert storage.list_dir(folder) == [storage.join(folder, "shard-1.json")]
    assert storage.exists(storage.join(folder, "shard-1.json"))
    assert not storage.exists(storage.join(folder, "shard-0.json"))
    assert storage.read_text(storage.join(folder, "shard-1.json")) == "1"
    assert storage.expand(folder) == [storage.join(folder, "shard-1.json")]


# ---------------------------------------------------------------------------- kill a writer


@pytest.mark.integration
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("backend", ["local", "gs", "s3"])
def test_killed_writer_publishes_nothing(request, tmp_path, backend, existing):
    if backend == "local":
        folder = str(tmp_path / "out")
    else:
        folder = storage.join(_bucket(request, backend), "out")
    final = storage.join(folder, "shard-000000.tar")
    if existing:
        storage.write_bytes(final, b"the old shard")
    mb = 8
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), final, str(mb)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ),
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        assert line == b"ready\n", f"writer did not get ready: {line!r} {proc.stderr.read()!r}"
        # The writer really is in the middle of a write: its staged copy holds the bytes.
        leftovers = _staged_leftovers(tmp_path, folder)
        assert [p.stat().st_size for p in leftovers] == [mb << 20]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    if existing:
        assert storage.read_bytes(final) == b"the old shard"
        assert storage.list_dir(folder) == [final]
    else:
        assert not storage.exists(final)
        if backend == "local":
            assert storage.list_dir(folder) == []  # the staged file is hidden
        else:
            assert not storage.exists(folder)  # no object at all under the prefix
            assert storage.list_dir(_bucket(request, backend)) == []
    # The dead writer's staged copy is never visible under a real name.
    assert storage.glob(storage.join(folder, "*")) == ([final] if existing else [])


# ---------------------------------------------------------------------------- injected faults


ENDPOINT_VARS = {"gs": "STORAGE_EMULATOR_HOST", "s3": "AWS_ENDPOINT_URL"}


def _clear_instances() -> None:
    for proto in ("gs", "s3"):
        fsspec.get_filesystem_class(proto).clear_instance_cache()


@pytest.fixture
def flaky(monkeypatch):
    """``flaky(backend, fail_first=, mode=)`` points that backend at a new FlakyProxy."""
    proxies: list[FlakyProxy] = []
    servers: dict[str, str] = {}

    def start(backend: str, *, fail_first: int | None, mode: str) -> FlakyProxy:
        # The real server, also when an earlier proxy of this test is in the variable.
        upstream = servers.setdefault(backend, os.environ[ENDPOINT_VARS[backend]])
        proxy = FlakyProxy(upstream, fail_first=fail_first, mode=mode, max_lifetime_s=60)
        proxy.__enter__()
        proxies.append(proxy)
        monkeypatch.setenv(ENDPOINT_VARS[backend], proxy.url)
        _clear_instances()  # filesystems read the endpoint when they are created
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()
    _clear_instances()  # drop clients that point at a stopped proxy


def _retry_warnings(caplog, action: str) -> int:
    return sum(f"transient error on {action}" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["503", "reset"])
def test_s3_transient_failures_are_retried(s3_bucket, flaky, monkeypatch, caplog, mode):
    uri = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(uri, b"payload")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore gives up at once; stablerep retries
    caplog.set_level(logging.WARNING, logger="stablerep.storage")

    proxy = flaky("s3", fail_first=2, mode=mode)
    assert storage.read_bytes(uri) == b"payload"
    assert proxy.failed == 2 and proxy.forwarded >= 1, proxy.log
    if mode == "503":  # a reset may also be absorbed inside s3fs; a 503 only by stablerep
        assert _retry_warnings(caplog, "read") == 2

    proxy.fail_next(2)
    storage.write_bytes(storage.join(s3_bucket, "y.bin"), b"written through faults")
    assert proxy.failed == 4, proxy.log
    assert storage.read_bytes(storage.join(s3_bucket, "y.bin")) == b"written through faults"


@pytest.mark.integration
def test_s3_persistent_503_gives_up_naming_uri_and_tries(s3_bucket, flaky, monkeypatch):
    uri = storage.join(s3_bucket, "x.bin")
    storage.write_bytes(uri, b"payload")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy = flaky("s3", fail_first=None, mode="503")
    with pytest.raises(StorageError, match=re.escape(f"cannot read {uri}: still failing after 4 tries")):
        storage.read_bytes(uri)
    assert proxy.requests == 4, proxy.log  # one request per stablerep try


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["gs", "s3"])
def test_persistent_503_gives_up_within_the_stated_bound(request, flaky, monkeypatch, backend):
    """The real default policy, no client-side retry settings: one layer, bounded total."""
    monkeypatch.setattr(storage, "DEFAULT_RETRY", RetryPolicy())
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    policy = storage.DEFAULT_RETRY
    uri = storage.join(_bucket(request, backend), "x.bin")
    storage.write_bytes(uri, b"payload")
    proxy = flaky(backend, fail_first=None, mode="503")
    start = time.monotonic()
    with pytest.raises(StorageError, match=re.escape(
            f"cannot read {uri}: still failing after {policy.attempts} tries")):
        storage.read_bytes(uri)
    elapsed = time.monotonic() - start
    assert proxy.requests == policy.attempts, proxy.log  # nobody retries underneath
    assert elapsed < policy.max_sleep_s + 5, elapsed  # 7.5 s of backoff + 5 quick requests
    assert elapsed >= policy.max_sleep_s / 2  # the backoff really happened


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["503", "reset"])
def test_gcs_transient_failure_is_survived(gcs_bucket, flaky, mode):
    uri = storage.join(gcs_bucket, "x.bin")
    storage.write_bytes(uri, b"payload")
    proxy = flaky("gs", fail_first=1, mode=mode)
    start = time.monotonic()
    assert storage.read_bytes(uri) == b"payload"
    proxy.fail_next(1)
    storage.write_bytes(storage.join(gcs_bucket, "y.bin"), b"second")
    assert proxy.failed == 2 and proxy.forwarded >= 2, proxy.log
    assert storage.read_bytes(storage.join(gcs_bucket, "y.bin")) == b"second"
    assert time.monotonic() - start < 15


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["gs", "s3"])
def test_denied_access_fails_at_once_naming_the_uri(request, flaky, backend):
    bucket = _bucket(request, backend)
    uri = storage.join(bucket, "x.bin")
    storage.write_bytes(uri, b"payload")
    proxy = flaky(backend, fail_first=None, mode="403")
    with pytest.raises(StorageError, match="permission denied") as info:
        storage.read_bytes(uri)
    assert uri in str(info.value)
    assert not isinstance(info.value, StorageNotFound)
    assert proxy.requests == 1, proxy.log  # nobody retried a 403
    # "At once" is counted in requests, not seconds (the first call also builds the client,
    # seconds of CPU on a busy machine): one try of a write or an existence check sends 1-3
    # requests here, and a retried 403 would repeat them up to RetryPolicy.attempts (6) times.
    before = proxy.requests
    with pytest.raises(StorageError, match="permission denied"):
        storage.write_bytes(storage.join(bucket, "y.bin"), b"new")
    assert proxy.requests - before <= 3, proxy.log
    before = proxy.requests
    with pytest.raises(StorageError, match="permission denied"):
        storage.exists(uri)  # not a silent False: resume logic would redo finished work
    assert proxy.requests - before <= 3, proxy.log


# ---------------------------------------------------------------------------- local cache


@pytest.mark.parametrize("backend", ["memory", *SERVER_BACKENDS])
def test_cache_local_downloads_files_and_folders_once(request, tmp_path, backend):
    if backend == "memory":
        base = f"memory://cache-{uuid.uuid4().hex[:10]}"
        request.addfinalizer(lambda: storage.remove(base, recursive=True))
    else:
        base = _bucket(request, backend)
    cache = tmp_path / "cache"
    model = storage.join(base, "models/tiny/weights.bin")
    storage.write_bytes(model, b"w" * 1000)
    storage.write_json(storage.join(base, "models/tiny/config.json"), {"dim": 8})
    storage.write_text(storage.join(base, "models/tiny/tokenizer/vocab.txt"), "a\nb\n")

    path = storage.cache_local(model, cache_root=cache)
    assert path.is_file() and path.read_bytes() == b"w" * 1000
    folder = storage.cache_local(storage.join(base, "models/tiny"), cache_root=cache)
    assert folder.is_dir() and folder != path
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == \
        ["config.json", "tokenizer/vocab.txt", "weights.bin"]
    assert (folder / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"

    storage.remove(storage.join(base, "models"), recursive=True)
    assert not storage.exists(model)
    assert storage.cache_local(model, cache_root=cache) == path  # served from the cache
    assert storage.cache_local(storage.join(base, "models/tiny") + "/",
                               cache_root=cache) == folder
    assert path.read_bytes() == b"w" * 1000
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, folder.name])

    missing = storage.join(base, "models/other.bin")
    with pytest.raises(StorageNotFound, match=re.escape(missing)):
        storage.cache_local(missing, cache_root=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, folder.name])


# ---------------------------------------------------------------------------- missing buckets


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["gs", "s3"])
def test_missing_bucket_is_not_found_naming_the_uri(request, tmp_path, backend):
    request.getfixturevalue({"gs": "gcs_server", "s3": "s3_server"}[backend])
    bucket = f"{backend}://no-such-bucket-{uuid.uuid4().hex[:8]}"
    uri = storage.join(bucket, "x.json")
    assert not storage.exists(uri)
    calls = {
        "read_bytes": (lambda: storage.read_bytes(uri), uri),
        "read_json": (lambda: storage.read_json(uri), uri),
        "size": (lambda: storage.size(uri), uri),
        "expand": (lambda: storage.expand(uri), uri),
        "list_dir": (lambda: storage.list_dir(bucket), bucket),
        "cache_local": (lambda: storage.cache_local(uri, cache_root=tmp_path / "c"), uri),
        "write_json": (lambda: storage.write_json(uri, {"a": 1}), uri),
    }
    for what, (call, named) in calls.items():
        with pytest.raises(StorageNotFound, match=re.escape(named)):
            call()
            pytest.fail(f"{what} did not raise")
    assert _staged_leftovers(tmp_path, bucket) == []  # the failed upload cleaned up
