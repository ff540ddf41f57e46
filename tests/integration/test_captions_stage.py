"""The caption stage end to end: every input layout from a local folder and from the GCS
emulator, globs and folders, bad input leaving nothing under ``out`` (also on GCS), the CLI in a
subprocess (success and every user error), 100k+ rows streamed in bounded memory, and the
bounds: more captions than the synthetic lists can make fails at once, and spill files are
removed when the stage fails, is interrupted (SIGINT) or terminated (SIGTERM).

The unit tests of the parts (cleaning, sampler, readers, synthetic source) and the local stage
checks (determinism, rerun, overwrite) live in tests/unit/test_captions.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from stablerep import storage
from stablerep.captions import make_captions
from stablerep.captions import stage as stage_module
from stablerep.captions.clean import normalise
from stablerep.captions.sample import BucketSampler
from stablerep.captions.synthetic import SyntheticSource, synthetic_rows
from stablerep.config import CaptionsConfig, SyntheticCaptionsConfig
from stablerep.contracts import load_captions_manifest
from stablerep.errors import StablerepError

pytestmark = pytest.mark.integration

# Raw captions as a data set would hold them (odd whitespace included), and what survives.
RAW = [
    "a dog running on the beach",
    "  two cats  sleeping on a sofa ",
    "a red car parked in the street",
    "A bowl of fresh fruit, with apples",  # a comma: quoted in CSV
    "mountains at sunset\u00a0 over a lake",
    'a sign that says "open"',  # quotes: escaped in CSV and JSON
    "a bicycle leaning against a wall",
]
EXPECTED = {" ".join(c.split()) for c in RAW}


# ---------------------------------------------------------------------------- layouts


def _cc3m(captions: list[str]) -> bytes:
    return "".join(f"{c}\thttps://img.example/{i}.jpg\n" for i, c in enumerate(captions)).encode()


def _cc12m(captions: list[str]) -> bytes:
    return "".join(f"https://img.example/{i}.jpg\t{c}\n" for i, c in enumerate(captions)).encode()


def _tsv_header(captions: list[str]) -> bytes:
    return ("url\tcaption\tsimilarity\n" + "".join(
        f"https://img.example/{i}.jpg\t{c}\t0.3\n" for i, c in enumerate(captions))).encode()


def _csv(captions: list[str]) -> bytes:
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "text", "url"])
    writer.writerows([i, c, f"https://img.example/{i}.jpg"] for i, c in enumerate(captions))
    return buf.getvalue().encode()


def _jsonl(captions: list[str]) -> bytes:
    return "".join(json.dumps({"caption": c, "key": f"{i:09d}"}) + "\n"
                   for i, c in enumerate(captions)).encode()


def _parquet(captions: list[str], column: str = "TEXT") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"URL": [f"u{i}" for i in range(len(captions))], column: captions,
                             "WIDTH": list(range(len(captions)))}), buf)
    return buf.getvalue()


def _txt(captions: list[str]) -> bytes:
    return ("\n".join(captions) + "\n").encode()


def _redcaps(captions: list[str]) -> bytes:
    return json.dumps({
        "info": {"subreddit": "itookapicture", "year": 2020},
        "annotations": [{"image_id": f"i{i}", "author": "u", "url": f"https://i.redd.it/{i}.jpg",
                         "raw_caption": c.upper(), "caption": c, "subreddit": "itookapicture"}
                        for i, c in enumerate(captions)],
    }).encode()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


# (file name, bytes of the file, config overrides, the layout auto-detection must find)
LAYOUTS: list[tuple[str, Callable[[list[str]], bytes], dict, str]] = [
    ("cc3m.tsv", _cc3m, {}, "cc3m"),
    ("cc3m.tsv.gz", lambda c: _gz(_cc3m(c)), {}, "cc3m"),
    ("cc12m.tsv", _cc12m, {}, "cc12m"),
    ("cc12m.tsv.zst", lambda c: _zst(_cc12m(c)), {}, "cc12m"),
    ("cc12m-explicit.tsv", _cc12m, {"format": "cc12m"}, "cc12m"),
    ("laion.tsv", _tsv_header, {}, "tsv"),
    ("meta.csv", _csv, {"column": "text"}, "csv"),
    ("meta.csv.gz", lambda c: _gz(_csv(c)), {"column": "text"}, "csv"),
    ("caps.jsonl", _jsonl, {}, "jsonl"),
    ("caps.jsonl.zst", lambda c: _zst(_jsonl(c)), {}, "jsonl"),
    ("laion.parquet", _parquet, {"column": "TEXT"}, "parquet"),
    ("caps.txt", _txt, {}, "txt"),
    ("caps.txt.gz", lambda c: _gz(_txt(c)), {}, "txt"),
    ("caps.txt.zst", lambda c: _zst(_txt(c)), {}, "txt"),
    ("captions.lst", _txt, {"format": "txt"}, "txt"),
    ("redcaps_2020.json", _redcaps, {}, "redcaps"),
    ("redcaps_2020.json.gz", lambda c: _gz(_redcaps(c)), {}, "redcaps"),
]


@pytest.fixture(params=["local", "gcs"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A data folder: a local path, or a prefix in a fresh bucket on the GCS emulator."""
    if request.param == "local":
        return str(tmp_path / "data")
    return request.getfixturevalue("gcs_bucket") + "/data"


