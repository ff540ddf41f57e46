"""The training loop: data, model, loss, optimizer, logging, checkpoints and resume.

One :class:`Trainer` per process. It receives the :class:`~stablerep.distributed.DistEnv` (set
up once by the caller) and runs unchanged as a single process or under torchrun. Every
optimizer step consumes ``grad_accum_steps`` micro-batches per rank; the loss of a micro-batch
is computed on the global micro-batch (embeddings all-gathered with gradients). Rank 0 alone
writes checkpoints, metrics (stdout, ``metrics.jsonl``, TensorBoard) and the backbone export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import unwrap_model
from torch import nn

from stablerep import storage
from stablerep.config import TrainConfig, to_dict
from stablerep.contracts import TRAIN_METRICS
from stablerep.data.augment import BatchAugment
from stablerep.data.loader import Batch, CaptionBatches, Layout, create_loader, iterate
from stablerep.data.shards import ShardRef, discover
from stablerep.distributed import (
    DistEnv,
    all_gather,
    all_reduce_mean,
    all_reduce_sum,
    collectives,
)
from stablerep.errors import ConfigError, InputError, StablerepError
from stablerep.losses import clip_loss, multi_positive_loss
from stablerep.models import (
    StableRepModel,
    convert_sync_batchnorm,
    create_model,
    create_tokenizer,
    timm_name,
)
from stablerep.training import checkpoint as ckpt
from stablerep.training.optim import create_optimizer, create_scheduler, peak_lr

log = logging.getLogger(__name__)

MAX_LOG_SCALE = math.log(100.0)  # the image-text logit scale is clamped at 100


KnnCallback = Callable[..., float]
"""(backbone module, model info, *, amp_dtype) -> kNN top-1; see stablerep.evaluation.knn."""


class TrainingError(StablerepError):
    """Training cannot go on (the loss diverged ...); a lost peer is a PeerLostError."""


def model_info(cfg: TrainConfig, feature_dim: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by, or loaded into, this model."""
    return {"timm_model": timm_name(cfg.model), "image_size": cfg.image_size,
            "model_kwargs": dict(cfg.model_kwargs), "method": cfg.method, "feature_dim": feature_dim,
            "head_hidden_dim": cfg.head_hidden_dim, "head_out_dim": cfg.head_out_dim,
            "embed_dim": cfg.embed_dim if cfg.uses_text else None}


def compute_loss(model: nn.Module, batch: Batch, cfg: TrainConfig, env: DistEnv,
                 tokenizer=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss on one micro-batch of this rank (global negatives via all-gather).

    Returns:
        (loss, parts) where parts holds the detached components (0-d tensors) for logging.
    """
    images = batch.images.to(env.device, non_blocking=True)  # (n * c, 3, H, W)
    if images.dtype == torch.uint8:  # from the loader: augment + normalise here, batched
        images = BatchAugment(cfg.augmentation, cfg.image_size)(images, batch.seed)
    n, c = len(batch.texts), cfg.crops_per_caption
    tokens = tokenizer(batch.texts).to(env.device) if cfg.uses_text else None
    out = model(images, tokens)
    parts: dict[str, torch.Tensor] = {}
    if "z" in out:
        labels = batch.labels.to(env.device) + env.rank * n  # globally unique captions
        parts["loss_image"] = multi_positive_loss(out["z"], labels, temperature=cfg.temperature,
                                                  gather=all_gather, rank=env.rank)
    if cfg.uses_text:
        core = unwrap_model(model)
        img = out["image_embeds"].view(n, c, -1)  # (n, c, e)
        views = [clip_loss(img[:, v], out["text_embeds"], core.logit_scale, gather=all_gather,
                           rank=env.rank) for v in range(c)]
        parts["loss_clip"] = torch.stack(views).mean()
    loss = parts.get("loss_image", 0) + cfg.clip_loss_weight * parts.get("loss_clip", 0)
    if cfg.method == "clip":
        loss = parts["loss_clip"]
    return loss, {k: v.detach() for k, v in parts.items()}  # tensors: no host sync here


def wrap_model(core: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """DDP when distributed (batch statistics over all ranks when ``cfg.sync_bn``), then
    torch.compile when ``cfg.compile``. ``core`` is changed in place and stays usable."""
    model = core
    if env.distributed:
        cuda = env.device.startswith("cuda")
        if cfg.sync_bn:
            model = convert_sync_batchnorm(model, cuda=cuda)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if cuda else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro: list[Batch],
               cfg: TrainConfig, env: DistEnv, *, tokenizer=None,
               scaler: torch.amp.GradScaler | None = None,
               autocast=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's micro-batches: forward, backward, update.

    Each micro-batch's loss is taken against the global micro-batch; gradients are accumulated
    over the micro-batches (DDP synchronises on the last one) as the gradient of their mean.
    The image-text logit scale is clamped at log(100) after the update.

    Args:
        model: the (possibly DDP-wrapped) model.
        optimizer: its optimizer (gradients are zeroed after the update).
        micro: this rank's ``grad_accum_steps`` micro-batches.
        cfg, env: the run's config and place in the job.
        tokenizer: captions -> tokens (methods with text).
        scaler: a GradScaler (fp16), or None.
        autocast: a no-argument context manager factory for the forward pass.

    Returns:
        This rank's mean loss (and its parts) over the micro-batches, as detached 0-d
        tensors: reading them (``float()``) waits for the device, so callers do it only when
        they log.
    """
    model.train()
    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro):
        sync = (model.no_sync() if env.distributed and i < len(micro) - 1
                else contextlib.nullcontext())
        with sync, autocast():
            loss, parts = compute_loss(model, batch, cfg, env, tokenizer)
        scaled = loss / len(micro)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        for k, v in {"loss": loss.detach(), **parts}.items():
            totals[k] = totals.get(k, 0) + v / len(micro)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    core = unwrap_model(model)  # inside DDP / torch.compile
    if getattr(core, "logit_scale", None) is not None:
        with torch.no_grad():
            core.logit_scale.clamp_(max=MAX_LOG_SCALE)
    return totals


