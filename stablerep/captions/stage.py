"""The caption stage: source -> clean -> dedupe -> sample N -> K Parquet parts + manifest.

Output (the captions contract of docs/ARCHITECTURE.md), under ``out``::

    part-000000.parquet ...   caption_id int64 (0..N-1, stable), caption string, source string
    config.yaml               the resolved CaptionsConfig
    manifest.json             written last: counts, shard ranges, sha256s, source, summary

A folder holds captions only when its ``manifest.json`` exists. Parts are published one by
one, each atomically; every check that can fail on user input runs before the first write, so
bad input leaves nothing under ``out``. Rerunning with the same config finds the manifest and
does nothing; another config needs ``overwrite``.

Spill files live in a temporary folder under ``work_dir`` that is removed on every way out:
success, an error, Ctrl-C, and SIGTERM (while the stage runs in the main thread, SIGTERM
raises ``SystemExit(143)`` so the cleanup runs; the previous handler is restored after).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stablerep import __version__, storage
from stablerep.captions import procedural, sources
from stablerep.captions.clean import DROP_REASONS, clean
from stablerep.captions.procedural import procedural_rows
from stablerep.captions.sample import BucketSampler
from stablerep.captions.synthetic import check_capacity, synthetic_rows
from stablerep.config import CaptionsConfig, dump_yaml, fingerprint, to_dict
from stablerep.contracts import (
    CAPTIONS_MANIFEST as MANIFEST,
)
from stablerep.contracts import (
    PART_SCHEMA,
    STAGE_CONFIG,
    CaptionsManifest,
    ShardInfo,
    load_captions_manifest,
    part_name,
    write_captions_manifest,
)
from stablerep.errors import ConfigError, InputError
from stablerep.progress import Progress

log = logging.getLogger(__name__)

ROW_GROUP = 65536
# Fields that change how the stage runs but never what it writes.
_RUN_ONLY_FIELDS = ("work_dir", "spill_rows", "overwrite", "out")


def output_fingerprint(cfg: CaptionsConfig) -> str:
    """Hash of the fields that decide the output (not work_dir, spill_rows, ...)."""
    data = to_dict(cfg)
    for key in _RUN_ONLY_FIELDS:
        data.pop(key, None)
    if cfg.source != "procedural":  # unused: keeps the hashes made before it existed
        data.pop("procedural", None)
    data["synthetic"]["rewriter"] = "none"  # a removed field at its one value: the same hashes
    return fingerprint(data)


def shard_sizes(total: int, num_shards: int) -> list[int]:
    """Near-equal sizes (differing by at most one) of ``num_shards`` consecutive ranges."""
    base, extra = divmod(total, num_shards)
    return [base + (1 if i < extra else 0) for i in range(num_shards)]


# ---------------------------------------------------------------------------- reading


def _file_rows(cfg: CaptionsConfig) -> tuple[Iterator[tuple[str | None, str]], dict]:
    files = storage.expand(cfg.inputs)
    specs = [sources.resolve(u, fmt=cfg.format, compression=cfg.compression, column=cfg.column)
             for u in files]

    def rows() -> Iterator[tuple[str | None, str]]:
        for spec in specs:
            for raw in sources.read_captions(spec):
                yield raw, spec.uri

    formats = collections.Counter(s.format for s in specs)
    return rows(), {"kind": "files", "inputs": list(cfg.inputs), "files": len(files),
                    "formats": dict(formats), "column": cfg.column}


@dataclass
class _Counts:
    rows_read: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)

    def summary(self, unique: int, sampled: int, duplicates: int) -> dict[str, Any]:
        dropped = {r: self.dropped.get(r, 0) for r in DROP_REASONS}
        dropped["duplicate"] = duplicates
        return {"rows_read": self.rows_read, "dropped": dropped,
                "dropped_total": sum(dropped.values()), "kept": unique, "sampled": sampled}


def _collect(rows, cfg: CaptionsConfig, sampler: BucketSampler, counts: _Counts) -> None:
    with Progress("captions: reading", unit="rows") as progress:
        for raw, label in rows:
            counts.rows_read += 1
            text, reason = clean(raw, min_chars=cfg.min_chars, max_chars=cfg.max_chars)
            if reason:
                counts.dropped[reason] += 1
            else:
                sampler.add(text, label)
            if counts.rows_read % 4096 == 0:
                progress.update(4096)
        progress.update(counts.rows_read % 4096)


def _collect_into_new_sampler(rows, cfg: CaptionsConfig, work: Path
                              ) -> tuple[BucketSampler, _Counts]:
    sampler = BucketSampler(seed=cfg.seed, work_dir=work, spill_rows=cfg.spill_rows,
                            dedupe=cfg.dedupe)
    counts = _Counts()
    _collect(rows, cfg, sampler, counts)
    return sampler, counts


def _gather(cfg: CaptionsConfig, work: Path) -> tuple[BucketSampler, _Counts, dict, str]:
    """Read the source into a sampler: (sampler, counts, source description, source name).

    A synthetic (or procedural) source draws ``num_rows`` candidates when set; otherwise it draws
    ``num_captions * oversample`` and, while duplicates leave fewer than ``num_captions``
    unique captions, draws again from the start with more rows (the stream is a fixed
    sequence under the seed, so the result stays deterministic), up to 64x.
    """
    if cfg.source == "files":
        rows, described = _file_rows(cfg)
        sampler, counts = _collect_into_new_sampler(rows, cfg, work)
        return sampler, counts, described, ", ".join(cfg.inputs)
    assert cfg.num_captions is not None
    syn = cfg.procedural if cfg.source == "procedural" else cfg.synthetic
    draw = procedural_rows if cfg.source == "procedural" else synthetic_rows
    num_rows = syn.num_rows or math.ceil(cfg.num_captions * syn.oversample)
    while True:
        rows, described = draw(syn, num_rows, cfg.seed)  # type: ignore[arg-type]
        sampler, counts = _collect_into_new_sampler(rows, cfg, work)
        unique = sampler.finish()
        if syn.num_rows or unique >= cfg.num_captions or num_rows >= 64 * cfg.num_captions:
            return sampler, counts, described, f"the {cfg.source} source"
        sampler.discard()
        grow = max(1.25, 1.1 * cfg.num_captions / max(unique, 1))
        num_rows = min(math.ceil(num_rows * grow), 64 * cfg.num_captions)
        log.info("captions: %d unique of %d drawn; drawing %d rows", unique, counts.rows_read,
                 num_rows)


def _choose_count(cfg: CaptionsConfig, unique: int, counts: _Counts, what: str) -> int:
    if counts.rows_read == 0:
        raise InputError(f"{what}: the source holds no captions")
    if unique == 0:
        raise InputError(f"{what}: no caption survived cleaning ({_drop_text(counts)})")
    wanted = cfg.num_captions or unique
    if wanted > unique:
        if not cfg.allow_fewer:
            raise InputError(
                f"captions.num_captions: asked for {wanted:,} captions but {what} has only "
                f"{unique:,} after cleaning and dedupe ({counts.rows_read:,} rows read); "
                f"pass --allow-fewer to accept {unique:,}"
            )
        log.warning("asked for %d captions, the source has %d: keeping %d", wanted, unique,
                    unique)
        wanted = unique
    if cfg.num_shards > wanted:
        raise ConfigError(f"captions.num_shards: got {cfg.num_shards} for {wanted} captions; "
                          f"expected at most {wanted} (one caption per shard or more)")
    return wanted


def _drop_text(counts: _Counts) -> str:
    parts = [f"{r} {n:,}" for r, n in sorted(counts.dropped.items()) if n]
    return "dropped: " + (", ".join(parts) if parts else "none")


# ---------------------------------------------------------------------------- writing


def _write_part(uri: str, rows: Iterator[tuple[str, str]], first_id: int, n: int,
                progress: Progress) -> storage.AtomicWrite:
    """Write the next ``n`` rows as one Parquet part (row groups of ROW_GROUP rows)."""
    with storage.atomic_write(uri) as w, \
            pq.ParquetWriter(w.file, PART_SCHEMA, compression="zstd") as writer:
        for offset in range(0, n, ROW_GROUP):
            take = min(ROW_GROUP, n - offset)
            chunk = [next(rows) for _ in range(take)]
            ids = pa.array(range(first_id + offset, first_id + offset + take), pa.int64())
            writer.write_table(pa.table([ids, pa.array([c for c, _ in chunk], pa.string()),
                                         pa.array([s for _, s in chunk], pa.string())],
                                        schema=PART_SCHEMA))
            progress.update(take)
    return w


def _write_parts(out: str, rows: Iterator[tuple[str, str]], sizes: list[int]) -> list[ShardInfo]:
    shards, next_id = [], 0
    with Progress("captions: writing", unit="rows", total=sum(sizes)) as progress:
        for index, n in enumerate(sizes):
            w = _write_part(storage.join(out, part_name(index)), rows, next_id, n, progress)
            shards.append(ShardInfo(index, part_name(index), next_id, n, w.sha256, w.size))
            next_id += n
    return shards


def _check_existing(out: str, cfg: CaptionsConfig, fp: str) -> CaptionsManifest | None:
    manifest_uri = storage.join(out, MANIFEST)
    if not storage.exists(manifest_uri):
        return None
    current = load_captions_manifest(out)
    if current.config_fingerprint == fp:
        return current
    if not cfg.overwrite:
        raise InputError(f"{out}: already holds captions made with another config "
                         f"(fingerprint {current.config_fingerprint}, now {fp}); pass "
                         "--overwrite to replace them, or choose another --out")
    return None


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` (once) so ``finally`` blocks run.

    Outside the main thread (where Python cannot set handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame) -> None:
        nonlocal fired
        if fired:  # a second SIGTERM must not interrupt the cleanup the first one started
            return
        fired = True
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def make_captions(cfg: CaptionsConfig, out: str) -> CaptionsManifest:
    """Run the caption stage and publish the captions folder at ``out``.

    Args:
        cfg: the validated stage config.
        out: the output folder URI.

    Returns:
        The manifest of the published (or already present, identical) captions.

    Raises:
        InputError / ConfigError: bad input; nothing is written under ``out``.
        SystemExit: SIGTERM arrived (exit status 143); the spill files are removed.
    """
    with sigterm_exits():
        return _make_captions(cfg, out)


def _make_captions(cfg: CaptionsConfig, out: str) -> CaptionsManifest:
    if cfg.source == "synthetic":
        assert cfg.num_captions is not None  # the config requires it for this source
        check_capacity(cfg.synthetic, cfg.num_captions)
    elif cfg.source == "procedural":
        assert cfg.num_captions is not None
        procedural.check_capacity(cfg.procedural, cfg.num_captions)
    fp = output_fingerprint(cfg)
    existing = _check_existing(out, cfg, fp)
    if existing is not None:
        log.info("captions: %s already holds this config's captions; nothing to do", out)
        return existing
    if cfg.work_dir:
        Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stablerep-captions-",
                                     dir=cfg.work_dir or None) as work:
        start = time.perf_counter()
        sampler, counts, described, what = _gather(cfg, Path(work))
        unique = sampler.finish() if not sampler.finished else sampler.unique
        wanted = _choose_count(cfg, unique, counts, what)
        sizes = shard_sizes(wanted, cfg.num_shards)
        # Every user-input check has passed: publish.
        if storage.exists(storage.join(out, MANIFEST)):
            storage.remove(storage.join(out, MANIFEST))  # readers must not see a mix
        shards = _write_parts(out, iter(sampler), sizes)
        elapsed = time.perf_counter() - start
    _remove_stale_parts(out, len(shards))
    summary = counts.summary(unique, wanted, sampler.duplicates)
    summary["shards"] = len(shards)
    manifest = CaptionsManifest(
        uri=out.rstrip("/"), count=wanted, shards=shards, seed=cfg.seed, source=described,
        summary=summary, config_fingerprint=fp,
        extra={"stablerep_version": __version__, "columns": PART_SCHEMA.names},
    )
    storage.write_text(storage.join(out, STAGE_CONFIG), dump_yaml(cfg))
    write_captions_manifest(manifest)
    manifest.extra["elapsed_s"] = elapsed  # reported, not stored: the manifest stays stable
    manifest.extra["rows_per_s"] = counts.rows_read / max(elapsed, 1e-9)
    return manifest


def _remove_stale_parts(out: str, num_shards: int) -> None:
    if not storage.exists(out):
        return
    for uri in storage.list_dir(out):
        base = storage.name(uri)
        if base.startswith("part-") and base.endswith(".parquet"):
            index = int(base[5:11]) if base[5:11].isdigit() else -1
            if index >= num_shards:
                storage.remove(uri)


def format_summary(manifest: CaptionsManifest) -> str:
    """A short human-readable summary of a captions run."""
    s = manifest.summary
    dropped = ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items() if v) or "none"
    lines = [
        f"rows read   {s['rows_read']:,}",
        f"dropped     {s['dropped_total']:,} ({dropped})",
        f"kept        {s['kept']:,} unique",
        f"sampled     {manifest.count:,} captions in {manifest.num_shards} shards",
    ]
    if "rows_per_s" in manifest.extra:
        lines.append(f"rate        {manifest.extra['rows_per_s']:,.0f} rows/s "
                     f"({manifest.extra['elapsed_s']:.2f}s)")
    lines.append(f"output      {storage.join(manifest.uri, MANIFEST)}")
    return "\n".join(lines)
