"""Staged shard files on a shared local volume: unique per writer, removed only when dead.

Two real writer processes stage the same shard at once (tests/integration/_storage_writer.py,
which holds ``storage.atomic_write`` open until it is killed) while a third party -- this test
process, playing a replacement pod -- runs the runner's stale-staging cleanup before drawing
the shard. No model is loaded.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablerep import storage
from stablerep.generation import runner

pytestmark = pytest.mark.integration

WRITER = Path(__file__).parent / "_storage_writer.py"
STEM = "shard-000000"


def _start_writer(final: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(WRITER), str(final), "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else b""
    assert line == b"ready\n", (line, proc.stderr.read() if not ready else b"")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def _staged(folder: Path) -> set[str]:
    return {p.name for p in folder.glob(f"{storage.TEMP_PREFIX}{STEM}.*")}


def test_concurrent_writers_of_one_shard_keep_each_others_staged_files(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    final = folder / f"{STEM}.tar"
    first = _start_writer(final)
    try:
        second = _start_writer(final)
        try:
            names = _staged(folder)
            assert len(names) == 2, names  # one staged name per writer
            for proc in (first, second):  # each says who writes it
                assert len([n for n in names if f".{socket.gethostname()}.{proc.pid}." in n]) == 1
            # A replacement writer of the same shard cleans up before it stages its own.
            assert runner.remove_stale_staged(str(folder), STEM) == []
            assert _staged(folder) == names
            own = storage.AtomicWrite(str(final), None)
            own.file.write(b"mine")
            assert runner.remove_stale_staged(str(folder), STEM) == []
            assert _staged(folder) == names | {own.staged_path.name}

            # The first writer dies: only its file goes, the live ones stay.
            dead = next(n for n in names if f".{first.pid}." in n)
            _stop(first)
            assert runner.remove_stale_staged(str(folder), STEM) == [dead]
            assert _staged(folder) == (names - {dead}) | {own.staged_path.name}
            own.publish()
            assert final.read_bytes() == b"mine"
        finally:
            _stop(second)
    finally:
        _stop(first)


def test_files_of_other_hosts_go_only_when_old(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    prefix = f"{storage.TEMP_PREFIX}{STEM}"
    fresh = folder / f"{prefix}.tar.other-pod-7f9c.1.0123456789ab"  # pid 1 of another host
    old = folder / f"{prefix}.json.other-pod-7f9c.12.0123456789ab"
    unnamed = folder / f"{prefix}.tar.1a2b3c4d"  # an older naming that does not say who
    other_shard = folder / f"{storage.TEMP_PREFIX}shard-000001.tar.other-pod.3.0123456789ab"
    for path in (fresh, old, unnamed, other_shard):
        path.write_bytes(b"x")
    hours = time.time() - runner.STALE_STAGED_S - 60
    for path in (old, other_shard):
        os.utime(path, (hours, hours))
    assert runner.remove_stale_staged(str(folder), STEM) == [old.name]
    assert {p.name for p in folder.iterdir()} == {fresh.name, unnamed.name, other_shard.name}
    os.utime(unnamed, (hours, hours))
    assert runner.remove_stale_staged(str(folder), STEM) == [unnamed.name]
    later = time.time() + runner.STALE_STAGED_S + 1
    assert runner.staged_is_dead(fresh, f"{STEM}.tar", now=later)
    assert not runner.staged_is_dead(fresh, f"{STEM}.tar")


def test_a_live_writer_keeps_its_staged_file_fresh(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.05)
    staged = tmp_path / f"{storage.TEMP_PREFIX}{STEM}.tar.other-host.5.0123456789ab"
    staged.write_bytes(b"x")
    hours = time.time() - runner.STALE_STAGED_S - 60
    os.utime(staged, (hours, hours))
    assert runner.staged_is_dead(staged, f"{STEM}.tar")
    beat = runner._Heartbeat(staged)
    try:
        deadline = time.monotonic() + 10
        while runner.staged_is_dead(staged, f"{STEM}.tar"):
            assert time.monotonic() < deadline, "the heartbeat never touched the file"
            time.sleep(0.02)
    finally:
        beat.stop()
    assert runner.remove_stale_staged(str(tmp_path), STEM) == []
