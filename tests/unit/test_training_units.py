"""Training pieces in isolation (pure CPU, seconds): the schedule, parameter groups, the batch
layout, and the data stream's split over ranks x workers and its exact resume.

The shards here are small WebDataset tars written with the project's own tar writer (random
32 px PNG images, 3 per caption), so no diffusion model is needed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from stablerep.config import TrainConfig
from stablerep.contracts import TarShardWriter, sample_key, sample_members
from stablerep.data import loader as loader_mod
from stablerep.data.augment import BatchAugment
from stablerep.data.loader import Batch, CaptionBatches, Layout, create_loader, iterate
from stablerep.data.shards import ShardError, ShardRef, discover
from stablerep.distributed import DistEnv
from stablerep.errors import ConfigError, InputError
from stablerep.models import GlobalBatchNorm1d, convert_sync_batchnorm, create_model
from stablerep.training.optim import (
    create_optimizer,
    create_scheduler,
    lr_factor,
    param_groups,
    peak_lr,
)
from stablerep.training.trainer import compute_loss

TINY = dict(model="vit_tiny", image_size=16, head_hidden_dim=16, head_out_dim=8, embed_dim=8,
            text_width=16, text_layers=1, text_heads=2, text_context=8)


# ---------------------------------------------------------------------------- schedule


def test_lr_factor_warmup_is_linear_to_the_peak() -> None:
    factors = [lr_factor(s, warmup=5, total=25) for s in range(5)]
    assert factors == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_lr_factor_cosine_decays_to_zero_at_the_end() -> None:
    warmup, total = 4, 24
    after = [lr_factor(s, warmup=warmup, total=total) for s in range(warmup, total + 3)]
    assert after[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # never rises again
    assert lr_factor(warmup + 10, warmup=warmup, total=total) == pytest.approx(0.5)  # half-way
    for s in range(warmup, total + 1):
        want = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert lr_factor(s, warmup=warmup, total=total) == pytest.approx(want)
    assert lr_factor(total, warmup=warmup, total=total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total + 5, warmup=warmup, total=total) == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_without_warmup_starts_at_the_peak() -> None:
    assert lr_factor(0, warmup=0, total=10) == pytest.approx(1.0)


@pytest.mark.parametrize(("method", "rows_per_caption"),
                         [("stablerep", 6), ("stablerep_plus", 6), ("simclr", 2), ("clip", 1)])
def test_peak_lr_scales_base_lr_by_rows_per_step_over_512(method: str,
                                                          rows_per_caption: int) -> None:
    cfg = TrainConfig(method=method, captions_per_batch=1376, images_per_caption=6,
                      base_lr=2e-4)
    assert peak_lr(cfg) == pytest.approx(2e-4 * 1376 * rows_per_caption / 512)
    if method == "stablerep":  # the paper's recipe: about 3.2e-3
        assert peak_lr(cfg) == pytest.approx(3.225e-3)


def test_scheduler_applies_peak_times_factor_per_step() -> None:
    cfg = TrainConfig(**TINY, captions_per_batch=64, images_per_caption=2, base_lr=1e-3)
    param = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=peak_lr(cfg))
    sched = create_scheduler(opt, warmup=2, total=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [peak_lr(cfg) * lr_factor(s, warmup=2, total=6) for s in range(7)]
    assert seen == pytest.approx(want)


# ---------------------------------------------------------------------------- param groups

NO_DECAY_NAMES = {"backbone.pos_embed", "backbone.cls_token", "logit_scale",
                  "text.positional_embedding", "text.token_embedding.weight"}


def _expect_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES


class _Wrapper(nn.Module):
    def __init__(self, attr: str, inner: nn.Module):
        super().__init__()
        setattr(self, attr, inner)


@pytest.mark.parametrize("wrapping", ["none", "ddp", "compile", "compile_of_ddp"])
def test_param_groups_exclude_biases_norms_1d_and_embeddings(wrapping: str) -> None:
    torch.manual_seed(0)
    core = create_model(TrainConfig(method="stablerep_plus", **TINY))
    model: nn.Module = core
    for attr in {"none": [], "ddp": ["module"], "compile": ["_orig_mod"],
                 "compile_of_ddp": ["module", "_orig_mod"]}[wrapping]:
        model = _Wrapper(attr, model)  # the parameter names DDP / torch.compile produce
    decay, no_decay = param_groups(model, 0.1, core.no_weight_decay())
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = dict(core.named_parameters())
    assert set(names) >= NO_DECAY_NAMES
    for name, param in names.items():
        expected = no_decay_ids if _expect_no_decay(name, param) else decay_ids
        assert id(param) in expected, name
    assert len(decay_ids) + len(no_decay_ids) == len(names)
    # the ones a plain "1-d or bias" rule would miss are in the no-decay group
    for name in ("backbone.pos_embed", "backbone.cls_token", "text.positional_embedding",
                 "text.token_embedding.weight"):
        assert names[name].ndim >= 2 and id(names[name]) in no_decay_ids
    norms = [n for n, m in core.named_modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    assert norms and all(id(names[f"{n}.weight"]) in no_decay_ids for n in norms)


def test_create_optimizer_uses_the_paper_betas_and_peak_lr() -> None:
    cfg = TrainConfig(**TINY, captions_per_batch=32, images_per_caption=2)
    torch.manual_seed(0)
    core = create_model(cfg)
    opt = create_optimizer(core, cfg, skip=core.no_weight_decay())
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.98) and group["lr"] == pytest.approx(peak_lr(cfg))


def _hand_written_groups(model: nn.Module, weight_decay: float, skip: set[str]) -> list[dict]:
    """The grouping rule as it was written before timm did the sorting (the reference)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = name
        while clean.startswith(("module.", "_orig_mod.")):
            clean = clean.split(".", 1)[1]
        if param.ndim <= 1 or name.endswith(".bias") or clean in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _wrapped(core: nn.Module, wrapping: str) -> nn.Module:
    if wrapping == "torch_compile":
        return torch.compile(core)  # compiles on the first call only; none here
    model = core
    for attr in {"none": [], "ddp": ["module"], "compile_of_ddp": ["module", "_orig_mod"]
                 }[wrapping]:
        model = _Wrapper(attr, model)
    return model


