"""Storage requests at scale: generation tasks, the manifest fan-in and training startup.

Thousands of tiny shards on memory:// behind a request-counting filesystem: every call that
would be a request to an object store (open, cat, exists, ls, info, put ...) is counted. A
generation worker's requests grow with the shards it draws, not with the shards of the run;
the manifest step reads each shard record once; a training rank's startup is one read of
``images/manifest.json``, whatever the number of shards. The counts are printed (``-s``).
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator

import pytest

from stablerep import contracts, stages, storage
from stablerep.config import load_config
from stablerep.data.shards import discover, iter_caption_groups
from stablerep.errors import InputError

pytestmark = pytest.mark.integration

REQUESTS = ("open", "cat_file", "cat", "exists", "isdir", "isfile", "ls", "info", "size",
            "put_file", "get_file", "get", "glob", "find", "rm", "rm_file", "pipe_file")


class Counter:
    """Counts the request-making calls of the filesystems storage.py hands out."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()


class _CountingFs:
    def __init__(self, fs, counter: Counter):
        self._fs, self._counter = fs, counter

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in REQUESTS:
            return attr

        def call(*args, **kwargs):
            self._counter.calls[name] += 1
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def counter(monkeypatch) -> Iterator[Counter]:
    counted = Counter()
    real = storage.filesystem

    def filesystem(uri: str):
        fs, path = real(uri)
        return (_CountingFs(fs, counted), path) if storage.protocol(uri) == "memory" \
            else (fs, path)

    monkeypatch.setattr(storage, "filesystem", filesystem)
    yield counted


@pytest.fixture
def root() -> Iterator[str]:
    uri = f"memory://scale-{uuid.uuid4().hex[:10]}"
    yield uri
    storage.remove(uri, recursive=True)


def _cfg(root: str, shards: int):
    return load_config("procedural", [
        f"captions.num_captions={shards}", f"captions.num_shards={shards}",
        "generate.images_per_caption=2", "generate.height=8", "generate.width=8",
        "generate.batch_size=8", "train.captions_per_batch=8", "train.images_per_caption=2"],
        require=("captions", "generate", "train"), data_root=root)


def _worker_requests(root: str, shards: int, workers: int, counter: Counter) -> list[int]:
    """Captions of ``shards`` shards, then every worker's generation; requests per worker."""
    cfg = _cfg(root, shards)
    stages.run_captions(cfg)
    per_task = []
    for w in range(workers):
        counter.reset()
        result = stages.run_generate(cfg, worker=(w, workers))
        assert result.shards_written == len(range(w, shards, workers))
        per_task.append(counter.total)
    return per_task


def test_generation_task_requests_grow_with_its_shards_not_the_run(root, counter):
    """10 shards per worker at 40 and at 160 shards: the same requests per task; no task
    probes the other shards' records or writes the manifest."""
    small = _worker_requests(f"{root}/a", 40, 4, counter)
    large = _worker_requests(f"{root}/b", 160, 16, counter)
    print(f"\nrequests per generation task (10 shards each): 40 shards/4 workers {small}, "
          f"160 shards/16 workers {large}")
    assert len(set(small + large)) == 1, (small, large)
    assert small[0] <= 10 * 4 + 2  # per shard: part, done?, tar, json; per task: 2
    assert not storage.exists(f"{root}/b/images/{contracts.IMAGES_MANIFEST}")


def _fake_run(root: str, n: int):
    """A captions manifest of ``n`` parts and ``n`` committed one-caption image shards, as
    the generation workers leave them (no manifest yet), written directly: fast at n=2000."""
    from stablerep.generation.runner import output_fingerprint

    cfg = _cfg(root, n)
    parts = [contracts.ShardInfo(i, contracts.part_name(i), i, 1, "0" * 64, 1) for i in range(n)]
    captions = contracts.CaptionsManifest(f"{root}/captions", n, parts, 0, {}, {}, "f")
    contracts.write_captions_manifest(captions)
    fingerprint = output_fingerprint(cfg.generate, captions)
    for i in range(n):
        with storage.atomic_write(f"{root}/images/{contracts.shard_tar_name(i)}") as w:
            writer = contracts.TarShardWriter(w.file)
            for j in range(2):
                writer.write(contracts.sample_key(i, j), {"png": b"x", "txt": b"c"})
            writer.close()
        contracts.write_shard_record(f"{root}/images", i, {
            "kind": contracts.SHARD_JSON_KIND, "shard": i, "num_shards": n,
            "tar": contracts.shard_tar_name(i), "sha256": w.sha256, "num_samples": 2,
            "num_captions": 1, "images_per_caption": 2, "failed": [],
            "config_fingerprint": fingerprint})
    return cfg


