"""The sharded generation runner: captions shard i -> ``images/shard-{i:06d}.tar`` + ``.json``.

For each selected shard of a captions manifest the runner draws m images per caption in
batches of ``batch_size`` images (captions x images, flattened), encodes and resizes them on a
thread pool while the next batch denoises, writes complete captions in order into a staged tar,
and publishes the tar and then its json on a background thread while the next shard starts.

Resume: a shard whose json exists (made with the same config) is skipped, so a restarted pod
or Job picks up where it stopped; a killed writer leaves nothing under a final name. What is
drawn is a function of the config's output fields (per-image seeds); its bytes also depend on
the run settings each shard json records under ``runtime`` (batch sizes, device, dtype,
compile, channels_last, torch and diffusers versions): redone work is byte-identical when
those match and pixel-close otherwise.

Staging: a shard's tar is staged beside its final name under a name unique per writer (host,
pid, random token) and touched every minute; before drawing a shard, staged files of that shard
are removed only when their writer is provably dead (:func:`staged_is_dead`), so a replacement
pod on a shared volume never deletes the file of a pod that is still shutting down.

Robustness: a CUDA out-of-memory halves the batch and goes on; a batch that fails otherwise is
retried image by image, and a caption whose images cannot be drawn is left out of the shard
and recorded in its json (``failed``).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stablerep import storage
from stablerep.config import GenerateConfig, dump_yaml, fingerprint, to_dict
from stablerep.contracts import (
    IMAGES_MANIFEST,
    SHARD_JSON_KIND,
    STAGE_CONFIG,
    CaptionsManifest,
    TarShardWriter,
    load_captions_manifest,
    read_images_manifest,
    read_shard_record,
    sample_key,
    sample_members,
    sample_record,
    shard_json_name,
    shard_stem,
    shard_tar_name,
    write_images_manifest,
    write_shard_record,
)
from stablerep.errors import ConfigError, InputError, StablerepError
from stablerep.generation.backends import create_backend
from stablerep.generation.shards import encode_image, image_seed, stored_dims
from stablerep.generation.work import Backend, WorkItem
from stablerep.progress import Progress

log = logging.getLogger(__name__)

# Fields that change how generation runs, never what it writes.
_RUN_ONLY_FIELDS = ("captions", "out", "batch_size", "shard", "all_shards", "shard_from_env",
                    "device", "compile", "channels_last", "encode_workers", "max_failures",
                    "tiny_cache", "overwrite", "model_store")


class GenerationError(StablerepError):
    """A shard could not be generated (too many failed captions)."""


def output_fingerprint(cfg: GenerateConfig, captions: CaptionsManifest) -> str:
    """Hash of everything that decides the images: settings and the captions themselves."""
    data = to_dict(cfg)
    for key in _RUN_ONLY_FIELDS:
        data.pop(key, None)
    data["captions_fingerprint"] = captions.config_fingerprint
    data["captions_sha256"] = [s.sha256 for s in captions.shards]
    return fingerprint(data)


def check_workers(worker: int, workers: int, num_shards: int) -> None:
    """A worker partition that gives every worker at least one shard.

    Raises:
        ConfigError: naming ``workers`` (< 1 or more than the shards) or ``worker``.
    """
    if not 1 <= workers <= num_shards:
        raise ConfigError(f"parameter workers: got {workers}, expected 1..{num_shards} (the "
                          f"captions have {num_shards} shards; each worker takes at least one)")
    if not 0 <= worker < workers:
        raise ConfigError(f"worker: got {worker}, expected 0..{workers - 1}")


def worker_shards(worker: int, workers: int, num_shards: int) -> list[int]:
    """The shards of generation worker ``worker`` of ``workers``: i with i % workers == worker."""
    check_workers(worker, workers, num_shards)
    return list(range(worker, num_shards, workers))


def select_shards(cfg: GenerateConfig, num_shards: int) -> list[int]:
    """The shard indices this process handles (all when no mode is chosen)."""
    if cfg.shard_from_env:
        raw = os.environ.get("JOB_COMPLETION_INDEX")
        if raw is None or not raw.strip().isdigit():
            raise ConfigError(f"generate.shard_from_env: JOB_COMPLETION_INDEX is {raw!r}, "
                              "expected a shard index (set by a Kubernetes Indexed Job)")
        index = int(raw)
    elif cfg.shard is not None:
        index = cfg.shard
    else:
        return list(range(num_shards))
    if not 0 <= index < num_shards:
        raise ConfigError(f"generate.shard: got {index}, expected 0..{num_shards - 1} (the "
                          f"captions have {num_shards} shards)")
    return [index]


@dataclass
class ShardResult:
    """What happened to one shard."""

    index: int
    skipped: bool = False
    samples: int = 0
    captions: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom)


STALE_STAGED_S = 2 * 3600
"""A staged file untouched this long is dead whoever wrote it (live writers touch theirs
every :data:`HEARTBEAT_S`)."""
HEARTBEAT_S = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def staged_is_dead(path: Path, final_name: str, *, now: float | None = None) -> bool:
    """Whether the writer of ``path``, staged for ``final_name``, is provably gone.

    Dead means: written on this host by a process that no longer exists, or (from any
    host, or a name that does not say who wrote it) untouched for :data:`STALE_STAGED_S`.
    A writer on another machine that shares the volume is never judged by its pid.
    """
    prefix = f"{storage.TEMP_PREFIX}{final_name}."
    rest = path.name[len(prefix):] if path.name.startswith(prefix) else ""
    owner = storage.parse_staging_owner(rest)
    if owner is not None and owner[0] == socket.gethostname() and owner[1] != os.getpid() \
            and not _pid_alive(owner[1]):
        return True
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False  # published or discarded meanwhile
    return age > STALE_STAGED_S


def remove_stale_staged(folder: str, stem: str) -> list[str]:
    """Delete the staged tar/json files of shard ``stem`` whose writers are provably dead.

    Only local folders stage next to the final name (object stores stage in the writer's own
    temporary folder). Files of live writers -- this process, another process on this host,
    or any host within :data:`STALE_STAGED_S` -- are left alone.

    Returns:
        The names removed.
    """
    if not storage.is_local(folder) or not storage.local_path(folder).is_dir():
        return []
    removed = []
    for final_name in (f"{stem}.tar", f"{stem}.json"):
        pattern = f"{storage.TEMP_PREFIX}{final_name}.*"
        for staged in sorted(storage.local_path(folder).glob(pattern)):
            if staged_is_dead(staged, final_name):
                staged.unlink(missing_ok=True)
                removed.append(staged.name)
                log.info("generate: removed %s, left by a writer that is gone", staged.name)
    return removed


class _Heartbeat:
    """Touches a staged local file every :data:`HEARTBEAT_S` so cleanups see it is alive."""

    def __init__(self, path: Path):
        self.path, self._stop = path, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="staged-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class ShardJob:
    """Draws one shard's images into a staged tar (published later by :meth:`publish`)."""

    def __init__(self, run: GenerationRun, index: int):
        self.run, self.index, self.cfg = run, index, run.cfg
        table = run.tables.pop(index, None)
        if table is None:
            table = run.manifest.read_shard(index)
        self.captions = list(zip(table.column("caption_id").to_pylist(),
                                 table.column("caption").to_pylist(), strict=True))
        m = self.cfg.images_per_caption
        self.items = [WorkItem(cid, text, j, image_seed(self.cfg.seed, cid, j))
                      for cid, text in self.captions for j in range(m)]
        self.slots: dict[int, list[cf.Future | None]] = {cid: [None] * m
                                                          for cid, _ in self.captions}
        self.failed: dict[int, str] = {}
        self.next_write = 0
        self.batch_sizes: set[int] = set()  # sizes of the backend calls that succeeded
        self.result = ShardResult(index)

    def draw(self) -> storage.AtomicWrite:
        # Load the model before staging anything: a bad model is a user error that must fail
        # the run, not a failure of every caption (as it would inside _draw_batch). Loading
        # is not counted in the shard's rate.
        self.run.backend  # noqa: B018
        start = time.perf_counter()
        remove_stale_staged(self.run.out, shard_stem(self.index))
        staged = storage.AtomicWrite(self.run.tar_uri(self.index), storage.DEFAULT_RETRY)
        heartbeat = _Heartbeat(staged.staged_path)
        try:
            self.writer = TarShardWriter(staged.file)
            with Progress(f"generate shard {self.index}", unit="img",
                          total=len(self.items), interval_s=30) as progress:
                pos = 0
                while pos < len(self.items):
                    batch = self.items[pos:pos + self.run.batch_size]
                    done = self._draw_batch(batch)
                    if done is None:
                        continue  # the batch was halved after an out-of-memory error
                    pos += len(batch)
                    progress.update(len(batch))
                    self._flush(block=False)
            self._flush(block=True)
            self.writer.close()
            self.result.seconds = time.perf_counter() - start
            self.result.samples = self.writer.samples
            self.result.captions = len(self.captions) - len(self.failed)
            self.result.failed = [{"caption_id": cid, "caption": dict(self.captions)[cid],
                                   "error": err} for cid, err in sorted(self.failed.items())]
            self._check_failures()  # inside the try: a failed shard leaves no staged file
        except BaseException:
            staged.discard()
            raise
        finally:
            heartbeat.stop()
        return staged

    def _draw_batch(self, batch: list[WorkItem]) -> bool | None:
        try:
            pixels = self.run.backend.generate(batch)
        except Exception as e:  # noqa: BLE001 - OOM and per-item failures handled below
            if _is_oom(e) and self.run.batch_size > 1:
                import torch

                torch.cuda.empty_cache()
                self.run.batch_size = max(1, self.run.batch_size // 2)
                log.warning("out of GPU memory with %d images per batch; going on with %d",
                            len(batch), self.run.batch_size)
                return None
            log.warning("batch of %d images failed (%s: %s); retrying image by image",
                        len(batch), type(e).__name__, e)
            for item in batch:
                if item.caption_id not in self.failed:
                    self._draw_one(item)
            return True
        self._submit(batch, pixels)
        return True

    def _draw_one(self, item: WorkItem) -> None:
        try:
            pixels = self.run.backend.generate([item])
        except Exception as e:  # noqa: BLE001 - recorded as a failed caption
            self._fail(item, e)
            return
        self._submit([item], pixels)

    def _submit(self, batch: list[WorkItem], pixels) -> None:
        self.batch_sizes.add(len(batch))
        for item, image in zip(batch, pixels, strict=True):
            self.slots[item.caption_id][item.j] = self.run.encoder.submit(
                encode_image, image, stored_size=self.cfg.stored_size,
                fmt=self.cfg.image_format, quality=self.cfg.jpeg_quality)

    def _fail(self, item: WorkItem, exc: BaseException) -> None:
        if _is_oom(exc):
            raise GenerationError(f"shard {self.index}: out of GPU memory with a single image "
                                  f"of {self.cfg.height}x{self.cfg.width}") from exc
        message = f"{type(exc).__name__}: {exc}"
        log.error("caption %d failed: %s", item.caption_id, message)
        self.failed[item.caption_id] = message

    def _flush(self, *, block: bool) -> None:
        """Write finished captions, in shard order, to the tar."""
        while self.next_write < len(self.captions):
            cid, text = self.captions[self.next_write]
            if cid not in self.failed:
                slots = self.slots[cid]
                if any(s is None for s in slots):
                    return
                if not block and not all(s.done() for s in slots):
                    return
                for j, future in enumerate(slots):
                    image = future.result()
                    self.writer.write(sample_key(cid, j), sample_members(
                        image, self.cfg.image_format, text, self.run.sample_meta(cid, j, text)))
            del self.slots[cid]
            self.next_write += 1

    def _check_failures(self) -> None:
        n = len(self.failed)
        if n and n == len(self.captions):
            raise GenerationError(f"shard {self.index}: every caption failed; first error: "
                                  f"{self.result.failed[0]['error']}")
        if self.cfg.max_failures >= 0 and n > self.cfg.max_failures:
            raise GenerationError(f"shard {self.index}: {n} captions failed, more than "
                                  f"generate.max_failures={self.cfg.max_failures}; first error: "
                                  f"{self.result.failed[0]['error']}")


class GenerationRun:
    """Shared state of one `stablerep generate` process."""

    def __init__(self, cfg: GenerateConfig, captions_uri: str, out: str,
                 backend_factory: Callable[[GenerateConfig], Backend] = create_backend):
        self.cfg, self.out, self.captions_uri = cfg, out.rstrip("/"), captions_uri
        self.manifest = load_captions_manifest(captions_uri)
        self.fingerprint = output_fingerprint(cfg, self.manifest)
        self.batch_size = cfg.batch_size
        self.tables: dict[int, Any] = {}  # captions parts checked and not drawn yet
        self._backend_factory = backend_factory
        self._backend: Backend | None = None
        self.encoder: cf.ThreadPoolExecutor

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._backend_factory(self.cfg)
        return self._backend

    def tar_uri(self, index: int) -> str:
        return storage.join(self.out, shard_tar_name(index))

    def json_uri(self, index: int) -> str:
        return storage.join(self.out, shard_json_name(index))

    def sample_meta(self, caption_id: int, j: int, caption: str) -> dict[str, Any]:
        """The json member of one sample: generation settings plus img2dataset's fields."""
        cfg = self.cfg
        return sample_record(caption_id, j, caption=caption,
                             seed=image_seed(cfg.seed, caption_id, j),
                             guidance_scale=cfg.guidance_scale, steps=cfg.num_inference_steps,
                             scheduler=cfg.scheduler, model=self.backend.model_id,
                             generated_size=(cfg.width, cfg.height),
                             stored_size=cfg.stored_size,
                             stored_dims=stored_dims(cfg.width, cfg.height, cfg.stored_size))

    def runtime(self, job: ShardJob) -> dict[str, Any]:
        """The run settings that do not change what is drawn but can change its bytes.

        Outputs are byte-identical only when all of these match; otherwise the pixels are
        close (floating-point rounding of batched, compiled or other-device kernels).
        """
        import diffusers
        import torch

        backend = self.backend
        return {"batch_sizes": sorted(job.batch_sizes),
                "device": str(getattr(backend, "device", self.cfg.device)),
                "dtype": str(getattr(backend, "dtype", self.cfg.dtype)),
                "compile": self.cfg.compile, "channels_last": self.cfg.channels_last,
                "torch": torch.__version__, "diffusers": diffusers.__version__}

    def is_done(self, index: int) -> bool:
        """Whether shard ``index`` is finished with this config (error if with another)."""
        uri = self.json_uri(index)
        if not storage.exists(uri):
            return False
        doc = read_shard_record(uri)
        if doc.get("config_fingerprint") == self.fingerprint:
            return True
        if self.cfg.overwrite:
            return False
        raise InputError(f"{uri}: made with another config (fingerprint "
                         f"{doc.get('config_fingerprint')}, now {self.fingerprint}); pass "
                         "--overwrite to replace it, or choose another --out")

    def shard_doc(self, job: ShardJob, staged: storage.AtomicWrite) -> dict[str, Any]:
        r, cfg = job.result, self.cfg
        ids = [cid for cid, _ in job.captions]
        return {
            "kind": SHARD_JSON_KIND, "version": 1, "shard": job.index,
            "num_shards": self.manifest.num_shards, "tar": shard_tar_name(job.index),
            "sha256": staged.sha256, "bytes": staged.size, "num_samples": r.samples,
            "num_captions": r.captions, "images_per_caption": cfg.images_per_caption,
            "caption_ids": [min(ids), max(ids)] if ids else [], "failed": r.failed,
            "config_fingerprint": self.fingerprint, "model": self.backend.model_id,
            "image_format": cfg.image_format, "captions": self.captions_uri,
            "runtime": self.runtime(job),
            "stats": {"seconds": round(r.seconds, 3), "images_per_s": round(r.images_per_s, 3),
                      "batch_size": self.batch_size, **_gpu_memory()},
        }

    def publish(self, job: ShardJob, staged: storage.AtomicWrite) -> None:
        staged.publish()  # the tar first: a shard exists only once its json exists
        write_shard_record(self.out, job.index, self.shard_doc(job, staged))
        log.info("generate: published %s (%d images, %d captions, %.2f img/s)",
                 self.tar_uri(job.index), job.result.samples, job.result.captions,
                 job.result.images_per_s)

    def check_captions(self, indices: list[int], *, others: bool = True) -> None:
        """Check the captions parts before anything is written (a bad part names itself).

        The parts this process draws are read in full (sha256, Parquet schema, row count);
        with ``others``, every other listed part must exist with the size the manifest
        records, so a missing or truncated part fails every pod of an Indexed Job, not only
        the one that owns it. A pipeline worker passes ``others=False``: each part is then
        checked by the one worker that draws it, one read per part over the whole run.
        """
        selected = set(indices)
        for i, info in enumerate(self.manifest.shards):
            if i in selected:
                self.tables[i] = self.manifest.read_shard(i)  # read once: kept for the draw
                continue
            if not others:
                continue
            uri = self.manifest.shard_uri(i)
            try:
                got = storage.size(uri)
            except storage.StorageNotFound:
                raise InputError(f"{uri}: the captions part listed in {self.captions_uri} "
                                 "does not exist") from None
            if got != info.bytes:
                raise InputError(f"{uri}: {got} bytes; the captions manifest says "
                                 f"{info.bytes} (the part was changed or truncated)")

    def run(self, indices: list[int], *, check_others: bool = True) -> list[ShardResult]:
        """Draw the shards ``indices`` that are not done; the manifest when they are all.

        Args:
            indices: shard indices, in order.
            check_others: also check that the parts of other shards exist (see
                :meth:`check_captions`).
        """
        self.check_captions(indices, others=check_others)
        results: dict[int, ShardResult] = {}
        todo = []
        for i in indices:
            if self.is_done(i):
                results[i] = ShardResult(i, skipped=True)
                self.tables.pop(i, None)
            else:
                todo.append(i)
        if len(todo) < len(indices):
            log.info("generate: %d of %d shards already done; skipping them",
                     len(indices) - len(todo), len(indices))
        if todo:  # a manifest of an earlier run would list shards this run replaces
            storage.remove(storage.join(self.out, IMAGES_MANIFEST), missing_ok=True)
        with cf.ThreadPoolExecutor(self.cfg.encode_workers, "encode") as self.encoder, \
                cf.ThreadPoolExecutor(1, "publish") as publisher:
            pending: cf.Future | None = None
            for i in todo:
                job = ShardJob(self, i)
                staged = job.draw()
                if pending is not None:
                    pending.result()  # surface a failed upload before queueing another
                pending = publisher.submit(self.publish, job, staged)
                results[i] = job.result
            if pending is not None:
                pending.result()
        if sorted(indices) == list(range(self.manifest.num_shards)):
            self.write_manifest()
        return [results[i] for i in indices]

    def write_manifest(self) -> str:
        """Write ``manifest.json`` (and ``config.yaml``, ``sizes.json``) of the whole folder.

        Reads each shard record once (N reads); the one step that knows every shard is
        done calls it (the pipeline's fan-in step, or a run over every shard).

        Raises:
            InputError: naming the first shard record that is missing or that was made
                with another config.
        """
        current = read_images_manifest(self.out)
        if current is not None and current.get("config_fingerprint") == self.fingerprint \
                and current.get("num_shards") == self.manifest.num_shards:
            return storage.join(self.out, IMAGES_MANIFEST)  # already written by this config
        docs = []
        for i in range(self.manifest.num_shards):
            uri = self.json_uri(i)
            try:
                doc = read_shard_record(uri)
            except storage.StorageNotFound:
                raise InputError(f"{uri}: missing; the images manifest needs every one of "
                                 f"the {self.manifest.num_shards} shards (generate it first: "
                                 f"stablerep generate --shard {i})") from None
            if doc.get("config_fingerprint") != self.fingerprint:
                raise InputError(f"{uri}: made with another config (fingerprint "
                                 f"{doc.get('config_fingerprint')}, now {self.fingerprint}); "
                                 "no manifest written")
            docs.append(doc)
        storage.write_text(storage.join(self.out, STAGE_CONFIG), dump_yaml(self.cfg))
        return write_images_manifest(self.out, docs,
                                     images_per_caption=self.cfg.images_per_caption,
                                     fingerprint=self.fingerprint, captions=self.captions_uri)


def _gpu_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def generate(cfg: GenerateConfig, *, captions: str, out: str,
             backend_factory: Callable[[GenerateConfig], Backend] = create_backend,
             worker: tuple[int, int] | None = None) -> list[ShardResult]:
    """Generate the selected shards of ``captions`` into ``out``.

    Args:
        cfg: the validated stage config (its shard / all_shards / shard_from_env choose
            which shards; none of them = every shard).
        captions: the captions folder URI (with its manifest.json).
        out: the images folder URI.
        backend_factory: builds the text-to-image backend on first use (never, when every
            selected shard is already done); one model load for all the shards drawn.
        worker: (index, count): draw the shards of this pipeline worker instead
            (:func:`worker_shards`), checking only their captions parts.

    Returns:
        One result per selected shard, in order.
    """
    run = GenerationRun(cfg, captions, out, backend_factory)
    if worker is None:
        return run.run(select_shards(cfg, run.manifest.num_shards))
    indices = worker_shards(*worker, run.manifest.num_shards)
    return run.run(indices, check_others=False)


def write_manifest(cfg: GenerateConfig, *, captions: str, out: str) -> str:
    """Write the images manifest once every shard is committed (the fan-in step).

    Args:
        cfg: the stage config the shards were drawn with.
        captions: the captions folder URI.
        out: the images folder URI.

    Returns:
        The manifest's URI.
    """
    return GenerationRun(cfg, captions, out).write_manifest()