@pytest.mark.parametrize("method", ["stablerep", "stablerep_plus", "simclr", "clip"])
@pytest.mark.parametrize("wrapping", ["none", "ddp", "torch_compile", "compile_of_ddp"])
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_param_groups_are_the_hand_written_rules_groups_in_order(
        method: str, wrapping: str, weight_decay: float) -> None:
    torch.manual_seed(0)
    core = create_model(TrainConfig(method=method, **TINY))
    model = _wrapped(core, wrapping)
    got = param_groups(model, weight_decay, core.no_weight_decay())
    want = _hand_written_groups(model, weight_decay, core.no_weight_decay())
    assert [g["weight_decay"] for g in got] == [g["weight_decay"] for g in want]
    for g, w in zip(got, want, strict=True):  # same parameters, same order
        assert [id(p) for p in g["params"]] == [id(p) for p in w["params"]]
    assert got[0]["params"] and got[1]["params"]


def test_an_optimizer_state_of_the_hand_written_groups_loads_onto_the_same_parameters() -> None:
    cfg = TrainConfig(method="stablerep_plus", **TINY, captions_per_batch=8, images_per_caption=2)
    torch.manual_seed(0)
    core = create_model(cfg)
    old = torch.optim.AdamW(_hand_written_groups(core, cfg.weight_decay, core.no_weight_decay()),
                            lr=1e-3)
    for p in core.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved = {id(p): old.state[p]["exp_avg"].clone() for p in core.parameters()}
    new = create_optimizer(core, cfg, skip=core.no_weight_decay())
    new.load_state_dict(old.state_dict())  # what resuming an existing checkpoint does
    for p in core.parameters():
        assert torch.equal(new.state[p]["exp_avg"], saved[id(p)])


