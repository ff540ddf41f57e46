"""The training data stream: shards -> caption groups -> (n captions x k images) batches.

Work is split into ``world_size * num_workers`` *streams*. Stream s reads the shards whose
position (in an order shuffled per epoch) is s modulo the stream count, or — when there are
fewer shards than streams — every shard keeping every caption whose position is s modulo the
count; either way no caption is read twice in a pass. Each stream shuffles captions in a buffer
(emptied at the end of each pass, so a pass yields each of its captions once before any comes
again) and makes whole micro-batches; stream ``o`` of a rank makes the rank's micro-batches
``b = o, o + W, o + 2W ...`` (W = workers), which is the order a DataLoader reads its workers
in. A stream that runs out wraps around with a new shard order, so every rank yields exactly
``steps`` micro-batches per epoch and no rank waits for another.

Everything random is seeded from (seed, epoch, rank, stream) or (seed, epoch, rank, batch), so
the batches depend on those alone. That makes resuming exact: the *data position* is (epoch,
micro-batches done), and on restart each worker replays the stream it must continue, skipping
the batches already used without decoding their images. The shuffle depends on caption counts
alone, so a dry run over the shards' recorded counts tells which shards were wholly used
before the resume point: those are skipped by count, without reading them (verified shards
only, whose counts the read checks).

Workers send uint8 images (decoded, cropped, flipped: 1/4 of float32's bytes in shared memory
and pinned buffers) and each batch's ``seed``; the trainer converts, colour-augments and
normalises the batch on its device (:class:`stablerep.data.augment.BatchAugment`) with
per-sample parameters drawn from that seed, so augmentations are as reproducible as crops.
The workers persist across epochs; the epoch and skip they read live in shared memory.

A user error met in a DataLoader worker (a corrupt shard, too few images ...) travels to the
main process as a :class:`WorkerFailure` item holding the exception itself, which
:func:`iterate` raises there: its type and one-line message arrive unchanged.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stablerep.config import TrainConfig
from stablerep.data.augment import create_train_transform, seeded
from stablerep.data.shards import CaptionGroup, ShardRef, ShardStats, iter_caption_groups
from stablerep.errors import ConfigError, InputError, StablerepError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch of one rank, caption-major."""

    images: torch.Tensor  # (n * c, 3, H, W) uint8; rows of caption i are [i*c, (i+1)*c)
    labels: torch.Tensor  # (n * c,) local caption index 0..n-1
    texts: list[str]  # (n,) captions
    caption_ids: torch.Tensor  # (n,)
    index: int  # micro-batch index within the epoch
    bad_samples: int = 0  # unusable samples/images skipped so far this epoch by this stream
    stream: int = 0  # the stream (of this rank) that made it; bad_samples is its own total
    seed: int = 0  # seed of the batched (on-device) augmentation of these images

    def pin_memory(self) -> Batch:
        self.images = self.images.pin_memory()
        return self


@dataclass
class WorkerFailure:
    """A user error raised in a loader worker, sent to the main process as a data item."""

    error: StablerepError

    def pin_memory(self) -> WorkerFailure:
        return self


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class Layout:
    """How a global batch is cut: ranks x micro-batches x captions."""

    captions_per_micro_batch: int  # per rank
    micro_batches_per_epoch: int  # per rank
    crops_per_caption: int  # rows per caption

    @classmethod
    def create(cls, cfg: TrainConfig, shards: list[ShardRef], world_size: int) -> Layout:
        per_rank, rest = divmod(cfg.captions_per_batch, world_size * cfg.grad_accum_steps)
        if rest or per_rank == 0:
            raise ConfigError(
                f"train.captions_per_batch: {cfg.captions_per_batch} captions do not split "
                f"evenly over {world_size} ranks x {cfg.grad_accum_steps} accumulation steps")
        total = sum(s.num_captions for s in shards)
        steps = total // cfg.captions_per_batch
        if steps == 0:
            raise InputError(f"the images hold {total} captions, fewer than one batch "
                             f"(train.captions_per_batch={cfg.captions_per_batch})")
        return cls(per_rank, steps * cfg.grad_accum_steps, cfg.crops_per_caption)


