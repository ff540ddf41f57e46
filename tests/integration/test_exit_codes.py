"""Exit statuses of real distributed runs: 2 gloo processes on CPU, a tiny ViT at 32 px, on
procedural digits (32 captions x 3 images, 4 shards) drawn once per module.

- rank 1 hits a shape error in its training step (injected by a ``sitecustomize`` on the
  PYTHONPATH of that test's run only): the user sees that error with its traceback, and
  ``python -m stablerep.train_launch`` (the pods' torchrun) exits 1, "internal bug", not the
  lost-peer status;
- two ranks started as two separate "nodes" (as on a cluster; torchrun on one node would stop
  the survivor itself): rank 1 is SIGKILLed mid-run, and rank 0 ends with one line saying a
  peer was lost, exit status 138 (retried by the job's failure policy);
- a checkpoint written by 2 processes is refused by a run of 1 with one line naming both
  sizes, before anything is written.

torch runs on one thread per process. Waits are on conditions (a log line, an exit), never
fixed sleeps; every limit is a hang guard sized for a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stablerep.captions.stage import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig
from stablerep.errors import EXIT_BUG, EXIT_PEER_LOST, EXIT_USER_ERROR
from stablerep.generation.runner import generate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")
TINY = ["--model", "vit_tiny", "--image-size", "32", "--set", "train.head_hidden_dim=64",
        "--set", "train.head_out_dim=32", "--captions-per-batch", "8", "-k", "2",
        "--num-workers", "0", "--set", "train.log_every=1"]
RUN_TIMEOUT_S = 400  # hang guards, not expectations
START_TIMEOUT_S = 300

# Imported at start-up by every Python process whose PYTHONPATH holds its folder; it acts only
# in the process torchrun started as rank 1, and breaks the n-th loss computation there with a
# real shape error from torch (a matrix product of mismatched sizes).
SITECUSTOMIZE = '''
import os

if os.environ.get("RANK") == "1" and os.environ.get("BREAK_RANK1_AT_CALL"):
    import torch
    import stablerep.training.trainer as trainer

    _loss, _calls = trainer.compute_loss, []

    def compute_loss(*args, **kwargs):
        _calls.append(1)
        if len(_calls) == int(os.environ["BREAK_RANK1_AT_CALL"]):
            torch.zeros(16, 192) @ torch.zeros(191, 64)
        return _loss(*args, **kwargs)

    trainer.compute_loss = compute_loss
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root whose images/ holds 4 shards of 8 procedural captions x 3 images."""
    root = tmp_path_factory.mktemp("digits")
    make_captions(CaptionsConfig(source="procedural", num_captions=32, num_shards=4),
                  str(root / "captions"))
    generate(GenerateConfig(backend="procedural", images_per_caption=3, height=32, width=32,
                            stored_size=0, image_format="png", batch_size=32, encode_workers=1),
             captions=str(root / "captions"), out=str(root / "images"))
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> list[str]:
    """The training pods' command, with 2 processes on this machine."""
    return [sys.executable, "-m", "stablerep.train_launch", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "stablerep.train", *args]


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_a_shape_error_on_rank_1_is_reported_as_a_bug(data: Path, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", str(ROOT))])
    run = _run(_launch("--data-root", str(data), "--out", str(tmp_path / "train"), *TINY,
                       "--max-steps", "4"),
               _env(PYTHONPATH=path, BREAK_RANK1_AT_CALL="2"))
    text = run.stdout + run.stderr
    assert run.returncode == EXIT_BUG, text[-4000:]
    # rank 1's own report: the traceback down to the failing product, then the summary line
    shape = "mat1 and mat2 shapes cannot be multiplied (16x192 and 191x64)"
    assert "Traceback (most recent call last)" in text and "in compute_loss" in text, text[-4000:]
    assert f"error: internal error: RuntimeError: {shape}" in text, text[-4000:]
    assert "rank 1: 1" in text and "exit status 1" in text  # the wrapper's summary
    assert "train: step 1/4" in text  # it failed in the second step, after a good one


def _node(rank: int, port: int, out: Path, data: Path, log: Path) -> subprocess.Popen:
    """One training process started as torchrun starts a rank of a 2-node job."""
    cmd = [sys.executable, "-m", "stablerep.train", "--data-root", str(data), "--out",
           str(out), *TINY, "--max-steps", "5000", "--set", "train.dist_timeout_s=120"]
    env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    with open(log, "w") as sink:
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)


def test_the_survivor_of_a_killed_peer_exits_retryable(data: Path, tmp_path: Path) -> None:
    port, out = _free_port(), tmp_path / "train"
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [_node(r, port, out, data, logs[r]) for r in (0, 1)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "train: step 2/5000" not in logs[0].read_text():
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "no second step"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        status = procs[0].wait(timeout=RUN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = logs[0].read_text()
    assert status == EXIT_PEER_LOST, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: a peer process failed or stopped responding ("), last
    assert "gloo/transport/" in last and last.endswith(
        "restart the job: it resumes from the last checkpoint"), last
    assert "Traceback" not in text, text[-3000:]


def test_resume_at_another_world_size_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    two = _run(_launch("--data-root", str(data), "--out", str(out), *TINY, "--max-steps", "2"),
               _env())
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "ckpt-00000002.pt" in before
    one = _run([sys.executable, "-m", "stablerep.cli", "train", "--data-root", str(data),
                "--out", str(out), *TINY, "--max-steps", "4"], _env())
    assert one.returncode == EXIT_USER_ERROR, one.stderr[-3000:]
    assert one.stderr.count("\n") == 1, one.stderr
    assert one.stderr.startswith(
        "error: train.resume: the checkpoint was written by 2 processes, this run has 1; "
        "resume with 2 processes"), one.stderr
    with contextlib.suppress(FileNotFoundError):  # nothing written, nothing removed
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert after == before