def test_manifest_and_training_startup_at_2000_shards(root, counter):
    """The fan-in reads each record once; a training rank starts with one request."""
    n = 2000
    cfg = _fake_run(root, n)
    images = f"{root}/images"
    counter.reset()
    stages.run_images_manifest(cfg)
    fan_in = dict(counter.calls)
    counter.reset()
    refs = discover([images])
    startup = dict(counter.calls)
    assert len(refs) == n and sum(r.num_captions for r in refs) == n
    storage.remove(f"{images}/{contracts.IMAGES_MANIFEST}")
    counter.reset()
    assert len(discover([images])) == n
    without = counter.total
    print(f"\n{n} shards: manifest step {sum(fan_in.values())} requests {fan_in}; training "
          f"startup per rank {sum(startup.values())} {startup} (without the manifest: "
          f"{without})")
    assert startup == {"cat_file": 1}  # one read of manifest.json
    assert n <= sum(fan_in.values()) <= n + 10  # one read per record, a few writes
    assert without > n  # what every rank paid before the manifest existed


def test_manifest_errors_name_the_file(root):
    cfg = _cfg(root, 3)
    stages.run_captions(cfg)
    stages.run_generate(cfg, worker=(0, 1))
    images = f"{root}/images"
    doc = storage.read_json(f"{images}/manifest.json")
    doc["shards"][1]["num_captions"] += 1
    storage.write_json(f"{images}/manifest.json", doc)
    with pytest.raises(InputError, match=r"manifest.json: num_captions is 3 but its shards "
                                         r"list adds up to 4"):
        discover([images])
    doc["num_captions"] += 1  # consistent in itself, but not with the shard
    storage.write_json(f"{images}/manifest.json", doc)
    (ref0, ref1, _) = discover([images])
    with pytest.raises(InputError, match=r"shard-000001.tar: holds 2 samples of 1 captions; "
                                         r".*manifest.json says 2 of 2"):
        list(iter_caption_groups(ref1.uri, sha256=ref1.sha256, record=ref1.record,
                                 expect=(ref1.num_samples, ref1.num_captions)))
    storage.remove(ref0.uri)
    with pytest.raises(InputError, match=r"shard-000000.tar: no such shard; .*manifest.json "
                                         r"lists it"):
        list(iter_caption_groups(ref0.uri, sha256=ref0.sha256, record=ref0.record))


def test_workers_out_of_range_is_refused_before_any_work(root):
    cfg = _cfg(root, 3)
    stages.run_captions(cfg)
    for workers in (0, 4):
        with pytest.raises(Exception, match=f"parameter workers: got {workers}, expected "
                                            "1..3"):
            stages.run_generate(cfg, worker=(0, workers))
    assert not storage.exists(f"{root}/images")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    from stablerep.generation.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd", seed=0)
    source = f"memory://tiny-source-{uuid.uuid4().hex[:8]}/sd"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(f"{source}/{path.relative_to(folder).as_posix()}",
                            path.read_bytes())
    return source


def test_model_is_copied_once_and_workers_load_the_copy(root, tiny_sd, tmp_path, monkeypatch):
    """stage_model reads the source once; two generation workers read only the run's copy."""
    monkeypatch.setenv("STABLEREP_CACHE", str(tmp_path / "cache"))  # a fresh pod's cache
    cfg = load_config("demo_sd", [
        "captions.num_captions=4", "captions.num_shards=4", "generate.backend=diffusers",
        f"generate.model={tiny_sd}", "generate.images_per_caption=1", "generate.height=64",
        "generate.width=64", "generate.stored_size=32", "generate.num_inference_steps=2"],
        require=("captions", "generate"), data_root=root)
    stages.run_captions(cfg)
    source = tiny_sd.removeprefix("memory://")
    reads = collections.Counter()  # storage calls on the source's files, per phase
    real = storage.filesystem

    def filesystem(uri: str):
        fs, path = real(uri)
        if storage.protocol(uri) == "memory" and path.lstrip("/").startswith(source):
            reads["workers" if reads["phase"] else "stage"] += 1
        return fs, path

    monkeypatch.setattr(storage, "filesystem", filesystem)
    location = stages.run_stage_model(cfg)
    assert location == f"{root}/models/{storage.name(location)}"
    assert storage.exists(f"{location}/model_index.json")
    assert stages.run_stage_model(cfg) == location  # a second call keeps the copy
    staged = reads["stage"]
    reads["phase"] = 1
    results = [stages.run_generate(cfg, worker=(w, 2), staged_model=True) for w in range(2)]
    assert [r.shards_written for r in results] == [2, 2]
    print(f"\nstorage calls on the source: staging twice {staged}, two workers "
          f"{reads['workers']}")
    assert staged > 0 and reads["workers"] == 0
    doc = storage.read_json(f"{root}/images/shard-000000.json")
    assert doc["model"] == tiny_sd  # samples name the model, not the copy