class CaptionBatches(IterableDataset):
    """Micro-batches of one rank for one epoch (call :meth:`set_epoch` before iterating)."""

    def __init__(self, shards: list[ShardRef], cfg: TrainConfig, layout: Layout, *,
                 rank: int, world_size: int):
        super().__init__()
        self.shards, self.cfg, self.layout = shards, cfg, layout
        self.rank, self.world_size = rank, world_size
        # (epoch, skip) in shared memory: persistent workers forked earlier see set_epoch
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._cache: dict[str, list[CaptionGroup]] = {}  # shard URI -> its groups (cache_mb)
        self._cache_full = False
        self.transform = create_train_transform(cfg.augmentation, cfg.image_size,
                                                downsample_prob=cfg.downsample_prob)

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._position[0] = value

    @property
    def skip(self) -> int:
        return int(self._position[1])

    @skip.setter
    def skip(self, value: int) -> None:
        self._position[1] = value

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and how many micro-batches of it were already used."""
        self.epoch, self.skip = epoch, skip
        self._fill_cache()

    # -- streams ------------------------------------------------------------------------
    def _pass(self, stream: int, num_streams: int, wrap: int, stats: list[ShardStats],
              skip: frozenset = frozenset(), done: dict | None = None
              ) -> Iterator[CaptionGroup]:
        """One pass of this stream over its captions (the shard order depends on ``wrap``).

        Each read of a shard appends its :class:`ShardStats` to ``stats``; when every stream
        reads every shard (fewer shards than streams) only stream 0 counts and logs what the
        shards skip, so a sum over streams counts each skipped sample once. A shard in
        ``skip`` (keys ``(wrap, index)``) is not read: its recorded caption count of
        placeholders stands in for it. With ``done`` (a dry run, see :meth:`_skippable`)
        nothing is read: the items are ``(wrap, index)`` keys, and ``done[key]`` is set to how
        many this stream kept once a shard is passed.
        """
        cfg, n_shards = self.cfg, len(self.shards)
        order = np.random.default_rng(_seed(cfg.seed, self.epoch, wrap, 7)).permutation(n_shards)
        by_shard = n_shards >= num_streams
        mine = order[stream::num_streams] if by_shard else order
        reports = by_shard or stream == 0
        position = 0
        for i in mine:
            ref, key = self.shards[i], (wrap, int(i))
            if done is not None or key in skip:
                item = key if done is not None else CaptionGroup(-1, "", shard=ref.uri)
                groups: Iterator = iter([item] * ref.num_captions)
            else:
                groups = self._read(ref, stats, reports)
            kept = 0
            for group in groups:
                position += 1
                if not by_shard and (position - 1) % num_streams != stream:
                    continue
                kept += 1
                yield group
            if done is not None:
                done[key] = kept

    def _skippable(self, stream: int, num_streams: int, first: int, step: int) -> frozenset:
        """The shards (``(wrap, index)``) whose captions all went to batches before the resume
        point: a dry run of the stream over recorded caption counts, reading nothing.

        Exact when each shard holds the captions its record says, which reading a verified
        shard checks; without ``train.verify_shards`` every shard is read as before.
        """
        if not self.skip or not self.cfg.verify_shards:
            return frozenset()
        done: dict = {}
        keys = self._shuffled(stream, num_streams, done=done)
        taken: dict = {}
        for _ in range(first, min(self.skip, self.layout.micro_batches_per_epoch), step):
            for _ in range(self.layout.captions_per_micro_batch):
                key = next(keys)
                taken[key] = taken.get(key, 0) + 1
        return frozenset(k for k, kept in done.items() if taken.get(k, 0) == kept)

    def _read(self, ref: ShardRef, stats: list[ShardStats], reports: bool
              ) -> Iterator[CaptionGroup]:
        """One shard's caption groups, from the memory cache when it holds the shard."""
        if ref.uri in self._cache:
            yield from self._cache[ref.uri]
            return
        st = ShardStats(ref.uri)
        if reports:
            stats.append(st)
        verify = self.cfg.verify_shards
        yield from iter_caption_groups(ref.uri, max_errors=self.cfg.max_sample_errors,
                                       stats=st, sha256=ref.sha256 if verify else None,
                                       log_skips=reports, record=ref.record,
                                       expect=(ref.num_samples, ref.num_captions)
                                       if verify else None)

    def _fill_cache(self) -> None:
        """Read shards into memory while they fit in ``train.cache_mb`` (once, in the main
        process, so forked data workers share them); later passes skip those tars."""
        budget = self.cfg.cache_mb * 2**20
        if budget <= 0 or self._cache_full:
            return
        used = 0
        for ref in self.shards:
            groups = list(self._read(ref, [], True))
            used += sum(len(b) for g in groups for b in g.images)
            if used > budget:
                break
            self._cache[ref.uri] = groups
        self._cache_full = True
        log.info("data: %d of %d shards held in memory (train.cache_mb=%g)", len(self._cache),
                 len(self.shards), self.cfg.cache_mb)

    def _shuffled(self, stream: int, num_streams: int, skip: frozenset = frozenset(),
                  done: dict | None = None) -> Iterator[CaptionGroup]:
        """This stream's captions, shuffled within each pass, endlessly (passes wrap around).

        ``skip`` and ``done`` go to :meth:`_pass`; the shuffle depends on counts alone, so a
        dry run (``done``) moves its keys exactly as the real run moves captions.
        """
        rng = np.random.default_rng(_seed(self.cfg.seed, self.epoch, stream, 11))
        stats: list[ShardStats] = []
        if done is None:
            self.shard_stats = stats  # what this stream skipped in the shards (_make_batch)
        for wrap in range(1 << 30):
            buffer: list[CaptionGroup] = []
            yielded = 0
            for group in self._pass(stream, num_streams, wrap, stats, skip, done):
                yielded += 1
                if len(buffer) < self.cfg.shuffle_buffer:
                    buffer.append(group)
                    continue
                i = int(rng.integers(len(buffer)))
                buffer[i], group = group, buffer[i]
                yield group
            if yielded == 0:
                raise InputError(f"data stream {stream} of {num_streams} got no caption from "
                                 f"{len(self.shards)} shards")
            for i in rng.permutation(len(buffer)):  # the rest of this pass, in random order
                yield buffer[int(i)]

    # -- batches ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        info = get_worker_info()
        try:
            yield from self._batches(*((info.id, info.num_workers) if info else (0, 1)))
        except StablerepError as e:
            if info is None:
                raise
            yield WorkerFailure(e)  # raised again, as it is, by iterate() in the main process

    def _batches(self, worker: int, workers: int) -> Iterator[Batch]:
        layout = self.layout
        # Worker `worker` continues original stream o: it makes batches skip + worker + i*W.
        first = self.skip + worker
        if first >= layout.micro_batches_per_epoch:
            return
        original = first % workers
        stream = self.rank * workers + original
        num_streams = self.world_size * workers
        skip = self._skippable(stream, num_streams, original, workers)
        groups = self._shuffled(stream, num_streams, skip)
        self.decode_bad_samples = 0
        need = self.cfg.images_read_per_caption
        for b in range(original, layout.micro_batches_per_epoch, workers):
            chosen = self._take(groups, need if b >= self.skip else 0)
            if b < self.skip:
                continue  # used before the restart: shards wholly before it are not read
            batch = self._make_batch(b, chosen)
            batch.stream = original
            yield batch

    def _take(self, groups: Iterator[CaptionGroup], need: int) -> list[CaptionGroup]:
        chosen = []
        while len(chosen) < self.layout.captions_per_micro_batch:
            group = next(groups)
            if len(group.images) < need:
                raise InputError(
                    f"{group.shard}: caption {group.caption_id} has {len(group.images)} stored "
                    f"images, fewer than the {need} per caption train.images_per_caption asks "
                    "for; generate more images per caption or lower images_per_caption")
            chosen.append(group)
        return chosen

    def _make_batch(self, b: int, groups: list[CaptionGroup]) -> Batch:
        cfg, c = self.cfg, self.layout.crops_per_caption
        batch_seed = _seed(cfg.seed, self.epoch, self.rank, b, 13)
        rng = np.random.default_rng(batch_seed)

        def build() -> torch.Tensor:
            rows = []
            for group in groups:
                picks = rng.choice(len(group.images), cfg.images_read_per_caption,
                                   replace=False)
                images = [self._decode(group, int(j)) for j in picks]
                if cfg.method == "simclr":
                    images = images * 2  # two crops of the one image
                rows += [self.transform(im) for im in images]
            return torch.stack(rows)  # (n * c, 3, H, W) uint8

        images = seeded(batch_seed, build)
        n = len(groups)
        return Batch(images=images, labels=torch.arange(n).repeat_interleave(c),
                     texts=[g.caption for g in groups],
                     caption_ids=torch.tensor([g.caption_id for g in groups]), index=b,
                     bad_samples=sum(s.bad_samples for s in self.shard_stats)
                     + self.decode_bad_samples, seed=_seed(cfg.seed, self.epoch, self.rank, b, 17))

    def _decode(self, group: CaptionGroup, j: int) -> Image.Image:
        """Image ``j`` of the caption; a corrupt one is counted, logged, and the next one used."""
        count = len(group.images)
        for attempt in range(count):
            i = (j + attempt) % count
            try:
                with Image.open(io.BytesIO(group.images[i])) as im:
                    return im.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as e:
                self.decode_bad_samples += 1
                log.warning("%s: skipped sample %r: its image cannot be decoded (%s); using "
                            "another image of caption %d", group.shard, group.keys[i],
                            type(e).__name__, group.caption_id)
        raise InputError(f"{group.shard}: caption {group.caption_id}: none of its {count} "
                         f"images can be decoded (samples {', '.join(group.keys)})")


def iterate(loader: DataLoader) -> Iterator[Batch]:
    """Iterate ``loader``; a user error raised in a worker is raised here as it was.

    :class:`CaptionBatches` sends such an error as a :class:`WorkerFailure` item (not as
    DataLoader's re-raised copy, whose message is the worker's traceback), so the CLI prints
    its own one-line message.
    """
    for item in loader:
        if isinstance(item, WorkerFailure):
            raise item.error
        yield item


def create_loader(dataset: CaptionBatches, *, num_workers: int, pin_memory: bool
                  ) -> DataLoader:
    """A DataLoader reading whole micro-batches from ``dataset``'s workers in order.

    Workers persist across epochs: iterate the same loader again after
    :meth:`CaptionBatches.set_epoch` (its shared position reaches the running workers).
    """
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers else None,
                      multiprocessing_context="fork" if num_workers else None)