@pytest.mark.parametrize("wrapping", ["none", "ddp", "torch_compile", "compile_of_ddp"])
def test_unwrap_model_reaches_the_core_inside_ddp_and_compile(wrapping: str) -> None:
    from timm.utils import unwrap_model
    core = create_model(TrainConfig(**TINY))
    assert unwrap_model(_wrapped(core, wrapping)) is core


def test_the_schedule_is_the_closed_form_curve_over_1000_steps_and_resumes() -> None:
    warmup, total, peak = 50, 1000, 3.2e-3

    def closed_form(step: int) -> float:  # linear warmup to the peak, then cosine to 0
        if step < warmup:
            return peak * (step + 1) / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
        return opt, create_scheduler(opt, warmup=warmup, total=total)

    opt, sched = fresh()
    curve, state_at_400 = [], None
    for step in range(total + 1):
        curve.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if step == 399:
            state_at_400 = sched.state_dict()
    assert max(abs(c - closed_form(s)) for s, c in enumerate(curve)) < 1e-12
    opt2, sched2 = fresh()
    sched2.load_state_dict(state_at_400)  # a checkpoint's "scheduler" entry
    assert sched2.get_last_lr()[0] == pytest.approx(curve[400], abs=1e-15)
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(curve[401], abs=1e-15)


# ---------------------------------------------------------------------------- batch norm


def test_global_batchnorm_without_a_process_group_is_batchnorm() -> None:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    ref = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    ref.load_state_dict(head.state_dict())
    converted = convert_sync_batchnorm(head, cuda=False)
    assert isinstance(converted[1], GlobalBatchNorm1d)
    x = torch.randn(8, 4)
    assert torch.allclose(converted(x), ref(x), atol=1e-6)
    assert torch.allclose(converted[1].running_var, ref[1].running_var, atol=1e-6)


# ---------------------------------------------------------------------------- layout


def _refs(*captions: int, m: int = 3) -> list[ShardRef]:
    return [ShardRef(f"mem://shard-{i}.tar", c, c * m, m) for i, c in enumerate(captions)]


def test_layout_splits_a_step_over_ranks_and_accumulation() -> None:
    cfg = TrainConfig(**TINY, captions_per_batch=8, images_per_caption=2, grad_accum_steps=2)
    layout = Layout.create(cfg, _refs(8, 8, 8, 8), world_size=2)
    assert layout.captions_per_micro_batch == 2
    assert layout.micro_batches_per_epoch == 4 * 2  # 32 captions / 8 per step, x 2 micro
    assert layout.crops_per_caption == 2


@pytest.mark.parametrize(("captions_per_batch", "accum", "world"), [(7, 2, 1), (8, 1, 3),
                                                                    (6, 2, 2), (1, 1, 2)])
def test_layout_rejects_uneven_splits(captions_per_batch: int, accum: int, world: int) -> None:
    cfg = TrainConfig(**TINY, captions_per_batch=captions_per_batch, images_per_caption=2,
                      grad_accum_steps=accum)
    with pytest.raises(ConfigError, match=rf"train\.captions_per_batch: {captions_per_batch} "
                                          rf"captions do not split evenly over {world} ranks"):
        Layout.create(cfg, _refs(64), world_size=world)


def test_layout_rejects_data_smaller_than_one_batch() -> None:
    cfg = TrainConfig(**TINY, captions_per_batch=16, images_per_caption=2)
    with pytest.raises(InputError, match="hold 10 captions, fewer than one batch"):
        Layout.create(cfg, _refs(4, 6), world_size=1)