def test_stage_model_refuses_a_folder_without_model_index(root, tiny_sd):
    bad = f"{root}/not-a-model"
    storage.write_text(f"{bad}/unet/config.json", "{}")
    cfg = load_config("demo_sd", ["generate.backend=diffusers", f"generate.model={bad}"],
                      require=("generate",), data_root=root)
    with pytest.raises(InputError, match=r"not a diffusers pipeline \(no model_index.json"):
        stages.run_stage_model(cfg)
    assert not storage.exists(f"{root}/models")
    missing = load_config("demo_sd", ["generate.backend=diffusers", f"generate.model={tiny_sd}"],
                          require=("captions", "generate"), data_root=root)
    stages.run_captions(missing)
    with pytest.raises(InputError, match=r"stablerep-model.json: missing; the run's copy"):
        stages.run_generate(missing, worker=(0, 1), staged_model=True)
    assert not storage.exists(f"{root}/images/shard-000000.json")


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, 7, 9)).save(buf, format="PNG")
    return buf.getvalue()


def _train_shards(root: str, shards: int, captions: int, m: int = 2) -> str:
    """``shards`` verified shards of ``captions`` captions x ``m`` decodable images."""
    folder = f"{root}/images"
    cid = 0
    for i in range(shards):
        with storage.atomic_write(f"{folder}/{contracts.shard_tar_name(i)}") as w:
            writer = contracts.TarShardWriter(w.file)
            for _ in range(captions):
                for j in range(m):
                    writer.write(contracts.sample_key(cid, j), contracts.sample_members(
                        _png(cid * m + j), "png", f"caption {cid}", {}))
                cid += 1
            writer.close()
        contracts.write_shard_record(folder, i, {
            "tar": contracts.shard_tar_name(i), "num_captions": captions,
            "num_samples": captions * m, "images_per_caption": m, "sha256": w.sha256})
    return folder


def test_resume_skips_whole_shards_by_count_without_reading_them(root, counter):
    """A mid-epoch resume gives the same batches and opens only the shards still needed."""
    import torch

    from stablerep.config import TrainConfig
    from stablerep.data.loader import CaptionBatches, Layout

    refs = discover([_train_shards(root, 24, 3)])
    cfg = TrainConfig(model="vit_tiny", image_size=16, captions_per_batch=4,
                      images_per_caption=2, num_workers=0, shuffle_buffer=2, seed=5,
                      augmentation="none")
    layout = Layout.create(cfg, refs, 1)

    def batches(skip: int) -> tuple[list, int]:
        ds = CaptionBatches(refs, cfg, layout, rank=0, world_size=1)
        ds.set_epoch(0, skip)
        counter.reset()
        out = list(ds)
        return out, counter.calls["open"]

    full, opened_full = batches(0)
    skip = 12  # of 18 micro-batches: 48 of 72 captions used before the restart
    resumed, opened = batches(skip)
    assert [b.index for b in resumed] == list(range(skip, len(full)))
    for a, b in zip(full[skip:], resumed, strict=True):
        assert torch.equal(a.caption_ids, b.caption_ids) and torch.equal(a.images, b.images)
    print(f"\nshard reads: whole epoch {opened_full}, resumed at batch {skip} of {len(full)}: "
          f"{opened}")
    assert opened_full == 24 and opened <= 24 - 15  # at least 15 of the 16 used shards skipped


def test_tiny_backend_is_staged_whole_from_a_hidden_cache(root, tmp_path):
    """The tiny pipeline lives under a cache folder (often ~/.cache): every file is copied."""
    cfg = load_config("demo_sd", [f"generate.tiny_cache={tmp_path / '.cache' / 'm'}"],
                      require=("generate",), data_root=root)
    location = stages.run_stage_model(cfg)
    record = storage.read_json(f"{location}/stablerep-model.json")
    assert record["source"] == "stablerep/tiny-sd"
    assert {"model_index.json", "unet/config.json", "vae/config.json",
            "tokenizer/vocab.json"} <= set(record["files"])
    for name in record["files"]:
        assert storage.exists(f"{location}/{name}"), name