@dataclass
class Position:
    """Where training stands: optimizer steps done, epoch, micro-batches done in the epoch."""

    step: int = 0
    epoch: int = 0
    micro_batches: int = 0


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0, staged locally and synced to ``out``.

    Nothing is created before the first metric line: a run that fails early (bad data, a
    checkpoint of another model) leaves ``out`` as it was.
    """

    def __init__(self, out: str, *, enabled: bool, tensorboard: bool):
        self.out, self.enabled, self.tensorboard = out, enabled, tensorboard
        self.lines: list[str] = []
        self.writer = None

    def _tb(self):
        """The TensorBoard writer, created on first use (None when disabled)."""
        if self.writer is None and self.enabled and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.local = (storage.local_path(self.out) if storage.is_local(self.out)
                          else Path(tempfile.mkdtemp(prefix="stablerep-train-")))
            self.local.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.local / "tb"))
        return self.writer

    def resume(self, step: int) -> None:
        """Keep the lines of steps up to ``step`` from an earlier run."""
        uri = storage.join(self.out, TRAIN_METRICS)
        if self.enabled and storage.exists(uri):
            self.lines = [ln for ln in storage.read_text(uri).splitlines()
                          if ln.strip() and json.loads(ln).get("step", 0) <= step]

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps(record, sort_keys=True))
        writer = self._tb()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    writer.add_scalar(f"train/{key}", value, record["step"])

    def sync(self) -> None:
        """Publish metrics.jsonl and the TensorBoard files to ``out``."""
        if not self.enabled:
            return
        storage.write_text(storage.join(self.out, TRAIN_METRICS),
                           "\n".join(self.lines) + ("\n" if self.lines else ""))
        if self.writer is not None:
            self.writer.flush()
            if not storage.is_local(self.out):
                for path in sorted((self.local / "tb").glob("*")):
                    storage.write_bytes(storage.join(self.out, "tb", path.name),
                                        path.read_bytes())

    def close(self) -> None:
        self.sync()
        if self.writer is not None:
            self.writer.close()


@dataclass
class TrainResult:
    """Summary of a finished run."""

    steps: int
    final_loss: float
    checkpoint: str
    backbone: str
    images_per_s: float


class Trainer:
    """Trains one model as configured; see :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, *, data: list[str], out: str, env: DistEnv,
                 knn_check: KnnCallback | None = None):
        """Discover the shards, build the model, optimizer and data; nothing is written yet.

        Args:
            cfg: the validated training config.
            data: images folders (their committed shards are read).
            out: the training folder URI.
            env: this process's rank, world size and device.
            knn_check: called every ``cfg.knn_every`` steps with (backbone, model info,
                amp_dtype=...) and returning kNN top-1; required when ``knn_every`` is set.
        """
        self.cfg, self.out, self.env = cfg, out.rstrip("/"), env
        if cfg.knn_every and knn_check is None:
            raise ConfigError("train.knn_every: set, but no kNN check was given to the trainer "
                              "(stablerep.stages.run_training builds one)")
        self.knn_check = knn_check
        self.shards = discover(data, verify=cfg.verify_shards)
        self._check_images(self.shards)
        self.layout = Layout.create(cfg, self.shards, env.world_size)
        self.steps_per_epoch = self.layout.micro_batches_per_epoch // cfg.grad_accum_steps
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self.warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                       else round(cfg.warmup_epochs * self.steps_per_epoch))
        torch.manual_seed(cfg.seed)
        core = create_model(cfg).to(env.device)
        self.core: StableRepModel = core
        self.info = model_info(cfg, core.feature_dim)
        self.model = self._wrap(core)
        self.optimizer = create_optimizer(self.model, cfg, skip=core.no_weight_decay())
        self.scheduler = create_scheduler(self.optimizer, warmup=self.warmup,
                                          total=self.total_steps)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.tokenizer = create_tokenizer(cfg.text_context) if cfg.uses_text else None
        self.dataset = CaptionBatches(self.shards, cfg, self.layout, rank=env.rank,
                                      world_size=env.world_size)
        self.metrics = MetricsLog(self.out, enabled=env.is_main, tensorboard=cfg.tensorboard)
        self.position = Position()
        self.last_checkpoint = ""
        self.last_lr = peak_lr(cfg)
        self.images_per_s = 0.0  # of the last training metrics line
        self._resumed: bool | None = None  # None: resume() not called yet

    # -- set-up -------------------------------------------------------------------------
    def _check_images(self, shards: list[ShardRef]) -> None:
        have = min(s.images_per_caption for s in shards)
        need = self.cfg.images_read_per_caption
        if self.cfg.method == "stablerep" and have < 2:
            raise InputError("train.method stablerep needs at least 2 images per caption, the "
                             "shards hold 1; use method simclr (two crops of one image)")
        if have < need:
            raise InputError(f"the shards hold {have} images per caption, fewer than "
                             f"train.images_per_caption={need}")

    def _wrap(self, core: nn.Module) -> nn.Module:
        return wrap_model(core, self.cfg, self.env)

    def _amp_dtype(self) -> torch.dtype | None:
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.env.device.startswith("cuda") else "fp32"
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.split(":")[0], dtype=self.amp_dtype)

    # -- state --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        p = self.position
        return {"step": p.step, "epoch": p.epoch, "micro_batches": p.micro_batches,
                "model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(), "config": to_dict(self.cfg), "model_info": self.info,
                "world_size": self.env.world_size}

    def resume(self) -> bool:
        """Load ``latest.json``'s checkpoint if there is one (every rank reads it).

        A checkpoint written by another number of processes is refused (ConfigError naming
        both): its data position counts each process's micro-batches of per-process streams.

        Runs once: :meth:`fit` skips it when the caller already resumed (e.g. to check the
        checkpoint matches this model before writing anything).
        """
        if self._resumed is not None:
            return self._resumed
        self._resumed = False
        if not self.cfg.resume:
            return False
        state = ckpt.load_latest(self.out)
        if state is None:
            return False
        ckpt.check_compatible(state["model_info"], self.info, self.out)
        ckpt.check_world_size(state, self.env.world_size, self.out)
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.position = Position(state["step"], state["epoch"], state["micro_batches"])
        self.metrics.resume(self.position.step)
        self._resumed = True
        if self.env.is_main:
            log.info("train: resumed from step %d (epoch %d, %d micro-batches into it)",
                     self.position.step, self.position.epoch, self.position.micro_batches)
        return True

    def save(self) -> None:
        if self.env.is_main:
            # metrics first: a kill between the two then leaves no line past the checkpoint
            # that a restart would log again
            self.metrics.sync()
            self.last_checkpoint = ckpt.save_checkpoint(self.out, self.state(),
                                                        step=self.position.step,
                                                        keep=self.cfg.keep_checkpoints)

    # -- loop ---------------------------------------------------------------------------
    def _step(self, micro: list[Batch]) -> dict[str, torch.Tensor]:
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        with collectives(self.env):  # DDP's and the loss's gathers
            totals = train_step(self.model, self.optimizer, micro, self.cfg, self.env,
                                tokenizer=self.tokenizer, scaler=self.scaler,
                                autocast=self._autocast)
        self.scheduler.step()
        return totals

    def _record(self, totals: dict[str, torch.Tensor], rows: int, seconds: float, bad: int
                ) -> dict[str, float]:
        """Log a metrics line (rank 0); returns the totals averaged over ranks.

        The only place the loop waits for the device: every ``log_every`` steps. ``bad`` is
        this rank's count of skipped samples; the line holds the sum over ranks.
        """
        p = self.position
        with collectives(self.env):  # means and sums over ranks (every rank)
            totals = {k: all_reduce_mean(float(v), self.env.device) for k, v in totals.items()}
            bad = int(all_reduce_sum(bad, self.env.device))
        if not math.isfinite(totals["loss"]):
            raise TrainingError(f"the loss became {totals['loss']} by step {p.step}; lower "
                                "train.base_lr or check the data")
        record = {"step": p.step, "epoch": round(p.epoch + p.micro_batches
                                                 / self.layout.micro_batches_per_epoch, 4),
                  **{k: round(v, 6) for k, v in totals.items()},
                  "lr": self.last_lr,
                  "images_per_s": round(rows * self.env.world_size / max(seconds, 1e-9), 2),
                  "bad_samples": bad}
        if self.core.logit_scale is not None:
            record["logit_scale"] = round(float(self.core.logit_scale.detach().exp()), 4)
        self.images_per_s = record["images_per_s"]
        if self.env.device.startswith("cuda"):
            record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.metrics.log(record)
        if self.env.is_main:
            log.info("train: step %d/%d epoch %.2f loss %.4f lr %.3g %.1f img/s", p.step,
                     self.total_steps, record["epoch"], totals["loss"], record["lr"],
                     record["images_per_s"])
        return totals

    def _knn_check(self) -> None:
        """Run the kNN callback on the current backbone and log its top-1 (rank 0)."""
        top1 = self.knn_check(self.core.backbone, self.info, amp_dtype=self.amp_dtype)
        self.core.train()
        self.metrics.log({"step": self.position.step, "knn_top1": round(top1, 4),
                          "knn_dataset": self.cfg.knn_dataset})
        if self.env.is_main:
            log.info("train: step %d kNN top-1 on %s: %.4f", self.position.step,
                     self.cfg.knn_dataset, top1)

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` (resuming first when a checkpoint exists)."""
        self.resume()
        cfg, p, accum = self.cfg, self.position, self.cfg.grad_accum_steps
        if self.env.is_main:
            log.info("train: %s %s, %d steps (%d per epoch), %d captions x %d crops per step, "
                     "peak lr %.3g, %d shards -> %s", cfg.method, timm_name(cfg.model),
                     self.total_steps, self.steps_per_epoch, cfg.captions_per_batch,
                     cfg.crops_per_caption, peak_lr(cfg), len(self.shards), self.out)
        last, window_rows, window_start, totals = float("nan"), 0, time.perf_counter(), {}
        bad_before = 0  # samples this rank's streams skipped in the epochs before this one
        loader = None  # made after the first set_epoch (cache filled); workers persist
        while p.step < self.total_steps:
            bad_now: dict[int, int] = {}  # stream -> its skips so far in this epoch
            self.dataset.set_epoch(p.epoch, skip=p.micro_batches)
            micro: list[Batch] = []
            if loader is None:
                loader = create_loader(self.dataset, num_workers=cfg.num_workers,
                                       pin_memory=self.env.device.startswith("cuda"))
            for batch in iterate(loader):
                micro.append(batch)
                if len(micro) < accum:
                    continue
                totals = self._step(micro)
                window_rows += sum(b.images.shape[0] for b in micro)
                bad_now.update({b.stream: b.bad_samples for b in micro})
                bad = bad_before + sum(bad_now.values())
                p.step, p.micro_batches, micro = p.step + 1, p.micro_batches + accum, []
                if p.step % cfg.log_every == 0 or p.step == self.total_steps:
                    last = self._record(totals, window_rows, time.perf_counter() - window_start,
                                        bad)["loss"]
                    window_rows, window_start = 0, time.perf_counter()
                if cfg.knn_every and p.step % cfg.knn_every == 0:
                    self._knn_check()
                if p.step % cfg.checkpoint_every == 0 and p.step < self.total_steps:
                    self.save()
                if p.step >= self.total_steps:
                    break
            bad_before += sum(bad_now.values())
            if p.step < self.total_steps or p.micro_batches >= self.layout.micro_batches_per_epoch:
                p.epoch, p.micro_batches = p.epoch + 1, 0
        self.save()
        backbone = ""
        if self.env.is_main:
            backbone = ckpt.export_backbone(self.out, self.core.backbone.state_dict(),
                                            {**self.info, "step": p.step})
            self.metrics.close()
        return TrainResult(p.step, last, self.last_checkpoint, backbone, self.images_per_s)
