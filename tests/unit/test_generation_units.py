"""The generation stage's pure parts: keys, per-image seeds, the tar writer, image encoding,
shard selection, the output fingerprint and config validation. No model is loaded here; the
runner end to end (real tiny Stable Diffusion) is in tests/integration/test_generation.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stablerep.captions import CaptionsManifest
from stablerep.captions.stage import ShardInfo
from stablerep.config import Config, GenerateConfig, from_dict
from stablerep.contracts import KEY_PATTERN, TarShardWriter, sample_key, sample_members
from stablerep.errors import ConfigError
from stablerep.generation.runner import ShardJob, output_fingerprint, select_shards
from stablerep.generation.shards import encode_image, image_seed


def _parse_key(key: str) -> tuple[int, int]:
    """(caption_id, j) of a sample key, as the data loader and the report read it."""
    m = KEY_PATTERN.fullmatch(key)
    assert m is not None, key
    return int(m["caption_id"]), int(m["j"])

# ---------------------------------------------------------------------------- keys and seeds


@pytest.mark.parametrize(("caption_id", "j"), [(0, 0), (7, 3), (123_456_789_012, 999)])
def test_sample_key_round_trip(caption_id: int, j: int) -> None:
    key = sample_key(caption_id, j)
    assert "." not in key  # webdataset splits key and extension at the first dot
    assert len(key) == 16 and key[12] == "_"
    assert _parse_key(key) == (caption_id, j)


def test_sample_keys_sort_like_captions_then_images() -> None:
    keys = [sample_key(c, j) for c in (2, 10, 100) for j in (0, 1, 10)]
    assert sorted(keys) == keys


def test_image_seed_is_stable_distinct_and_in_range() -> None:
    seeds = {image_seed(0, c, j) for c in range(50) for j in range(10)}
    assert len(seeds) == 500
    assert all(0 <= s < 2**63 for s in seeds)
    assert image_seed(0, 3, 1) == image_seed(0, 3, 1)
    assert image_seed(1, 3, 1) != image_seed(0, 3, 1)
    # Pinned: changing the hash would silently change every image of a resumed run.
    assert image_seed(0, 0, 0) == 3649034661406903291
    assert image_seed(0, 12, 3) == 5784851670958685894


def test_image_seed_matches_its_definition() -> None:
    import hashlib

    digest = hashlib.blake2b(b"5:42:3", digest_size=8).digest()
    assert image_seed(5, 42, 3) == int.from_bytes(digest, "big") & (2**63 - 1)


def _stub_run(captions: list[tuple[int, str]], splits: list[int], cfg: GenerateConfig):
    """A stand-in GenerationRun whose manifest splits ``captions`` into ``splits`` parts."""
    parts, start = [], 0
    for n in splits:
        rows = captions[start:start + n]
        parts.append(pa.table({"caption_id": [c for c, _ in rows],
                               "caption": [t for _, t in rows]}))
        start += n
    manifest = SimpleNamespace(read_shard=lambda i: parts[i], num_shards=len(parts))
    return SimpleNamespace(cfg=cfg, manifest=manifest, tables={})


@pytest.mark.parametrize("splits", [[12], [4, 4, 4], [5, 7], [1, 1, 10]])
def test_work_items_do_not_depend_on_sharding(splits: list[int]) -> None:
    captions = [(100 + i, f"caption {i}") for i in range(12)]
    cfg = GenerateConfig(images_per_caption=3, seed=7)
    run = _stub_run(captions, splits, cfg)
    items = [it for i in range(len(splits)) for it in ShardJob(run, i).items]
    assert [(it.caption_id, it.j) for it in items] == [(c, j) for c, _ in captions
                                                        for j in range(3)]
    assert all(it.seed == image_seed(7, it.caption_id, it.j) for it in items)
    assert all(it.caption == f"caption {it.caption_id - 100}" for it in items)


# ---------------------------------------------------------------------------- tar writer


def _write_tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for key, members in samples:
        writer.write(key, members)
    writer.close()
    assert writer.samples == len(samples)
    return buf.getvalue()


def _samples() -> list[tuple[str, dict[str, bytes]]]:
    return [(sample_key(c, j), sample_members(bytes([c, j]) * 100, "jpg", f"caption {c}",
                                              {"caption_id": c, "j": j}))
            for c in (3, 4) for j in range(2)]


def test_tar_writer_is_deterministic_with_fixed_metadata(monkeypatch) -> None:
    first = _write_tar(_samples())
    import time

    monkeypatch.setattr(time, "time", lambda: 2_000_000_000.0)  # a later clock changes nothing
    second = _write_tar(_samples())
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [f"{sample_key(c, j)}.{ext}" for c in (3, 4)
                                           for j in range(2) for ext in ("jpg", "txt", "json")]
        for info in infos:
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
            assert info.mode == 0o444 and info.isfile()
        assert tar.extractfile(infos[1]).read() == b"caption 3"
        assert json.loads(tar.extractfile(infos[2]).read()) == {"caption_id": 3, "j": 0}
    assert first[257:263] == b"ustar\x00"  # POSIX USTAR header, no PAX records


def test_sample_members_order_and_canonical_json() -> None:
    members = sample_members(b"img", "webp", "a cat", {"b": 1, "a": [2, 3]})
    assert list(members) == ["webp", "txt", "json"]
    assert members["json"] == b'{"a":[2,3],"b":1}'
    assert members["txt"] == b"a cat"


# ---------------------------------------------------------------------------- encoding


def _pixels(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("shape", "stored", "expected"), [
    ((64, 64), 32, (32, 32)),
    ((48, 64), 32, (43, 32)),  # (W, H): the shorter side (height) becomes 32
    ((64, 40), 20, (20, 32)),
    ((40, 56), 80, (112, 80)),  # upsampled too
    ((48, 64), 0, (64, 48)),  # 0 = as generated
    ((32, 32), 32, (32, 32)),
])
def test_encode_image_resizes_the_shorter_side(shape, stored, expected) -> None:
    data = encode_image(_pixels(*shape), stored_size=stored, fmt="png", quality=95)
    assert Image.open(io.BytesIO(data)).size == expected


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("webp", "WEBP"),
                                                  ("png", "PNG")])
def test_encode_image_formats(fmt: str, pil_format: str) -> None:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = (200, 30, 60)
    data = encode_image(pixels, stored_size=0, fmt=fmt, quality=95)
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format and image.mode == "RGB" and image.size == (32, 32)
    decoded = np.asarray(image)
    if fmt == "png":
        assert np.array_equal(decoded, pixels)
    else:
        assert np.abs(decoded.astype(int) - pixels).mean() < 8
    assert encode_image(pixels, stored_size=0, fmt=fmt, quality=95) == data  # deterministic


def test_encode_image_quality_and_unknown_format() -> None:
    pixels = _pixels(64, 64)
    high = encode_image(pixels, stored_size=0, fmt="jpg", quality=95)
    low = encode_image(pixels, stored_size=0, fmt="jpg", quality=20)
    assert len(low) < len(high)
    with pytest.raises(ValueError, match="gif"):
        encode_image(pixels, stored_size=0, fmt="gif", quality=95)


# ---------------------------------------------------------------------------- shard selection


def test_select_shards_modes(monkeypatch) -> None:
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert select_shards(GenerateConfig(), 3) == [0, 1, 2]
    assert select_shards(GenerateConfig(all_shards=True), 3) == [0, 1, 2]
    assert select_shards(GenerateConfig(shard=2), 3) == [2]
    with pytest.raises(ConfigError, match=r"generate\.shard: got 3, expected 0\.\.2"):
        select_shards(GenerateConfig(shard=3), 3)


def test_select_shards_from_job_completion_index(monkeypatch) -> None:
    cfg = GenerateConfig(shard_from_env=True)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert select_shards(cfg, 4) == [1]
    monkeypatch.setenv("JOB_COMPLETION_INDEX", " 3 ")
    assert select_shards(cfg, 4) == [3]
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    with pytest.raises(ConfigError, match=r"expected 0\.\.3"):
        select_shards(cfg, 4)
    for bad in ("", "x", "-1", "1.0"):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", bad)
        with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX"):
            select_shards(cfg, 4)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(ConfigError, match=r"generate\.shard_from_env: JOB_COMPLETION_INDEX"):
        select_shards(cfg, 4)


# ---------------------------------------------------------------------------- fingerprint


def _manifest(fp: str = "capsfp", sha: str = "aa") -> CaptionsManifest:
    shard = ShardInfo(index=0, path="part-000000.parquet", first_caption_id=0,
                      num_captions=4, sha256=sha, bytes=100)
    return CaptionsManifest(uri="/c", count=4, shards=[shard], seed=0, source={},
                            summary={}, config_fingerprint=fp)


def test_output_fingerprint_ignores_run_only_fields() -> None:
    base = output_fingerprint(GenerateConfig(), _manifest())
    for change in ({"batch_size": 3}, {"shard": 0}, {"all_shards": True}, {"device": "cpu"},
                   {"encode_workers": 1}, {"max_failures": 5}, {"overwrite": True},
                   {"captions": "gs://x/c"}, {"out": "/elsewhere"}, {"compile": True},
                   {"tiny_cache": "/t"}, {"channels_last": False}, {"shard_from_env": True}):
        assert output_fingerprint(GenerateConfig(**change), _manifest()) == base, change


def test_output_fingerprint_changes_with_what_decides_the_images() -> None:
    base = output_fingerprint(GenerateConfig(), _manifest())
    for change in ({"seed": 1}, {"guidance_scale": 3.0}, {"num_inference_steps": 49},
                   {"images_per_caption": 9}, {"height": 256}, {"stored_size": 128},
                   {"image_format": "png"}, {"jpeg_quality": 90}, {"scheduler": "dpmsolver++"},
                   {"model": "org/other"}, {"backend": "tiny"}, {"negative_prompt": "blurry"},
                   {"dtype": "fp16"}):
        assert output_fingerprint(GenerateConfig(**change), _manifest()) != base, change
    assert output_fingerprint(GenerateConfig(), _manifest(fp="other")) != base
    assert output_fingerprint(GenerateConfig(), _manifest(sha="bb")) != base


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(("section", "field", "message"), [
    ({"guidance_scale": -0.5}, "generate.guidance_scale", ">= 0"),
    ({"images_per_caption": 0}, "generate.images_per_caption", ">= 1"),
    ({"height": 60}, "generate.height", "multiple of 8"),
    ({"width": 100}, "generate.width", "multiple of 8"),
    ({"height": 0}, "generate.height", "multiple of 8"),
    ({"num_inference_steps": 0}, "generate.num_inference_steps", ">= 1"),
    ({"batch_size": 0}, "generate.batch_size", ">= 1"),
    ({"max_failures": -2}, "generate.max_failures", ">= -1"),
    ({"image_format": "gif"}, "generate.image_format", "jpg"),
    ({"scheduler": "euler"}, "generate.scheduler", "ddim"),
    ({"backend": "onnx"}, "generate.backend", "tiny"),
    ({"shard": 1, "all_shards": True}, "generate.shard", "choose one"),
    ({"guidance_scale": "high"}, "generate.guidance_scale", "expected a number"),
])
def test_generate_config_errors_name_the_field(section, field, message) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"generate": section})
    assert str(info.value).startswith(field)
    assert message in str(info.value)


def test_generate_config_defaults_follow_the_paper() -> None:
    cfg = from_dict(Config, {"generate": {}}).generate
    assert (cfg.images_per_caption, cfg.guidance_scale, cfg.num_inference_steps) == (10, 2.0, 50)
    assert (cfg.scheduler, cfg.stored_size, cfg.image_format, cfg.jpeg_quality) == (
        "ddim", 256, "jpg", 95)
    assert cfg.max_failures == 0  # a failed caption fails the shard unless allowed


# ---------------------------------------------------------------------------- captions manifest


def _write_captions(folder, rows: int = 3) -> dict:
    """A one-part captions folder written by hand; returns its manifest document."""
    import hashlib

    import pyarrow.parquet as pq

    from stablerep.captions.stage import PART_SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"caption_id": list(range(rows)), "caption": [f"c{i}" for i in range(rows)],
                      "source": ["s"] * rows}, schema=PART_SCHEMA)
    pq.write_table(table, folder / "part-000000.parquet")
    data = (folder / "part-000000.parquet").read_bytes()
    doc = {"kind": "stablerep.captions", "version": 1, "count": rows, "num_shards": 1,
           "shards": [{"index": 0, "path": "part-000000.parquet", "first_caption_id": 0,
                       "num_captions": rows, "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data)}],
           "seed": 0, "source": {}, "summary": {}, "config_fingerprint": "f"}
    (folder / "manifest.json").write_text(json.dumps(doc))
    return doc


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("count"), "missing key 'count'"),
    (lambda d: d.update(count="3"), "'count' is str; expected int"),
    (lambda d: d.update(seed=True), "'seed' is bool; expected int"),
    (lambda d: d.update(shards=[]), "'shards' is empty"),
    (lambda d: d.update(shards=[3]), r"shards\[0\] is int; expected an object"),
    (lambda d: d["shards"][0].pop("path"), r"missing key 'shards\[0\]\.path'"),
    (lambda d: d.update(kind="other"), "not a stablerep captions manifest"),
])
def test_captions_manifest_errors_name_the_file_and_key(tmp_path, change, message) -> None:
    from stablerep.contracts import load_captions_manifest
    from stablerep.errors import InputError

    doc = _write_captions(tmp_path / "c")
    change(doc)
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=message) as info:
        load_captions_manifest(str(tmp_path / "c"))
    assert str(info.value).startswith(f"{tmp_path / 'c' / 'manifest.json'}: ")


def test_captions_part_row_count_and_types_are_checked(tmp_path) -> None:
    import pyarrow.parquet as pq

    from stablerep.contracts import load_captions_manifest
    from stablerep.errors import InputError

    _write_captions(tmp_path / "c")
    manifest = load_captions_manifest(str(tmp_path / "c"))
    assert manifest.read_shard(0).num_rows == 3
    manifest.check_parts()
    part = tmp_path / "c" / "part-000000.parquet"
    pq.write_table(pa.table({"caption_id": ["0", "1", "2"], "caption": ["a", "b", "c"]}), part)
    with pytest.raises(InputError, match=r"part-000000\.parquet: column 'caption_id' is string"):
        manifest.read_shard(0, verify=False)
    pq.write_table(pa.table({"caption_id": [0, 1], "caption": ["a", "b"]}), part)
    with pytest.raises(InputError, match="2 rows; the manifest says 3"):
        manifest.read_shard(0, verify=False)
    part.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        manifest.read_shard(0, verify=False)


def test_worker_shards_partition_every_shard_once() -> None:
    from stablerep.generation.runner import worker_shards

    parts = [worker_shards(w, 64, 8192) for w in range(64)]
    assert parts[0][:3] == [0, 64, 128] and parts[63][-1] == 8191
    assert sorted(i for p in parts for i in p) == list(range(8192))
    assert {len(p) for p in parts} == {128}
    assert worker_shards(2, 3, 4) == [2]


@pytest.mark.parametrize(("workers", "message"), [
    (0, "parameter workers: got 0, expected a value >= 1"),
    (5, "parameter workers: got 5, expected at most the 4 caption shards (parameter shards)")])
def test_pipeline_refuses_workers_out_of_range(workers: int, message: str) -> None:
    from stablerep.errors import ConfigError
    from stablerep.kfp.params import recipe_params
    from stablerep.kfp.validation import check_run as validate

    params = {**recipe_params("demo"), "train_backend": "local", "workers": workers}
    with pytest.raises(ConfigError) as e:
        validate(params, local=True)
    assert str(e.value) == message
    assert recipe_params("demo")["workers"] == 4  # a recipe's default fits its shards
    assert recipe_params("cc12m")["workers"] == 64


def test_pipeline_refuses_a_model_folder_without_model_index(tmp_path) -> None:
    from stablerep.errors import ConfigError
    from stablerep.kfp.params import recipe_params
    from stablerep.kfp.validation import check_run as validate

    (tmp_path / "unet").mkdir()
    params = {**recipe_params("demo"), "train_backend": "local", "model": str(tmp_path),
              "overrides": ["generate.backend=diffusers"]}
    with pytest.raises(ConfigError, match=rf"parameter model \(generate.model: got .{tmp_path}., "
                                          "expected a hub id or a folder holding a diffusers "
                                          "pipeline"):
        validate(params, local=True)


def test_run_local_bad_workers_is_one_line_exit_2(tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "stablerep", "pipeline", "run-local",
                           "--data-root", str(tmp_path / "d"), "--param", "workers=9"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("error: parameter workers: got 9, expected at most the 4 "
                                   "caption shards (parameter shards)")
    assert not (tmp_path / "d").exists()
