"""The training stage end to end on shards drawn by the real tiny Stable Diffusion pipeline.

One data set (32 synthetic captions x 3 images, 4 shards, 64 px) is generated per module; a
second one (8 captions x 1 image) for the m = 1 cases. Runs use a tiny ViT at 32 px:

- a short run through the library Trainer: the loss goes down, metrics.jsonl / TensorBoard /
  checkpoints / the backbone export are written, the backbone loads into plain timm;
- resume: a `stablerep train` killed with SIGKILL after a checkpoint and restarted with the
  same command ends with the same weights as an uninterrupted run (0 and 2 loader workers);
- every method (stablerep, stablerep_plus, simclr, clip) trains end to end;
- two processes under torchrun (gloo) train end to end; a SIGKILLed rank ends the job;
- bad input through the CLI: exit status 2, one `error:` line, nothing written.

torch runs on one thread here and in the subprocesses (the CI machine has 2 busy cores).
Waits are on conditions (a log line, a checkpoint, a process state), never fixed sleeps, and
every limit is sized for half of those 2 cores (another job on the second one): a limit
guards against a hang, so it costs nothing when things work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stablerep import distributed
from stablerep.captions import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig, TrainConfig
from stablerep.generation.runner import generate
from stablerep.stages import knn_callback
from stablerep.training.optim import lr_factor, peak_lr
from stablerep.training.trainer import Trainer, TrainResult

pytestmark = pytest.mark.integration

TINY_MODEL = dict(model="vit_tiny", image_size=32, head_hidden_dim=64, head_out_dim=32)
TINY_TEXT = dict(text_width=32, text_layers=1, text_heads=2, embed_dim=16, text_context=16)
CLI_TINY = ["--model", "vit_tiny", "--image-size", "32", "--set", "train.head_hidden_dim=64",
            "--set", "train.head_out_dim=32"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# Hang guards, not expectations: a torchrun job of 2 ranks showed its second step 31-38 s
# after its start with a CPU hog on one of the 2 busy cores; these leave room for far worse.
RUN_TIMEOUT_S = 600
START_TIMEOUT_S = 300  # until a started run shows its first steps or checkpoint


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for var in DIST_VARS:  # the library runs below must be single plain processes
            mp.delenv(var, raising=False)
        yield
    torch.set_num_threads(threads)


def _generate(root: Path, cache: Path, *, captions: int, shards: int, m: int) -> Path:
    make_captions(CaptionsConfig(source="synthetic", num_captions=captions, num_shards=shards),
                  str(root / "captions"))
    generate(GenerateConfig(backend="tiny", tiny_cache=str(cache), images_per_caption=m,
                            height=64, width=64, stored_size=64, num_inference_steps=2,
                            batch_size=12),
             captions=str(root / "captions"), out=str(root / "images"))
    return root


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """A data root whose images/ holds 4 shards of 8 captions x 3 images."""
    return _generate(tmp_path_factory.mktemp("data"), tiny_cache, captions=32, shards=4, m=3)


@pytest.fixture(scope="module")
def data_m1(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path, data: Path) -> Path:
    """A data root whose images/ holds 1 shard of 8 captions x 1 image."""
    return _generate(tmp_path_factory.mktemp("data-m1"), tiny_cache, captions=8, shards=1, m=1)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stablerep.cli", "train", *args]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "stablerep.train", *args]


def _run(cmd: list[str], timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _train(data_root: Path, out: Path, **changes) -> TrainResult:
    """A run through the library, as `stablerep train` makes it, in this process."""
    base = dict(TINY_MODEL, captions_per_batch=8, images_per_caption=2, num_workers=0,
                log_every=1, max_steps=3)
    cfg = TrainConfig(**{**base, **changes})
    env = distributed.setup("cpu")
    assert not env.distributed
    return Trainer(cfg, data=[str(data_root / "images")], out=str(out), env=env,
                   knn_check=knn_callback(cfg, env)).fit()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _written(out: Path) -> list[str]:
    """Training outputs present under ``out`` (checkpoints, pointers, exports, metrics)."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name.startswith("ckpt-") or p.name in (
                      "latest.json", "backbone.pt", "backbone.json", "metrics.jsonl"))


# ---------------------------------------------------------------------------- a short run