def _files_cfg(inputs: list[str], **kwargs) -> CaptionsConfig:
    return CaptionsConfig(source="files", inputs=inputs, **kwargs)


def _published(out: str) -> list[str]:
    """What a reader sees under ``out`` (an empty list when the folder does not exist)."""
    fs, path = storage.filesystem(out)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return [storage.name(p) for p in fs.find(path)]


def _captions_of(out: str) -> list[tuple[int, str, str]]:
    manifest = load_captions_manifest(out)
    table = pa.concat_tables(manifest.read_shard(i) for i in range(manifest.num_shards))
    return list(zip(table["caption_id"].to_pylist(), table["caption"].to_pylist(),
                    table["source"].to_pylist(), strict=True))


@pytest.mark.parametrize(("name", "build", "overrides", "detected"), LAYOUTS,
                         ids=[layout[0] for layout in LAYOUTS])
def test_every_layout(root: str, name: str, build, overrides: dict, detected: str) -> None:
    uri = storage.join(root, "raw", name)
    storage.write_bytes(uri, build(RAW))
    out = storage.join(root, "captions")
    manifest = make_captions(_files_cfg([uri], num_shards=2, **overrides), out)
    assert manifest.count == len(RAW)
    assert manifest.source["formats"] == {detected: 1}
    rows = _captions_of(out)
    assert [i for i, _, _ in rows] == list(range(len(RAW)))
    assert {c for _, c, _ in rows} == EXPECTED
    assert {s for _, _, s in rows} == {uri}
    assert sorted(_published(out)) == ["config.yaml", "manifest.json", "part-000000.parquet",
                                       "part-000001.parquet"]


def test_glob_and_folder_of_many_files(root: str) -> None:
    captions = [f"photo number {i} of a busy street" for i in range(120)]
    for i in range(6):  # 20 captions per file, each file also repeats one of the others'
        chunk = captions[i * 20:(i + 1) * 20] + [captions[(i * 20 + 25) % 120].upper()]
        storage.write_bytes(storage.join(root, "many", f"part-{i:03d}.txt.gz"), _gz(_txt(chunk)))
    storage.write_bytes(storage.join(root, "many", "README.md"), b"not captions\n")
    mixed = storage.join(root, "mixed")
    storage.write_bytes(storage.join(mixed, "a.tsv"), _cc3m(captions[:40]))
    storage.write_bytes(storage.join(mixed, "sub", "b.jsonl.zst"), _zst(_jsonl(captions[40:80])))
    storage.write_bytes(storage.join(mixed, "sub", "c.parquet"), _parquet(captions[80:], "caption"))

    globbed = make_captions(_files_cfg([storage.join(root, "many", "*.txt.gz")], num_shards=5,
                                       num_captions=100), storage.join(root, "out-glob"))
    assert globbed.source["files"] == 6
    assert globbed.summary["rows_read"] == 126
    assert globbed.summary["dropped"]["duplicate"] == 6
    assert globbed.summary["kept"] == 120
    assert [s.num_captions for s in globbed.shards] == [20] * 5

    folder = make_captions(_files_cfg([mixed], num_shards=3), storage.join(root, "out-folder"))
    assert folder.source["files"] == 3
    assert folder.source["formats"] == {"cc3m": 1, "jsonl": 1, "parquet": 1}
    assert folder.count == 120
    assert {c for _, c, _ in _captions_of(storage.join(root, "out-folder"))} == set(captions)


