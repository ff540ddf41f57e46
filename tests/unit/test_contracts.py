"""stablerep.contracts: names, keys, records and manifests that stages hand each other.

Each writer is checked byte for byte against the format the files have always had, and each
reader against what the writer wrote and against malformed input (named in one line).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from stablerep import contracts
from stablerep.errors import InputError


def test_names_and_keys() -> None:
    assert contracts.shard_stem(7) == "shard-000007"
    assert contracts.shard_tar_name(7) == "shard-000007.tar"
    assert contracts.shard_json_name(7) == "shard-000007.json"
    assert contracts.part_name(3) == "part-000003.parquet"
    assert contracts.checkpoint_name(120) == "ckpt-00000120.pt"
    assert contracts.sample_key(42, 3) == "000000000042_003"
    m = contracts.KEY_PATTERN.fullmatch(contracts.sample_key(10**11, 1234))
    assert (int(m["caption_id"]), int(m["j"])) == (10**11, 1234)
    for bad in ("42", "a_1", "1_b", "1.2_3", "_1", "1_"):
        assert contracts.KEY_PATTERN.fullmatch(bad) is None, bad
    assert contracts.split_member("000000000042_003.jpg") == ("000000000042_003", "jpg")
    assert contracts.split_member("dir/000000000042_003.Meta.JSON") == (
        "dir/000000000042_003", "meta.json")
    assert contracts.is_shard_json("gs://b/images/shard-000001.json")
    assert not contracts.is_shard_json("gs://b/images/shard-000001.tar")
    assert not contracts.is_shard_json("gs://b/images/manifest.json")


def test_sample_members_and_tar_are_deterministic() -> None:
    meta = contracts.sample_record(42, 1, caption="a cat", seed=9, guidance_scale=2.0, steps=4,
                                   scheduler="ddim", model="m", generated_size=(64, 48),
                                   stored_size=32, stored_dims=(43, 32))
    assert meta["key"] == "000000000042_001" and meta["generated_size"] == [64, 48]
    assert (meta["width"], meta["height"], meta["original_width"]) == (43, 32, 64)
    members = contracts.sample_members(b"IMG", "png", "a cat", meta)
    assert list(members) == ["png", "txt", "json"]
    assert members["json"] == json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()

    def tar_bytes() -> bytes:
        buf = io.BytesIO()
        writer = contracts.TarShardWriter(buf)
        writer.write(meta["key"], members)
        writer.close()
        return buf.getvalue()

    first = tar_bytes()
    assert first == tar_bytes()
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["000000000042_001.png", "000000000042_001.txt",
                                       "000000000042_001.json"]
    assert {(i.mtime, i.mode, i.uid, i.gid) for i in infos} == {(0, 0o444, 0, 0)}


def _record(index: int, samples: int) -> dict:
    return {"kind": contracts.SHARD_JSON_KIND, "version": 1, "shard": index, "num_shards": 2,
            "tar": contracts.shard_tar_name(index), "sha256": "ab" * 32, "bytes": 10,
            "num_samples": samples, "num_captions": samples // 2, "images_per_caption": 2,
            "failed": [], "config_fingerprint": "f"}


def test_shard_records_and_images_manifest(tmp_path: Path) -> None:
    out = str(tmp_path)
    records = [_record(0, 6), _record(1, 4)]
    for i, record in enumerate(records):
        contracts.write_shard_record(out, i, record)
    assert sorted(Path(u).name for u in contracts.finished_shards(out)) == [
        "shard-000000.json", "shard-000001.json"]
    assert contracts.read_shard_record(str(tmp_path / "shard-000001.json")) == records[1]
    ref = contracts.shard_ref(out, str(tmp_path / "shard-000000.json"), verify=True)
    assert ref == contracts.ShardRef(str(tmp_path / "shard-000000.tar"), 3, 6, 2, "ab" * 32)
    assert contracts.read_images_manifest(out) is None
    contracts.write_images_manifest(out, records, images_per_caption=2, fingerprint="f",
                                    captions="caps")
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "shard-000000.tar": 6, "shard-000001.tar": 4}
    manifest = contracts.read_images_manifest(out)
    assert manifest is not None
    assert (manifest["kind"], manifest["num_samples"], manifest["num_captions"]) == (
        "stablerep.images", 10, 5)
    assert manifest["shards"][1] == {"index": 1, "tar": "shard-000001.tar", "num_samples": 4,
                                     "num_captions": 2, "sha256": "ab" * 32}


def test_bad_shard_records_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "shard-000000.json"
    bad.write_text("[1]")
    with pytest.raises(InputError, match=r"shard-000000.json: a JSON list; expected the JSON "
                                         r"shard record \(an object\)"):
        contracts.read_shard_record(str(bad))
    bad.write_text(json.dumps({**_record(0, 2), "sha256": "nope"}))
    with pytest.raises(InputError, match=r"field sha256: got 'nope', expected the tar's sha256"):
        contracts.shard_ref(str(tmp_path), str(bad), verify=True)
    assert contracts.shard_ref(str(tmp_path), str(bad), verify=False).sha256 == "nope"
    bad.write_text(json.dumps({"tar": "x.tar"}))
    with pytest.raises(InputError, match="not a stablerep shard json"):
        contracts.shard_ref(str(tmp_path), str(bad), verify=False)


def test_latest_json_round_trip_and_errors(tmp_path: Path) -> None:
    out = str(tmp_path)
    assert contracts.read_latest(out) is None
    contracts.write_latest(out, 20, "cd" * 32)
    record = {"step": 20, "checkpoint": "ckpt-00000020.pt", "sha256": "cd" * 32}
    assert (tmp_path / "latest.json").read_text() == json.dumps(record, indent=2) + "\n"
    assert contracts.read_latest(out) == str(tmp_path / "ckpt-00000020.pt")
    for content, needle in ((b'{"checkpoint": "../x.pt"}', "got checkpoint='../x.pt'"),
                            (b"\xe9", "not UTF-8 text (byte 0xe9 at offset 0)"),
                            (b"{", "not valid JSON")):
        (tmp_path / "latest.json").write_bytes(content)
        with pytest.raises(InputError, match=r"latest.json: ") as e:
            contracts.read_latest(out)
        assert needle in str(e.value)


def test_eval_metrics_round_trip(tmp_path: Path) -> None:
    out = str(tmp_path / "eval")
    metrics = {"datasets": {"sklearn:digits": {"knn": {"top1": 0.5}}}}
    uri = contracts.write_eval_metrics(out, metrics)
    assert uri == str(tmp_path / "eval" / "metrics.json")
    assert contracts.read_json_object(uri, "JSON eval metrics", writer="stablerep eval") == metrics


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    folder = str(tmp_path)
    records = {f"{folder}/shard-00000{i}.json": {**_record(i, 2), "num_shards": 4}
               for i in (0, 3)}
    with pytest.raises(InputError) as e:
        contracts.check_complete(folder, records)
    assert str(e.value) == (
        f"{folder}/shard-000001.json: missing (and 1 more); 2 of 4 shards are committed (a "
        "shard exists once its json does): generate the missing shards first (stablerep "
        "generate --shard 1)")
    contracts.check_complete(folder, {**records, **{
        f"{folder}/shard-00000{i}.json": {**_record(i, 2), "num_shards": 4} for i in (1, 2)}})
    contracts.check_complete(folder, {"a.json": {"tar": "a.tar"}})  # hand-made: not checked


# ---------------------------------------------------------------------------- training result


def _result(out: Path, **changes) -> contracts.TrainResult:
    values = dict(out=str(out), steps=40, final_loss=2.5, images_per_s=812.25, world_size=16,
                  seconds=12.5, method="stablerep", model="vit_tiny_patch16_224",
                  checkpoint=str(out / "ckpt-00000040.pt"), latest=str(out / "latest.json"),
                  backbone=str(out / "backbone.pt"), metrics=str(out / "metrics.jsonl"))
    return contracts.TrainResult(**{**values, **changes})


def test_train_result_round_trip(tmp_path: Path) -> None:
    result = _result(tmp_path)
    uri = contracts.write_train_result(result)
    assert uri == str(tmp_path / contracts.TRAIN_RESULT) == str(tmp_path / "result.json")
    doc = json.loads(Path(uri).read_text())
    assert doc["kind"] == "stablerep.train.result" and doc["version"] == 1
    assert doc["final_loss"] == 2.5 and doc["world_size"] == 16
    assert contracts.read_train_result(str(tmp_path)) == result
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # nothing staged left


def test_train_result_unknown_loss_is_null(tmp_path: Path) -> None:
    contracts.write_train_result(_result(tmp_path, final_loss=float("nan")))
    assert json.loads((tmp_path / "result.json").read_text())["final_loss"] is None
    back = contracts.read_train_result(str(tmp_path))
    assert back.final_loss != back.final_loss and back.steps == 40


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("steps"), "missing key 'steps'; expected the training result that "
                               "`stablerep train` writes"),
    (lambda d: d.update(steps="40"), "key 'steps': got '40', expected int"),
    (lambda d: d.update(world_size=True), "key 'world_size': got True, expected int"),
    (lambda d: d.update(images_per_s=None), "key 'images_per_s': got None, expected number"),
    (lambda d: d.update(backbone=3), "key 'backbone': got 3, expected str"),
    (lambda d: d.update(kind="stablerep.images"), "kind 'stablerep.images'; expected "
                                                  "'stablerep.train.result' (the training "
                                                  "result that `stablerep train` writes)"),
])
def test_train_result_wrong_key_named(edit, message, tmp_path: Path) -> None:
    doc = _result(tmp_path).to_json()
    edit(doc)
    (tmp_path / "result.json").write_text(json.dumps(doc))
    with pytest.raises(InputError) as e:
        contracts.read_train_result(str(tmp_path))
    assert str(e.value) == f"{tmp_path / 'result.json'}: {message}"


@pytest.mark.parametrize("content, message", [
    (None, "no training result (the run has not finished"),
    ("[1, 2]", "a JSON list; expected the JSON training result (an object)"),
    ("{not json", "not valid JSON"),
])
def test_train_result_missing_or_not_an_object(content, message, tmp_path: Path) -> None:
    if content is not None:
        (tmp_path / "result.json").write_text(content)
    with pytest.raises(InputError) as e:
        contracts.read_train_result(str(tmp_path))
    text = str(e.value)
    assert text.startswith(str(tmp_path / "result.json")) and message in text, text
    assert "\n" not in text


@pytest.mark.parametrize(("change", "message"), [
    ({"num_shards": "2"}, "'num_shards' is str; expected int"),
    ({"num_shards": 5}, "'num_shards' is 5 but 'shards' lists 1; expected them equal"),
    ({"version": 1.5}, "'version' is float; expected int"),
    ({"count": -1}, "'count' is -1; expected >= 0"),
])
def test_a_captions_manifest_of_the_wrong_types_is_refused(tmp_path: Path, change: dict,
                                                           message: str) -> None:
    doc = {"kind": contracts.CAPTIONS_KIND, "version": 1, "count": 2, "num_shards": 1,
           "seed": 0, "source": {}, "summary": {}, "config_fingerprint": "x",
           "shards": [{"index": 0, "path": contracts.part_name(0), "first_caption_id": 0,
                       "num_captions": 2, "sha256": "ab" * 32, "bytes": 10}]}
    contracts.load_captions_manifest(str(_json(tmp_path / "manifest.json", doc)))
    _json(tmp_path / "manifest.json", {**doc, **change})
    with pytest.raises(InputError, match=f"manifest.json: {message}$"):
        contracts.load_captions_manifest(str(tmp_path))


def test_a_shard_record_with_a_count_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    bad = _json(tmp_path / "shard-000000.json", {"tar": "shard-000000.tar", "num_captions": "2",
                                                 "num_samples": 4, "images_per_caption": 2})
    with pytest.raises(InputError, match="field num_captions: got '2', expected an integer"):
        contracts.shard_ref(str(tmp_path), str(bad), verify=False)


def _json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path