def test_short_run_learns_and_writes_every_output(data: Path, tmp_path: Path) -> None:
    import timm
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "train"
    steps = 30
    # No augmentation and a larger rate: the 32 captions' image pairs are learnt quickly, so
    # the drop shows through the noise of 16-image batches.
    cfg_changes = dict(captions_per_batch=16, max_steps=steps, base_lr=2e-3,
                       augmentation="none", checkpoint_every=10, keep_checkpoints=2)
    result = _train(data, out, **cfg_changes)
    assert result.steps == steps

    lines = _metrics(out)
    assert [r["step"] for r in lines] == list(range(1, steps + 1))  # log_every 1
    for r in lines:
        assert {"step", "epoch", "loss", "loss_image", "lr", "images_per_s",
                "bad_samples"} <= set(r)
        assert r["loss"] == r["loss_image"] and r["images_per_s"] > 0 and r["bad_samples"] == 0
    # 32 captions / 16 per step = 2 steps per epoch; warmup 0.5 epoch = 1 step
    cfg = TrainConfig(**TINY_MODEL, images_per_caption=2, **cfg_changes)
    for r in lines:  # the rate each step used
        want = peak_lr(cfg) * lr_factor(r["step"] - 1, warmup=1, total=steps)
        assert r["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert lines[-1]["epoch"] == pytest.approx(steps / 2)
    losses = [r["loss"] for r in lines]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.85 * first, losses

    # TensorBoard
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == steps

    # checkpoints: the last two kept, latest.json pointing at the final one
    latest = json.loads((out / "latest.json").read_text())
    assert latest["step"] == steps and latest["checkpoint"] == f"ckpt-{steps:08d}.pt"
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-00000020.pt",
                                                             "ckpt-00000030.pt"]
    state = torch.load(out / latest["checkpoint"], map_location="cpu", weights_only=True)
    assert state["step"] == steps and state["model_info"]["timm_model"] == "vit_tiny_patch16_224"

    # the backbone export loads into plain timm and computes the trained features
    info = json.loads((out / "backbone.json").read_text())
    assert info["timm_model"] == "vit_tiny_patch16_224" and info["image_size"] == 32
    assert info["step"] == steps
    model = timm.create_model(info["timm_model"], img_size=info["image_size"], num_classes=0,
                              global_pool="token")
    weights = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(weights, strict=True)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state["model"][f"backbone.{name}"]), name
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 192)


# ---------------------------------------------------------------------------- resume


