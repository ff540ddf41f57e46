"""Training on the GPU: a ViT-B/16 StableRep step in bf16 with the real head (SyncBatchNorm
conversion, fused AdamW), the same step compiled, and `stablerep train` for a few hundred steps
from real shards with a checkpoint and an exact resume.

In smoke mode (``STABLEREP_GPU_SMOKE=1``, no GPU) the same tests run ViT-Ti at 32 px on the
CPU for a few steps; the CUDA-only checks skip, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stablerep.captions import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig, TrainConfig
from stablerep.data.loader import Batch
from stablerep.distributed import DistEnv
from stablerep.generation.runner import generate
from stablerep.models import convert_sync_batchnorm, create_model
from stablerep.training.optim import create_optimizer
from stablerep.training.trainer import train_step

RUN_TIMEOUT_S = 300  # a hang guard for each `stablerep train` run
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _cfg(profile, **changes) -> TrainConfig:
    base = dict(model=profile.vit, image_size=profile.vit_size,
                captions_per_batch=profile.captions, images_per_caption=profile.k)
    if profile.smoke:
        base.update(head_hidden_dim=64, head_out_dim=32)
    return TrainConfig(**{**base, **changes})


def _batch(cfg: TrainConfig) -> Batch:
    n, k = cfg.captions_per_batch, cfg.crops_per_caption
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n * k, 3, cfg.image_size, cfg.image_size, generator=g)  # (n*k, 3, s, s)
    return Batch(images=images, labels=torch.arange(n).repeat_interleave(k),
                 texts=[f"caption {i}" for i in range(n)], caption_ids=torch.arange(n), index=0)


def _model_and_optimizer(profile, cfg: TrainConfig):
    torch.manual_seed(0)
    model = convert_sync_batchnorm(create_model(cfg), cuda=profile.cuda).to(profile.device)
    return model, create_optimizer(model, cfg, skip=model.no_weight_decay())


def _autocast(profile):
    if profile.cuda:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _steps(profile, model, opt, cfg, batch, n: int) -> list[float]:
    env = DistEnv(device=profile.device)
    return [float(train_step(model, opt, [batch], cfg, env,
                             autocast=_autocast(profile))["loss"]) for _ in range(n)]


def test_vit_b16_stablerep_step_bf16_real_head(profile):
    cfg = _cfg(profile)
    model, opt = _model_and_optimizer(profile, cfg)
    norm = torch.nn.SyncBatchNorm if profile.cuda else torch.nn.BatchNorm1d
    assert any(isinstance(m, norm) for m in model.modules())  # the head's BatchNorm converted
    if profile.cuda:
        assert all(g.get("fused") for g in opt.param_groups) or opt.defaults.get("fused")
    before = [p.detach().clone() for p in model.parameters()]
    losses = _steps(profile, model, opt, cfg, _batch(cfg), 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch three times: its loss goes down
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(),
                                                                  strict=True))
    assert changed > 0.9 * len(before)


def test_compiled_step_matches_eager(profile):
    if not profile.cuda:
        pytest.skip("torch.compile of the training step: CUDA only (inductor on 2 CPU cores "
                    "is minutes)")
    cfg = _cfg(profile)
    batch = _batch(cfg)
    model, opt = _model_and_optimizer(profile, cfg)
    eager = _steps(profile, model, opt, cfg, batch, 2)
    model, opt = _model_and_optimizer(profile, cfg)
    compiled = _steps(profile, torch.compile(model), opt, cfg, batch, 2)
    for a, b in zip(eager, compiled, strict=True):  # bf16: close, not equal
        assert abs(a - b) <= 0.02 * abs(a) + 1e-3, (eager, compiled)


# ------------------------------------------------------------------ `stablerep train` + resume


@pytest.fixture(scope="module")
def shards(profile, tmp_path_factory) -> Path:
    """A data root whose images/ holds 2 shards of 64 captions x 3 images (tiny SD)."""
    root = tmp_path_factory.mktemp("gpu-data")
    make_captions(CaptionsConfig(source="synthetic", num_captions=64 if profile.cuda else 16,
                                 num_shards=2), str(root / "captions"))
    generate(GenerateConfig(backend="tiny", tiny_cache=str(root / "cache"),
                            device=profile.device, images_per_caption=3, height=64, width=64,
                            stored_size=64, num_inference_steps=2, batch_size=48),
             captions=str(root / "captions"), out=str(root / "images"))
    return root


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONWARNINGS="ignore::FutureWarning")
    if not torch.cuda.is_available():  # smoke mode on a shared CPU: one thread per process
        env.update(OMP_NUM_THREADS="1")
    return env


def _train_cmd(profile, data: Path, out: Path) -> list[str]:
    every = max(profile.train_steps // 4, 1)
    return [sys.executable, "-m", "stablerep.cli", "train", "--data-root", str(data),
            "--out", str(out), *profile.cli_model, "--captions-per-batch", "8", "-k", "2",
            "--max-steps", str(profile.train_steps), "--num-workers", str(profile.workers),
            "--device", profile.device, "--set", f"train.checkpoint_every={every}",
            "--set", "train.tensorboard=false", "--set", "train.knn_every=0"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)


def _kill_after_first_checkpoint(cmd: list[str], out: Path) -> int:
    """Start ``cmd``, SIGKILL it (and its loader workers) once a checkpoint is written."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"training ended (status {proc.returncode}) before it was killed")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                step = json.loads((out / "latest.json").read_text())["step"]
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return step
            time.sleep(0.01)
        pytest.fail("no checkpoint appeared")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_train_cli_checkpoints_and_resumes_exactly(profile, shards, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(_train_cmd(profile, shards, ref))
    killed_at = _kill_after_first_checkpoint(_train_cmd(profile, shards, run), run)
    assert 0 < killed_at < profile.train_steps
    _run(_train_cmd(profile, shards, run))  # the same command resumes from the checkpoint
    assert json.loads((run / "latest.json").read_text())["step"] == profile.train_steps
    want, got = _weights(ref), _weights(run)
    assert sorted(want) == sorted(got)
    for name in want:  # the resumed run ends with the uninterrupted run's weights, bit for bit
        assert torch.equal(want[name], got[name]), name