# ---------------------------------------------------------------------------- data stream


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, captions_per_shard: list[int], m: int = 3) -> list[ShardRef]:
    """Finished shards (tar + json) of ``m`` random images per caption; ids are global."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cid = 0
    for index, count in enumerate(captions_per_shard):
        stem = f"shard-{index:06d}"
        with open(folder / f"{stem}.tar", "wb") as f:
            writer = TarShardWriter(f)
            for _ in range(count):
                for j in range(m):
                    writer.write(sample_key(cid, j), sample_members(
                        _png(rng), "png", f"caption number {cid}", {"caption_id": cid, "j": j}))
                cid += 1
            writer.close()
        (folder / f"{stem}.json").write_text(json.dumps({
            "tar": f"{stem}.tar", "num_captions": count, "num_samples": count * m,
            "images_per_caption": m,
            "sha256": hashlib.sha256((folder / f"{stem}.tar").read_bytes()).hexdigest()}))
    return discover([str(folder)])


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory: pytest.TempPathFactory) -> list[ShardRef]:
    return write_shards(tmp_path_factory.mktemp("four") / "images", [8, 8, 8, 8])


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> list[ShardRef]:
    return write_shards(tmp_path_factory.mktemp("one") / "images", [32])


def _config(**changes) -> TrainConfig:
    # shuffle_buffer above the captions of a stream: the buffer must not mix passes
    base = dict(TINY, captions_per_batch=8, images_per_caption=2, augmentation="stablerep",
                num_workers=2, shuffle_buffer=256, seed=3)
    return TrainConfig(**{**base, **changes})


def _dataset(shards: list[ShardRef], cfg: TrainConfig, rank: int, world: int,
             epoch: int = 0, skip: int = 0) -> CaptionBatches:
    ds = CaptionBatches(shards, cfg, Layout.create(cfg, shards, world), rank=rank,
                        world_size=world)
    ds.set_epoch(epoch, skip)
    return ds


def _worker_batches(ds: CaptionBatches, worker: int, workers: int,
                    monkeypatch: pytest.MonkeyPatch) -> list[Batch]:
    """What DataLoader worker ``worker`` of ``workers`` yields (worker info simulated)."""
    with monkeypatch.context() as mp:
        mp.setattr(loader_mod, "get_worker_info",
                   lambda: SimpleNamespace(id=worker, num_workers=workers))
        return list(ds)


def _in_loader_order(per_worker: list[list[Batch]]) -> list[Batch]:
    """Round-robin over workers, the order a DataLoader reads an IterableDataset's workers."""
    out = []
    for i in range(max(len(b) for b in per_worker)):
        out += [b[i] for b in per_worker if i < len(b)]
    return out


