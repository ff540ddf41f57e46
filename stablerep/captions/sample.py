"""Deterministic dedupe + sampling of N captions from a stream of any size, in bounded memory.

Every kept caption gets a 64-bit key: a keyed hash (BLAKE2b, keyed by the seed) of its
normalised text. The sample of N is the N captions with the smallest keys, which is a uniform
random sample that depends only on the seed and the *set* of captions, not on their order,
on how the input is split into files, or on the number of output shards; growing N keeps the
first captions. Duplicates share a key, so dedupe happens where the sort puts them together.

To stay in bounded memory, rows go to one of 256 buckets by the key's top byte; when more
than ``spill_rows`` rows are buffered, buckets are spilled to Arrow IPC files in a local work
folder. Buckets are then deduped and sorted one at a time (memory: one bucket) and read back
in key order. A small input never touches the disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from stablerep.captions.clean import normalise

NUM_BUCKETS = 256
SCHEMA = pa.schema([("key", pa.uint64()), ("caption", pa.string()), ("source", pa.string())])


def caption_key(text: str, seed: int) -> int:
    """The 64-bit sampling key of a caption (depends on its normalised text and the seed)."""
    salt = seed.to_bytes(16, "little", signed=True)
    digest = hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "big")


@dataclass
class BucketSampler:
    """Collects (caption, source) rows, then yields them deduped in key order."""

    seed: int
    work_dir: Path
    spill_rows: int = 500_000
    dedupe: bool = True
    duplicates: int = 0  # rows dropped as duplicates (known after finish())
    spilled_files: int = 0
    peak_rows_in_memory: int = 0
    _buffers: list[list[tuple[int, str, str]]] = field(default_factory=list)
    _buffered: int = 0
    _spills: list[tuple[Path, list[int]]] = field(default_factory=list)  # (file, offsets)
    _results: list[pa.Table] = field(default_factory=list)  # in memory when nothing spilled
    _runs: Path | None = None  # deduped buckets, one record batch each, when spilled
    finished: bool = False
    unique: int = 0

    def __post_init__(self) -> None:
        self._buffers = [[] for _ in range(NUM_BUCKETS)]

    def add(self, caption: str, source: str) -> None:
        """Add one cleaned caption."""
        key = caption_key(caption, self.seed)
        self._buffers[key >> 56].append((key, caption, source))
        self._buffered += 1
        if self._buffered >= self.spill_rows:
            self._spill()

    def _spill(self) -> None:
        """Write all buffered rows to one Arrow file, grouped by bucket, with offsets."""
        self.peak_rows_in_memory = max(self.peak_rows_in_memory, self._buffered)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        offsets, rows = [0], []
        for bucket in self._buffers:
            rows.extend(bucket)
            offsets.append(len(rows))
        path = self.work_dir / f"spill-{len(self._spills):05d}.arrow"
        feather.write_feather(_table(rows), path, compression="uncompressed")
        self._spills.append((path, offsets))
        self.spilled_files += 1
        self._buffers = [[] for _ in range(NUM_BUCKETS)]
        self._buffered = 0

    def finish(self) -> int:
        """Dedupe and sort every bucket; returns the number of unique captions."""
        self.peak_rows_in_memory = max(self.peak_rows_in_memory, self._buffered)
        spilled = [(feather.read_table(p, memory_map=True), off) for p, off in self._spills]
        writer = None
        if spilled:
            self._runs = self.work_dir / "runs.arrow"
            writer = pa.ipc.new_file(str(self._runs), SCHEMA)
        for b in range(NUM_BUCKETS):
            parts = [t.slice(off[b], off[b + 1] - off[b]) for t, off in spilled]
            if self._buffers[b]:
                parts.append(_table(self._buffers[b]))
                self._buffers[b] = []
            table = self._sort_dedupe(pa.concat_tables(parts)) if parts else _table([])
            self.unique += table.num_rows
            if writer is None:
                self._results.append(table)
            else:
                writer.write_table(table)  # one (possibly empty) batch per bucket
        if writer is not None:
            writer.close()
        del spilled
        for path, _ in self._spills:
            path.unlink()
        self._spills = []
        self.finished = True
        return self.unique

    def discard(self) -> None:
        """Forget everything (and delete work files) so the work folder can be reused."""
        for path, _ in self._spills:
            path.unlink(missing_ok=True)
        if self._runs is not None:
            self._runs.unlink(missing_ok=True)
        self._spills, self._results, self._runs = [], [], None
        self._buffers, self._buffered = [[] for _ in range(NUM_BUCKETS)], 0

    def _sort_dedupe(self, table: pa.Table) -> pa.Table:
        # Ties in key order are broken by text, then source: the result depends on the set of
        # rows only. Among duplicates the first in that order is kept.
        table = table.sort_by([("key", "ascending"), ("caption", "ascending"),
                               ("source", "ascending")])
        if not self.dedupe or table.num_rows < 2:
            return table
        keys = table.column("key").to_numpy()  # (n,)
        same_key = np.flatnonzero(keys[1:] == keys[:-1]) + 1  # rows whose key repeats
        if same_key.size == 0:
            return table
        captions = table.column("caption")
        drop = np.zeros(table.num_rows, dtype=bool)
        group_key, seen = None, set()
        for i in same_key:
            if keys[i] != group_key:  # a new run of equal keys starts at row i - 1
                group_key, seen = keys[i], {normalise(captions[i - 1].as_py())}
            text = normalise(captions[i].as_py())
            drop[i] = text in seen
            seen.add(text)
        self.duplicates += int(drop.sum())
        return table.filter(pa.array(~drop))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(caption, source) in key order; call :meth:`finish` first."""
        if self._runs is None:
            tables = self._results
        else:
            reader = pa.ipc.open_file(pa.memory_map(str(self._runs)))
            tables = (pa.Table.from_batches([reader.get_batch(i)])
                      for i in range(reader.num_record_batches))
        for table in tables:
            for batch in table.select(["caption", "source"]).to_batches(max_chunksize=65536):
                yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                               strict=True)


def _table(rows: list[tuple[int, str, str]]) -> pa.Table:
    if not rows:
        return SCHEMA.empty_table()
    keys, captions, sources = zip(*rows, strict=True)
    return pa.table([pa.array(keys, pa.uint64()), pa.array(captions, pa.string()),
                     pa.array(sources, pa.string())], schema=SCHEMA)