# ---------------------------------------------------------------------------- bad input (library)


def _setup_bad(root: str, case: str) -> tuple[list[str], dict]:
    raw = storage.join(root, "raw")
    good = storage.join(raw, "good.tsv")
    storage.write_bytes(good, _cc3m(RAW))
    if case == "missing file":
        return [storage.join(raw, "missing.tsv")], {}
    if case == "missing bucket":
        gone = "gs://no-such-bucket-4f1c9" if root.startswith("gs://") else "/no/such/folder"
        return [f"{gone}/raw/a.tsv"], {}
    if case == "glob matches nothing":
        return [storage.join(raw, "*.parquet")], {}
    if case == "missing column":
        storage.write_bytes(storage.join(raw, "a.csv"), _csv(RAW))
        return [storage.join(raw, "a.csv")], {}  # column defaults to "caption"; it is "text"
    if case == "empty source":
        storage.write_bytes(storage.join(raw, "empty.jsonl"), b"")
        return [storage.join(raw, "empty.jsonl")], {}
    if case == "not gzip":
        storage.write_bytes(storage.join(raw, "a.tsv.gz"), _cc3m(RAW))
        return [good, storage.join(raw, "a.tsv.gz")], {}
    if case == "truncated zstd":
        storage.write_bytes(storage.join(raw, "a.txt.zst"), _zst(_txt(RAW * 50))[:-9])
        return [good, storage.join(raw, "a.txt.zst")], {}
    if case == "too few captions":
        return [good], {"num_captions": 8}
    if case == "more shards than captions":
        return [good], {"num_shards": 8}
    raise AssertionError(case)