def _resume_args(data: Path, out: Path, workers: int) -> list[str]:
    return ["--data-root", str(data), "--out", str(out), *CLI_TINY, "--captions-per-batch", "8",
            "-k", "2", "--max-steps", "10", "--num-workers", str(workers),
            "--set", "train.checkpoint_every=2", "--set", "train.log_every=1"]


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path,
                         timeout: float = START_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended (status {proc.returncode}) before it could be killed")
        try:
            return json.loads((out / "latest.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigkill_matches_an_uninterrupted_run(data: Path, tmp_path: Path,
                                                           workers: int) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    victim = subprocess.Popen(_cli(*_resume_args(data, run, workers)), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        step = _wait_for_checkpoint(victim, run)
        os.killpg(victim.pid, signal.SIGKILL)  # the trainer and its loader workers
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    assert victim.returncode == -signal.SIGKILL
    killed_at = json.loads((run / "latest.json").read_text())["step"]
    assert 2 <= step <= killed_at < 10

    again = _run(_cli(*_resume_args(data, run, workers)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {killed_at}" in again.stderr
    # the uninterrupted run: the same config through the library, in this process
    _train(data, ref, max_steps=10, num_workers=workers, checkpoint_every=2)

    final = "ckpt-00000010.pt"
    want = torch.load(ref / final, map_location="cpu", weights_only=True)
    got = torch.load(run / final, map_location="cpu", weights_only=True)
    assert got["step"] == want["step"] == 10
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert [r["step"] for r in _metrics(run)] == list(range(1, 11))  # none twice, none lost
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(ref)]


# ---------------------------------------------------------------------------- methods


@pytest.mark.parametrize(("method", "parts"), [
    ("stablerep", {"loss_image"}),
    ("stablerep_plus", {"loss_image", "loss_clip", "logit_scale"}),
    ("simclr", {"loss_image"}),
    ("clip", {"loss_clip", "logit_scale"}),
])
def test_each_method_trains_end_to_end(data: Path, tmp_path: Path, method: str,
                                       parts: set[str]) -> None:
    extra = TINY_TEXT if method in ("stablerep_plus", "clip") else {}
    result = _train(data, tmp_path / method, method=method, max_steps=3, **extra)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))
    lines = _metrics(tmp_path / method)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(parts <= set(r) for r in lines)
    if "logit_scale" in parts:
        assert all(0 < r["logit_scale"] <= 100 for r in lines)
    state = torch.load(tmp_path / method / "ckpt-00000003.pt", map_location="cpu",
                       weights_only=True)
    assert state["model_info"]["method"] == method
    assert (tmp_path / method / "backbone.pt").exists()


def test_knn_check_during_training_is_logged(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "knn"
    result = _train(data, out, max_steps=4, knn_every=2)
    assert result.steps == 4
    # the last line is step 4's kNN line; the summary rate is the last training line's
    assert "knn_top1" in _metrics(out)[-1]
    assert result.images_per_s == _metrics(out)[-2]["images_per_s"] > 0
    knn = [r for r in _metrics(out) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4]
    assert all(0.0 <= r["knn_top1"] <= 1.0 and r["knn_dataset"] == "sklearn:digits"
               for r in knn)
    # digits has 10 balanced classes: any sane feature beats a 10% guess by far
    assert max(r["knn_top1"] for r in knn) > 0.3
    from stablerep.report import read_loss_curve

    assert [s for s, _ in read_loss_curve(str(out / "metrics.jsonl"))] == [1, 2, 3, 4]


def test_simclr_trains_on_one_image_per_caption(data_m1: Path, tmp_path: Path) -> None:
    result = _train(data_m1, tmp_path / "simclr", method="simclr", max_steps=2)
    assert result.steps == 2 and (tmp_path / "simclr" / "backbone.pt").exists()


# ---------------------------------------------------------------------------- torchrun


def test_two_processes_under_torchrun_train_end_to_end(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "train"
    proc = _run(_torchrun("--data-root", str(data), "--out", str(out), *CLI_TINY,
                          "--captions-per-batch", "8", "-k", "2", "--max-steps", "4",
                          "--num-workers", "0", "--set", "train.checkpoint_every=2",
                          "--set", "train.log_every=1", "--set", "train.knn_every=2"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "distributed: rank 1/2" in proc.stderr
    assert proc.stdout.count("train: 4 steps") == 1  # the summary comes from rank 0 alone
    lines = _metrics(out)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    # the kNN check ran on both ranks' halves of digits: one line per check, from rank 0
    knn = [r for r in lines if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 4] and all(0.3 < r["knn_top1"] <= 1 for r in knn)
    assert proc.stderr.count("kNN top-1 on sklearn:digits") == 2
    # the halves make up the whole: step 4's weights (the final checkpoint) scored on all of
    # digits in one process agree, up to a vote or two flipped by float rounding
    from stablerep.evaluation.backbones import load_backbone
    from stablerep.evaluation.classifiers import knn_accuracy
    from stablerep.evaluation.datasets import load_dataset
    from stablerep.evaluation.features import extract

    backbone, digits = load_backbone(str(out)), load_dataset("sklearn:digits", seed=0)
    kwargs = dict(image_size=32, batch_size=256, device="cpu", amp_dtype=None, num_workers=0)
    train, test = (extract(backbone, split, desc=name, **kwargs)
                   for name, split in (("train", digits.train), ("test", digits.test)))
    whole = knn_accuracy(train.x, train.y, test.x, test.y, k=20)
    assert knn[-1]["knn_top1"] == pytest.approx(whole, abs=2.5 / len(test.y))
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    state = torch.load(out / "ckpt-00000004.pt", map_location="cpu", weights_only=True)
    # 32 captions / 8 per step: the 4 steps were one epoch, finished
    assert state["world_size"] == 2 and (state["epoch"], state["micro_batches"]) == (1, 0)
    assert (out / "backbone.pt").exists() and (out / "config.yaml").exists()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _state(pid: int) -> str:
    """The process state letter in /proc (R, S, T stopped, Z zombie ...); "" once reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_until(condition, timeout: float, what: str, proc: subprocess.Popen,
                log: Path) -> None:
    """Polls ``condition()``; fails naming ``what`` if the job ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s"
        time.sleep(0.05)


# The hung rank ignores torchrun's SIGTERM (a stopped process acts on no signal but SIGKILL);
# torchrun sends SIGKILL after its 30 s shutdown wait. So after the stop the job takes about
# DIST_TIMEOUT_S (the live rank's collective times out) + 30 s + the CPU work of two exits; the
# limits leave 60 s for that work, which holds at half the CPU. The timeout is large enough
# that a rank lagging its peer while both start on busy cores does not trip it first.
DIST_TIMEOUT_S = 30
TORCHRUN_SHUTDOWN_S = 30
LOST_RANK_CASES = [(signal.SIGKILL, 60),
                   (signal.SIGSTOP, DIST_TIMEOUT_S + TORCHRUN_SHUTDOWN_S + 60)]


@pytest.mark.parametrize(("how", "within"), LOST_RANK_CASES, ids=["killed", "hung"])
def test_a_lost_rank_ends_the_job_instead_of_hanging(data: Path, tmp_path: Path, how: int,
                                                     within: float) -> None:
    """A dead rank (torchrun notices) or a hung one (the collective times out after
    train.dist_timeout_s on the live rank, which then fails with one clear line)."""
    out, log = tmp_path / "train", tmp_path / "torchrun.log"
    cmd = _torchrun("--data-root", str(data), "--out", str(out), *CLI_TINY,
                    "--captions-per-batch", "8", "-k", "2", "--max-steps", "5000",
                    "--num-workers", "0", "--set", "train.log_every=1",
                    "--set", f"train.dist_timeout_s={DIST_TIMEOUT_S}")
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    rank1: list[int] = []
    try:
        _wait_until(lambda: "train: step 2/5000" in log.read_text(), START_TIMEOUT_S,
                    "second training step", proc, log)
        rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        assert len(rank1) == 1, _children(proc.pid)
        os.kill(rank1[0], how)
        lost = time.monotonic()
        if how == signal.SIGSTOP:  # it really hangs: stopped, not exiting or still running
            _wait_until(lambda: _state(rank1[0]) == "T", 30, "stop of rank 1", proc, log)
        try:
            status = proc.wait(timeout=within + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {within + 60:.0f} s after rank 1 was lost:\n"
                        f"{log.read_text()[-3000:]}")
        took = time.monotonic() - lost
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in rank1:  # a stopped rank would otherwise outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    print(f"the job ended {took:.1f} s after rank 1 was lost (limit {within:.0f} s)")
    assert status != 0, text[-3000:]
    assert took < within, f"the job took {took:.0f} s to end after rank 1 was lost"
    assert not (out / "ckpt-00005000.pt").exists()
    if how == signal.SIGSTOP:
        assert "a peer process failed or stopped responding" in text, text[-3000:]
        # ended by the collective's timeout (it began at most a step before the stop), not by
        # something else; a busy machine only makes this longer
        assert took > DIST_TIMEOUT_S - 10, f"the job ended {took:.0f} s after the stop"


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def trained_tiny(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-out") / "train"
    _train(data, out, max_steps=1)
    return out


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# Run as `stablerep train` subprocesses (started together); the cases that fail before any
# batch is read run through click's test runner in this process, to spare an import of
# torch & co. per case on the 2-core CI machine (same command, same exit status and stderr).
IN_PROCESS = ("no_shard_json", "too_few_images", "uneven_split", "m1_stablerep", "latest_list",
              "latest_bytes", "evil_checkpoint")


def _invoke(args: list[str]) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from stablerep.cli import main

    result = CliRunner().invoke(main, ["train", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def bad_runs(data: Path, data_m1: Path, trained_tiny: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every bad-input command; name -> (result, out folder, listing before)."""
    root = tmp_path_factory.mktemp("bad")
    no_json = root / "no-json"
    (no_json / "images").mkdir(parents=True)
    shutil.copy(data / "images" / "shard-000000.tar", no_json / "images")
    corrupt = root / "corrupt"
    shutil.copytree(data / "images", corrupt / "images")
    (corrupt / "images" / "shard-000002.tar").write_bytes(os.urandom(20_000))
    other = root / "other-model"
    shutil.copytree(trained_tiny, other)
    flipped = root / "flipped"  # one byte of one caption changed after generation
    shutil.copytree(data / "images", flipped / "images")
    _flip_caption_byte(flipped / "images" / "shard-000002.tar")
    prepared = {"other_model": other}  # out folders holding something before the run
    for name, content in (("latest_list", b"[]"),
                          ("latest_bytes", b'{"step": 1, "checkpoint": "\xff\xfe.pt"}')):
        prepared[name] = root / name / "out"
        prepared[name].mkdir(parents=True)
        (prepared[name] / "latest.json").write_bytes(content)
    prepared["evil_checkpoint"] = root / "evil_checkpoint" / "out"
    _evil_checkpoint(prepared["evil_checkpoint"], root / "marker")

    def args(data_root: Path, name: str, *extra: str) -> list[str]:
        return ["--data-root", str(data_root), "--out", str(root / name / "out"), *CLI_TINY,
                "--captions-per-batch", "8", "-k", "2", "--max-steps", "2", *extra]

    cases = {
        "no_folder": args(root / "nowhere", "no_folder", "--num-workers", "0"),
        "no_shard_json": args(no_json, "no_shard_json", "--num-workers", "0"),
        "corrupt_w0": args(corrupt, "corrupt_w0", "--num-workers", "0", "--no-verify"),
        "corrupt_w2": args(corrupt, "corrupt_w2", "--num-workers", "2", "--no-verify"),
        "sha256_w0": args(corrupt, "sha256_w0", "--num-workers", "0"),
        "sha256_w2": args(flipped, "sha256_w2", "--num-workers", "2"),
        "latest_list": args(data, "latest_list", "--num-workers", "0"),
        "latest_bytes": args(data, "latest_bytes", "--num-workers", "0"),
        "evil_checkpoint": args(data, "evil_checkpoint", "--num-workers", "0"),
        "too_few_images": args(data, "too_few_images", "--num-workers", "0", "-k", "5"),
        "uneven_split": args(data, "uneven_split", "--captions-per-batch", "7",
                             "--set", "train.grad_accum_steps=2"),
        "m1_stablerep": args(data_m1, "m1_stablerep"),
        "other_model": ["--data-root", str(data), "--out", str(other), "--model", "vit_small",
                        "--image-size", "32", "--set", "train.head_hidden_dim=64", "--set",
                        "train.head_out_dim=32", "--captions-per-batch", "8", "-k", "2"],
        "temperature_zero": args(data, "temperature_zero", "--set", "train.temperature=0"),
    }
    before = {name: _listing(folder) for name, folder in prepared.items()}
    procs = {name: subprocess.Popen(_cli(*cmd), env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, cmd in cases.items() if name not in IN_PROCESS}
    done = {name: _invoke(cases[name]) for name in IN_PROCESS}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return {name: (result, prepared.get(name, root / name / "out"), before.get(name))
            for name, result in done.items()}


BAD = {
    "no_folder": ["nowhere/images: no such images folder"],
    "no_shard_json": ["no finished shard (no shard-*.json)", "stablerep generate"],
    "corrupt_w0": ["shard-000002.tar: not a readable tar shard"],
    "corrupt_w2": ["shard-000002.tar: not a readable tar shard"],
    "sha256_w0": ["shard-000002.tar: sha256 ", "does not match", "recorded in its json",
                  "--no-verify"],
    "sha256_w2": ["shard-000002.tar: sha256 ", "does not match", "recorded in its json"],
    "latest_list": ["latest_list/out/latest.json: got list, expected a JSON object"],
    "latest_bytes": ["latest_bytes/out/latest.json: not UTF-8 text (byte 0xff at offset 27); "
                     "expected a JSON object"],
    "evil_checkpoint": ["evil_checkpoint/out/ckpt-00000001.pt: refused to load: it holds "
                        "objects other than tensors and plain types (it imports"],
    "too_few_images": ["hold 3 images per caption", "train.images_per_caption=5"],
    "uneven_split": ["train.captions_per_batch: 7 captions do not split evenly",
                     "2 accumulation steps"],
    "m1_stablerep": ["stablerep needs at least 2 images per caption", "simclr"],
    "other_model": ["different model", "vit_tiny_patch16_224", "vit_small_patch16_224"],
    "temperature_zero": ["train.temperature: got 0.0, expected a value > 0"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_with_one_error_line_and_writes_nothing(bad_runs: dict,
                                                                case: str) -> None:
    result, out, before = bad_runs[case]
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in BAD[case]:
        assert text in errors[0], errors[0]
    assert len(errors[0]) < 400, errors[0]  # a message, not a traceback
    assert "Traceback" not in result.stderr
    if before is not None:
        assert _listing(out) == before  # not even config.yaml or a TensorBoard file
    else:
        assert _written(out) == []
        assert not (out / "tb").exists()


def test_resume_refuses_a_pickled_callable_checkpoint_without_running_it(bad_runs: dict
                                                                          ) -> None:
    result, out, _ = bad_runs["evil_checkpoint"]
    assert result.returncode == 2
    assert not (out.parent.parent / "marker").exists()  # the pickled call never ran


# ---------------------------------------------------------------------------- shard integrity


def _flip_caption_byte(tar_path: Path) -> str:
    """Change one byte of the first caption (txt member) of a tar; returns its sample key."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".txt"))
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data] ^= 0xFF  # an ASCII letter becomes a byte that is not UTF-8
    tar_path.write_bytes(bytes(data))
    return member.name.rsplit(".", 1)[0]


def _evil_checkpoint(out: Path, marker: Path) -> None:
    """A training folder whose checkpoint, when unpickled without restriction, touches
    ``marker`` (checked here: an unrestricted load does)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "stablerep.checkpoint", "version": 2, "step": 1,
                "hook": _Touch(marker)}, out / "ckpt-00000001.pt")
    (out / "latest.json").write_text(json.dumps({"step": 1, "checkpoint": "ckpt-00000001.pt"}))
    torch.load(out / "ckpt-00000001.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()


class _Touch:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_no_verify_reads_a_shard_whose_sha256_differs(data: Path, tmp_path: Path) -> None:
    """The flipped caption byte is caught by the sha256 check (bad_runs: sha256_w2); with
    --no-verify training proceeds and skips, and logs, the sample whose caption broke."""
    root = tmp_path / "flipped"
    shutil.copytree(data / "images", root / "images")
    key = _flip_caption_byte(root / "images" / "shard-000001.tar")
    out = tmp_path / "train"
    proc = _run(_cli("--data-root", str(root), "--out", str(out), *CLI_TINY,
                     "--captions-per-batch", "8", "-k", "2", "--max-steps", "4",
                     "--num-workers", "0", "--set", "train.log_every=1", "--no-verify"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"shard-000001.tar: skipped sample '{key}': its txt member is not UTF-8" in proc.stderr
    assert _metrics(out)[-1]["bad_samples"] == 1


def _drop_images(tar_path: Path, count: int) -> list[str]:
    """Remove the image member of the first ``count`` samples (image j = 0 of the first
    captions), rewrite the tar and its json (sha256, sample count); returns their keys."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.rsplit(".", 1)[0] for m, _ in members if m.name.endswith("_000.jpg")}
                  )[:count]
    with open(tar_path, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                 format=tarfile.USTAR_FORMAT) as out:
        for info, blob in members:
            if not (info.name.endswith(".jpg") and info.name.rsplit(".", 1)[0] in keys):
                out.addfile(info, io.BytesIO(blob))
    doc_path = tar_path.with_suffix(".json")
    doc = json.loads(doc_path.read_text())
    doc.update(sha256=hashlib.sha256(tar_path.read_bytes()).hexdigest(),
               num_samples=doc["num_samples"] - count)
    doc_path.write_text(json.dumps(doc))
    (tar_path.parent / "manifest.json").unlink(missing_ok=True)  # it lists the old sha256
    return keys


def test_skipped_samples_are_summed_over_two_workers_and_logged_by_key(data: Path,
                                                                       tmp_path: Path) -> None:
    """7 samples without an image over the 4 shards (1, 2, 1, 3); the two loader workers
    read two shards each, so no one worker's count is the total."""
    root = tmp_path / "broken"
    shutil.copytree(data / "images", root / "images")
    keys = []
    for index, count in enumerate((1, 2, 1, 3)):
        keys += _drop_images(root / "images" / f"shard-{index:06d}.tar", count)
    out = tmp_path / "train"
    proc = _run(_cli("--data-root", str(root), "--out", str(out), *CLI_TINY,
                     "--captions-per-batch", "8", "-k", "2", "--max-steps", "4",
                     "--num-workers", "2", "--set", "train.log_every=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _metrics(out)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    # each worker reads its whole pass before its first batch: both have reported by step 2
    assert [r["bad_samples"] for r in lines[1:]] == [7, 7, 7]
    for key in keys:
        assert f"skipped sample '{key}': no image member" in proc.stderr, key
    assert proc.stderr.count("skipped sample") == 7