@pytest.mark.parametrize("layout", ["by_shard", "by_caption"])
def test_first_pass_reads_every_caption_once_over_ranks_and_workers(
        layout: str, four_shards, one_shard, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = four_shards if layout == "by_shard" else one_shard  # 4 streams: >= / < shards
    cfg, world, workers = _config(), 2, 2
    seen: list[int] = []
    for rank in range(world):
        ds = _dataset(shards, cfg, rank, world)
        per_worker = [_worker_batches(ds, w, workers, monkeypatch) for w in range(workers)]
        batches = _in_loader_order(per_worker)
        assert [b.index for b in batches] == list(range(ds.layout.micro_batches_per_epoch))
        for b in batches:
            assert b.images.shape == (4 * 2, 3, 16, 16)
            assert b.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
            assert b.texts == [f"caption number {c}" for c in b.caption_ids.tolist()]
            seen += b.caption_ids.tolist()
    assert sorted(seen) == list(range(32))  # each caption exactly once in the epoch


def test_a_new_epoch_reshuffles(four_shards, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config()
    first = _worker_batches(_dataset(four_shards, cfg, 0, 2, epoch=0), 0, 2, monkeypatch)
    second = _worker_batches(_dataset(four_shards, cfg, 0, 2, epoch=1), 0, 2, monkeypatch)
    assert [b.caption_ids.tolist() for b in first] != [b.caption_ids.tolist() for b in second]


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_resume_skip_yields_exactly_the_later_batches(
        skip: int, four_shards, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, workers = _config(), 2
    for rank in range(2):
        full = _in_loader_order([_worker_batches(_dataset(four_shards, cfg, rank, 2), w,
                                                 workers, monkeypatch) for w in range(workers)])
        resumed = _in_loader_order([
            _worker_batches(_dataset(four_shards, cfg, rank, 2, skip=skip), w, workers,
                            monkeypatch) for w in range(workers)])
        assert [b.index for b in resumed] == list(range(skip, len(full)))
        for a, b in zip(full[skip:], resumed, strict=True):
            assert torch.equal(a.caption_ids, b.caption_ids)
            assert torch.equal(a.images, b.images)  # same crops and flips
            assert a.seed == b.seed  # same colours and blur on the device


def test_real_dataloader_workers_match_and_resume(four_shards) -> None:
    cfg = _config()
    full = list(create_loader(_dataset(four_shards, cfg, 1, 2), num_workers=2,
                              pin_memory=False))
    assert [b.index for b in full] == [0, 1, 2, 3]
    resumed = list(create_loader(_dataset(four_shards, cfg, 1, 2, skip=1), num_workers=2,
                                 pin_memory=False))
    assert [b.index for b in resumed] == [1, 2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        assert torch.equal(a.caption_ids, b.caption_ids) and torch.equal(a.images, b.images)


def test_persistent_workers_follow_set_epoch_like_fresh_loaders(four_shards) -> None:
    """One loader kept over epochs (its workers forked once) yields, after each set_epoch,
    what a loader made afresh for that epoch and skip yields: new epochs reshuffle."""
    cfg = _config()
    ds = _dataset(four_shards, cfg, 0, 2)
    kept = create_loader(ds, num_workers=2, pin_memory=False)
    assert kept.persistent_workers
    seen = []
    for epoch, skip in [(0, 0), (1, 0), (2, 1)]:
        ds.set_epoch(epoch, skip)
        got = list(iterate(kept))
        fresh = list(create_loader(_dataset(four_shards, cfg, 0, 2, epoch=epoch, skip=skip),
                                   num_workers=2, pin_memory=False))
        assert [b.index for b in got] == list(range(skip, 4))
        for a, b in zip(got, fresh, strict=True):
            assert torch.equal(a.caption_ids, b.caption_ids) and torch.equal(a.images, b.images)
            assert a.seed == b.seed
        seen.append([b.caption_ids.tolist() for b in got])
    assert seen[0] != seen[1]  # epoch 1 reshuffled in the running workers


def test_compute_loss_augments_a_uint8_batch_on_the_device_from_its_seed() -> None:
    """A loader batch (uint8 + seed) gives the loss of its BatchAugment'ed float images."""
    cfg = TrainConfig(**TINY, captions_per_batch=4, images_per_caption=2,
                      augmentation="stablerep")
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    raw = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    common = dict(labels=torch.arange(4).repeat_interleave(2), texts=["a", "b", "c", "d"],
                  caption_ids=torch.arange(4), index=0)
    env = DistEnv()
    loss, _ = compute_loss(model, Batch(images=raw, seed=5, **common), cfg, env)
    ready = BatchAugment("stablerep", 16)(raw, 5)
    want, _ = compute_loss(model, Batch(images=ready, **common), cfg, env)
    other, _ = compute_loss(model, Batch(images=raw, seed=6, **common), cfg, env)
    assert torch.equal(loss, want) and not torch.equal(loss, other)


def test_batches_are_uint8_with_a_seed_per_epoch_rank_and_batch(four_shards,
                                                               monkeypatch) -> None:
    cfg = _config()
    first = _worker_batches(_dataset(four_shards, cfg, 0, 2), 0, 1, monkeypatch)
    again = _worker_batches(_dataset(four_shards, cfg, 0, 2), 0, 1, monkeypatch)
    other_rank = _worker_batches(_dataset(four_shards, cfg, 1, 2), 0, 1, monkeypatch)
    later = _worker_batches(_dataset(four_shards, cfg, 0, 2, epoch=1), 0, 1, monkeypatch)
    assert all(b.images.dtype == torch.uint8 for b in first)
    seeds = [b.seed for b in first]
    assert seeds == [b.seed for b in again] and len(set(seeds)) == len(seeds)
    assert not set(seeds) & {b.seed for b in other_rank + later}


@pytest.mark.parametrize("budget_mb", [64.0, 0.004])
def test_the_memory_cache_changes_no_batch_and_skips_the_tars(
        budget_mb: float, four_shards, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.cache_mb: the same batches over epochs; cached shards are not read again."""
    cfg, cached_cfg = _config(num_workers=0), _config(num_workers=0, cache_mb=budget_mb)
    reads: list[str] = []
    real = loader_mod.iter_caption_groups
    monkeypatch.setattr(loader_mod, "iter_caption_groups",
                        lambda uri, **kw: (reads.append(uri), real(uri, **kw))[1])
    plain = CaptionBatches(four_shards, cfg, Layout.create(cfg, four_shards, 1), rank=0,
                           world_size=1)
    cached = CaptionBatches(four_shards, cached_cfg, Layout.create(cached_cfg, four_shards, 1),
                            rank=0, world_size=1)
    for epoch in range(3):
        plain.set_epoch(epoch)
        expected = list(plain)
        reads.clear()
        cached.set_epoch(epoch)
        got = list(cached)
        assert [b.caption_ids.tolist() for b in got] == [b.caption_ids.tolist()
                                                         for b in expected]
        assert all(torch.equal(a.images, b.images) for a, b in zip(got, expected, strict=True))
        held = len(cached._cache)
        if budget_mb > 1:  # everything fits: read once, in the first epoch's fill
            assert held == 4 and len(reads) == (4 if epoch == 0 else 0)
        else:  # 4 KB holds no shard of 24 PNGs: every pass reads every tar
            assert held == 0 and len(reads) >= 4


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _txt_offset(tar_path: Path) -> int:
    """Where the first caption (a txt member's data) lies in a tar."""
    with tarfile.open(tar_path) as tar:
        return next(m.offset_data for m in tar.getmembers() if m.name.endswith(".txt"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_shard_fails_its_sha256_check_naming_it(tmp_path: Path, workers: int) -> None:
    shards = write_shards(tmp_path / "images", [8, 8])
    _flip_byte(tmp_path / "images" / "shard-000001.tar", _txt_offset(
        tmp_path / "images" / "shard-000001.tar"))
    cfg = _config(shuffle_buffer=4)
    loader = create_loader(_dataset(shards, cfg, 0, 1), num_workers=workers, pin_memory=False)
    with pytest.raises(ShardError) as info:
        list(iterate(loader))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'images' / 'shard-000001.tar'}: sha256 ")
    assert "does not match" in message and "--no-verify" in message
    assert "\n" not in message and "Traceback" not in message  # the worker's own one line
    # unverified, the flipped caption byte goes unnoticed: every batch is made
    unverified = _config(shuffle_buffer=4, verify_shards=False)
    batches = list(iterate(create_loader(_dataset(shards, unverified, 0, 1),
                                         num_workers=workers, pin_memory=False)))
    assert [b.index for b in batches] == [0, 1]


def test_verification_needs_a_sha256_in_each_json(tmp_path: Path) -> None:
    write_shards(tmp_path / "images", [8])
    doc_path = tmp_path / "images" / "shard-000000.json"
    doc = json.loads(doc_path.read_text())
    del doc["sha256"]
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"shard-000000\.json: field sha256: got None, "
                                         r"expected the tar's sha256 as 64 hex digits"):
        discover([str(tmp_path / "images")])
    assert discover([str(tmp_path / "images")], verify=False)[0].sha256 is None


def _break_samples(tar_path: Path, keys: list[str]) -> None:
    """Drop the image member of the samples ``keys`` (their txt and json stay)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with open(tar_path, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                 format=tarfile.USTAR_FORMAT) as out:
        for info, data in members:
            if info.name.rsplit(".", 1)[0] in keys and info.name.endswith(".png"):
                continue
            out.addfile(info, io.BytesIO(data))


def test_skipped_samples_are_logged_by_key_and_counted(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    broken = [sample_key(1, 0), sample_key(5, 2)]
    write_shards(tmp_path / "images", [8], m=3)
    _break_samples(tmp_path / "images" / "shard-000000.tar", broken)
    shards = discover([str(tmp_path / "images")], verify=False)
    cfg = _config(captions_per_batch=4, verify_shards=False)
    with caplog.at_level("WARNING", logger="stablerep.data.shards"):
        batches = list(_dataset(shards, cfg, 0, 1))
    assert batches[-1].bad_samples == 2
    for key in broken:
        assert any(repr(key) in r.getMessage() and "no image member" in r.getMessage()
                   for r in caplog.records), key


def test_a_caption_whose_images_cannot_be_decoded_names_its_shard(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    with open(folder / "shard-000000.tar", "wb") as f:
        writer = TarShardWriter(f)
        for cid in range(4):
            for j in range(2):
                image = b"not an image" if cid == 2 else _png(np.random.default_rng(cid))
                writer.write(sample_key(cid, j), sample_members(image, "png", f"c{cid}", {}))
        writer.close()
    (folder / "shard-000000.json").write_text(json.dumps({
        "tar": "shard-000000.tar", "num_captions": 4, "num_samples": 8,
        "images_per_caption": 2}))
    shards = discover([str(folder)], verify=False)
    cfg = _config(captions_per_batch=4, verify_shards=False, num_workers=0)
    with pytest.raises(InputError) as info:
        list(_dataset(shards, cfg, 0, 1))
    assert str(info.value) == (
        f"{folder / 'shard-000000.tar'}: caption 2: none of its 2 images can be decoded "
        "(samples 000000000002_000, 000000000002_001)")


class _Failing(IterableDataset):
    def __iter__(self):
        raise InputError("gs://bucket/images/shard-000007.tar: not a readable tar shard")


def test_a_foreign_dataset_worker_error_is_dataloaders_own() -> None:
    """Only CaptionBatches sends its errors as items; others keep DataLoader's re-raise."""
    loader = DataLoader(_Failing(), batch_size=None, num_workers=1,
                        multiprocessing_context="fork")
    with pytest.raises(InputError, match="Caught InputError in DataLoader worker"):
        list(iterate(loader))


def test_a_remote_shard_is_verified_then_read_from_its_spool(tmp_path: Path) -> None:
    """memory:// stands for object storage: the tar is hashed while spooled, then parsed."""
    from stablerep import storage
    from stablerep.data.shards import iter_caption_groups

    write_shards(tmp_path / "images", [4])
    folder = f"memory://verify-{tmp_path.name}/images"
    for name in ("shard-000000.tar", "shard-000000.json"):
        storage.write_bytes(f"{folder}/{name}", (tmp_path / "images" / name).read_bytes())
    (ref,) = discover([folder])
    groups = list(iter_caption_groups(ref.uri, sha256=ref.sha256))
    assert [g.caption_id for g in groups] == [0, 1, 2, 3]
    assert groups[0].keys == [sample_key(0, j) for j in range(3)] and groups[0].shard == ref.uri
    data = bytearray((tmp_path / "images" / "shard-000000.tar").read_bytes())
    data[-1] ^= 0x01  # the tar's zero padding: parsing alone would not notice
    storage.write_bytes(ref.uri, bytes(data))
    with pytest.raises(ShardError, match=rf"^{ref.uri}: sha256 [0-9a-f]{{16}}\.\.\. does not "
                                         rf"match {ref.sha256[:16]}\.\.\. recorded in its json"):
        list(iter_caption_groups(ref.uri, sha256=ref.sha256))
    assert len(list(iter_caption_groups(ref.uri))) == 4  # unverified: read as it is