BAD_CASES = {
    "missing file": "missing.tsv: no such file",
    "missing bucket": "no such file, folder or bucket",
    "glob matches nothing": "the pattern matches no file",
    "missing column": "no column 'caption'; the columns are id, text, url",
    "empty source": "the source holds no captions",
    "not gzip": "a.tsv.gz: cannot read this gzip-compressed",
    "truncated zstd": "a.txt.zst: cannot read this zstd-compressed",
    "too few captions": "asked for 8 captions but .* has only 7 ",
    "more shards than captions": "captions.num_shards: got 8 for 7 captions",
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_publishes_nothing(root: str, case: str) -> None:
    inputs, kwargs = _setup_bad(root, case)
    out = storage.join(root, "captions")
    with pytest.raises(StablerepError, match=BAD_CASES[case]) as err:
        make_captions(_files_cfg(inputs, **kwargs), out)
    assert "\n" not in str(err.value)
    assert _published(out) == []


def test_rerun_and_overwrite_on_gcs(gcs_bucket: str) -> None:
    uri = storage.join(gcs_bucket, "raw", "cc3m.tsv")
    storage.write_bytes(uri, _cc3m([f"a caption about thing {i}" for i in range(40)]))
    out = storage.join(gcs_bucket, "run", "captions")
    make_captions(_files_cfg([uri], num_shards=4), out)
    fs, _ = storage.filesystem(out)

    def generations() -> dict[str, str]:
        fs.invalidate_cache()
        return {storage.name(p): fs.info(p)["generation"] for p in fs.find(out)}

    before = generations()
    assert len(before) == 6  # 4 parts, config.yaml, manifest.json
    again = make_captions(_files_cfg([uri], num_shards=4, spill_rows=5000), out)
    assert again.count == 40
    assert generations() == before  # a rerun rewrites nothing

    with pytest.raises(StablerepError, match="another config"):
        make_captions(_files_cfg([uri], num_shards=2), out)
    assert generations() == before

    replaced = make_captions(_files_cfg([uri], num_shards=2, overwrite=True), out)
    assert replaced.num_shards == 2
    assert sorted(generations()) == ["config.yaml", "manifest.json", "part-000000.parquet",
                                     "part-000001.parquet"]
    assert [i for i, _, _ in _captions_of(out)] == list(range(40))


# ---------------------------------------------------------------------------- the CLI


def _cli(*args: str, entry_point: bool = False) -> subprocess.CompletedProcess:
    """Run ``stablerep captions ...`` in a subprocess (environment inherited: the emulator)."""
    script = Path(sys.executable).parent / "stablerep"
    cmd = [str(script)] if entry_point else [sys.executable, "-m", "stablerep.cli"]
    return subprocess.run([*cmd, "captions", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_files_end_to_end(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.tsv").write_bytes(_cc3m(RAW[:4]))
    (raw / "b.tsv.gz").write_bytes(_gz(_cc3m(RAW[4:] + RAW[:1])))  # one duplicate
    out = tmp_path / "out"
    result = _cli("--input", str(raw / "*.tsv*"), "--num-captions", "6", "--num-shards", "3",
                  "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"captions: 6 captions written to {out}"
    assert f"output      {out}/manifest.json" in result.stdout
    assert "duplicate 1" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["num_shards"] == 3
    assert manifest["summary"]["rows_read"] == 8
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]

    before = (out / "manifest.json").read_bytes()
    rerun = _cli("--input", str(raw / "*.tsv*"), "--num-captions", "6", "--num-shards", "3",
                 "--seed", "3", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert "already holds this config's captions" in rerun.stderr
    assert (out / "manifest.json").read_bytes() == before

    fewer = _cli("--input", str(raw / "*.tsv*"), "--num-captions", "50", "--allow-fewer",
                 "--out", str(tmp_path / "fewer"))
    assert fewer.returncode == 0, fewer.stderr
    assert "captions: 7 captions written to" in fewer.stdout


def test_cli_synthetic_with_entry_point_and_data_root(tmp_path: Path) -> None:
    result = _cli("--num-captions", "50", "--num-shards", "2", "--data-root", str(tmp_path),
                  entry_point=True)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "captions"
    assert f"captions: 50 captions written to {out}" in result.stdout
    assert (out / "manifest.json").exists()
    assert load_captions_manifest(str(out)).source["kind"] == "synthetic"


def test_cli_recipe_inputs_and_output_on_gcs(gcs_bucket: str) -> None:
    storage.write_bytes(storage.join(gcs_bucket, "raw", "cc12m.tsv.zst"), _zst(_cc12m(RAW)))
    recipe = storage.join(gcs_bucket, "recipes", "cc12m.yaml")
    storage.write_text(recipe, (
        f"data_root: {gcs_bucket}/ignored\n"
        "captions:\n"
        "  source: files\n"
        f"  inputs: ['{gcs_bucket}/raw/*.zst']\n"
        "  num_captions: 5\n"))
    result = _cli("--config", recipe, "--set", "captions.num_shards=2", "--data-root",
                  f"{gcs_bucket}/run")
    assert result.returncode == 0, result.stderr
    out = f"{gcs_bucket}/run/captions"
    assert f"captions: 5 captions written to {out}" in result.stdout
    assert sorted(_published(out)) == ["config.yaml", "manifest.json", "part-000000.parquet",
                                       "part-000001.parquet"]
    rows = _captions_of(out)
    assert len(rows) == 5 and {c for _, c, _ in rows} <= EXPECTED


# (case, arguments after the inputs, expected text in the error line, out on GCS?)
CLI_BAD = [
    ("missing file", [], "missing.tsv: no such file", False),
    ("missing bucket", [], "no-such-bucket-4f1c9/raw/a.tsv: no such file", True),
    ("missing column", [], "the columns are id, text, url", False),
    ("empty source", [], "the source holds no captions", True),
    ("not gzip", [], "a.tsv.gz: cannot read this gzip-compressed tsv file", False),
    ("truncated zstd", [], "a.txt.zst: cannot read this zstd-compressed txt file", True),
    ("too few captions", [], "has only 7 after cleaning and dedupe", False),
    ("shards zero", ["--num-shards", "0"], "captions.num_shards: got 0, expected a value >= 1",
     False),
    ("shards negative", ["--num-shards", "-3"], "captions.num_shards: got -3", True),
    ("unknown format", ["--format", "xml"], "captions.format: got 'xml'", False),
]


@pytest.mark.parametrize(("case", "extra", "expected", "gcs_out"), CLI_BAD,
                         ids=[c[0] for c in CLI_BAD])
def test_cli_bad_input(request: pytest.FixtureRequest, tmp_path: Path, case: str,
                       extra: list[str], expected: str, gcs_out: bool) -> None:
    if case.startswith(("shards", "unknown")):
        inputs, kwargs = _setup_bad(str(tmp_path / "data"), "too few captions")
        kwargs = {}
    else:
        root = request.getfixturevalue("gcs_bucket") + "/data" if gcs_out else str(tmp_path)
        inputs, kwargs = _setup_bad(root, case)
    out = (request.getfixturevalue("gcs_bucket") + "/out") if gcs_out else str(tmp_path / "out")
    args = [a for uri in inputs for a in ("--input", uri)]
    if "num_captions" in kwargs:
        args += ["--num-captions", str(kwargs["num_captions"])]
    result = _cli(*args, *extra, "--out", out)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert expected in errors[0]
    assert "Traceback" not in result.stderr
    assert "captions written" not in result.stdout
    assert _published(out) == []


# ---------------------------------------------------------------------------- bounded memory


class _RecordingSampler(BucketSampler):
    """The stage's sampler, remembered so the test can read its spill statistics."""

    made: list[BucketSampler] = []

    def __post_init__(self) -> None:
        super().__post_init__()
        _RecordingSampler.made.append(self)


ROWS = 100_000
SPILL_ROWS = 10_000
# Peak traced Python memory allowed while 100k rows stream through the stage with spills every
# 10k rows. Measured here (tracemalloc, Python 3.11, imports warmed up): about 3 MiB with
# spill_rows=10_000, against about 19 MiB for the same run with spill_rows=1_000_000, which
# buffers all 100k rows at once (~170 bytes of Python objects per row: a tuple, an int key, a
# ~50-char str, a list slot). 10 MiB leaves 3x headroom over a spilling run and fails well
# before a run that holds every row (or reads the whole file into memory) would pass. Arrow
# buffers (spill files, sorted runs) are not Python objects and are not traced; they live on
# disk and are read back one bucket at a time.
PEAK_BOUND = 10 * 2**20


def _write_cc3m_gz(path: Path, rows) -> None:
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i, (caption, _) in enumerate(rows):
            f.write(f"{caption}\thttps://img.example/{i}.jpg\n")


def test_100k_rows_stream_in_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    syn = SyntheticCaptionsConfig(num_rows=ROWS)
    rows, _ = synthetic_rows(syn, ROWS, seed=1)
    _write_cc3m_gz(tmp_path / "cc3m.tsv.gz", rows)
    cfg = _files_cfg([str(tmp_path / "cc3m.tsv.gz")], num_captions=2000, num_shards=4, seed=1,
                     spill_rows=SPILL_ROWS, work_dir=str(tmp_path))
    # A small untraced run first: the lazy imports of a first run (pyarrow.parquet, ...)
    # would otherwise be traced too (about 25 MiB of module objects).
    _write_cc3m_gz(tmp_path / "warm.tsv.gz", [("a warm-up caption", "")] * 10)
    make_captions(_files_cfg([str(tmp_path / "warm.tsv.gz")]), str(tmp_path / "warm"))
    _RecordingSampler.made.clear()
    monkeypatch.setattr(stage_module, "BucketSampler", _RecordingSampler)

    tracemalloc.start()
    try:
        manifest = make_captions(cfg, str(tmp_path / "out"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    sampler = _RecordingSampler.made[-1]
    print(f"peak traced memory {peak / 2**20:.1f} MiB, {sampler.spilled_files} spills, "
          f"peak rows buffered {sampler.peak_rows_in_memory}")
    assert manifest.summary["rows_read"] == ROWS
    assert manifest.count == 2000
    kept_before_dedupe = ROWS - manifest.summary["dropped_total"] + \
        manifest.summary["dropped"]["duplicate"]
    assert sampler.spilled_files == kept_before_dedupe // SPILL_ROWS
    assert sampler.peak_rows_in_memory <= SPILL_ROWS
    assert peak < PEAK_BOUND, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("stablerep-captions-")]
    assert len({normalise(c) for _, c, _ in _captions_of(str(tmp_path / "out"))}) == 2000


def test_synthetic_source_spills_100k_rows(tmp_path: Path, monkeypatch) -> None:
    _RecordingSampler.made.clear()
    monkeypatch.setattr(stage_module, "BucketSampler", _RecordingSampler)
    cfg = CaptionsConfig(source="synthetic", num_captions=3000, num_shards=3, seed=2,
                         spill_rows=SPILL_ROWS, work_dir=str(tmp_path),
                         synthetic=SyntheticCaptionsConfig(num_rows=ROWS))
    manifest = make_captions(cfg, str(tmp_path / "out"))
    sampler = _RecordingSampler.made[-1]
    assert manifest.summary["rows_read"] == ROWS and manifest.count == 3000
    assert sampler.spilled_files == ROWS // SPILL_ROWS
    assert sampler.peak_rows_in_memory <= SPILL_ROWS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("stablerep-captions-")]


# ---------------------------------------------------------------------------- bounded by what exists


def test_cli_more_captions_than_can_exist_fails_at_once(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    capacity = SyntheticSource.from_config(SyntheticCaptionsConfig()).capacity()
    start = time.monotonic()
    result = _cli("--num-captions", str(10**23), "--work-dir", str(work), "--out",
                  str(tmp_path / "out"))
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"asked for 100,000,000,000,000,000,000,000 captions, but the synthetic source can "
            f"make at most {capacity:,} distinct ones") in errors[0]
    assert "templates (captions.synthetic.templates_uri)" in errors[0]
    assert elapsed < 20, f"took {elapsed:.1f}s"  # interpreter start included; no drawing
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()


def _spills(work: Path) -> list[Path]:
    return [p for p in work.rglob("*") if p.is_file()]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_cli_stopped_by_a_signal_leaves_no_spill(tmp_path: Path, signum: int,
                                                 status: int) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # Five times more captions than the ~15 s a quiet machine needs for 300,000: the signal
    # lands seconds after the first spill, long before the run could end, however fast it is.
    cmd = [sys.executable, "-m", "stablerep.cli", "captions", "--num-captions", "1500000",
           "--set", "captions.spill_rows=1000", "--work-dir", str(work), "--out",
           str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith("spill-") for p in _spills(work)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no spill file appeared"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _spills(work) == [] and list(work.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_error_after_spilling_removes_the_spill(tmp_path: Path, monkeypatch) -> None:
    rows, _ = synthetic_rows(SyntheticCaptionsConfig(num_rows=5000), 5000, seed=3)
    _write_cc3m_gz(tmp_path / "a.tsv.gz", rows)
    (tmp_path / "b.txt.zst").write_bytes(_zst(_txt(RAW * 50))[:-9])  # fails at its end
    work = tmp_path / "work"
    _RecordingSampler.made.clear()
    monkeypatch.setattr(stage_module, "BucketSampler", _RecordingSampler)
    cfg = _files_cfg([str(tmp_path / "a.tsv.gz"), str(tmp_path / "b.txt.zst")],
                     spill_rows=1000, work_dir=str(work))
    with pytest.raises(StablerepError, match="b.txt.zst: cannot read this zstd-compressed"):
        make_captions(cfg, str(tmp_path / "out"))
    assert _RecordingSampler.made[-1].spilled_files >= 4  # a.tsv.gz was spilled before b failed
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()
