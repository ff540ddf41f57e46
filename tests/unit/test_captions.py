"""Unit tests of the caption stage's parts: cleaning, the dedupe key, shard sizes, the bucketed
sampler (in memory and spilled), the file readers on small local files, and the synthetic
source. Everything here is local and runs in a few seconds; servers and subprocesses live in
tests/integration/test_captions_stage.py.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from stablerep.captions import sources
from stablerep.captions.clean import DROP_REASONS, clean, normalise
from stablerep.captions.sample import BucketSampler, caption_key
from stablerep.captions.stage import shard_sizes
from stablerep.captions.synthetic import SyntheticSource, synthetic_rows, with_article
from stablerep.config import CaptionsConfig, ConceptSource, SyntheticCaptionsConfig, from_dict
from stablerep.errors import ConfigError, InputError, StablerepError

CAPTIONS = [
    "a dog running on the beach",
    "two cats sleeping on a sofa",
    "a red car parked in the street",
    "a bowl of fresh fruit",
    "mountains at sunset",
]


def _read(path: Path, *, fmt: str = "auto", column: str = "caption",
          compression: str = "infer") -> list[str | None]:
    spec = sources.resolve(str(path), fmt=fmt, compression=compression, column=column)
    return list(sources.read_captions(spec))


# ---------------------------------------------------------------------------- clean


def test_clean_strips_and_collapses_whitespace() -> None:
    assert clean("  a  dog\t\ton the\nbeach \u00a0", min_chars=1, max_chars=100) == (
        "a dog on the beach", None)


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "invalid_utf8"),
    ("", "empty"),
    (" \t\n\u3000", "empty"),
    ("abcd", "too_short"),
    ("x" * 11, "too_long"),
])
def test_clean_drop_reasons(raw: str | None, reason: str) -> None:
    assert clean(raw, min_chars=5, max_chars=10) == (None, reason)
    assert reason in DROP_REASONS


def test_clean_length_bounds_are_inclusive_after_cleaning() -> None:
    assert clean("  abcde  ", min_chars=5, max_chars=10) == ("abcde", None)
    assert clean("a" * 10, min_chars=5, max_chars=10) == ("a" * 10, None)
    # Length is judged on the cleaned text: 3 chars + collapsed spaces = 5.
    assert clean("a   b   c", min_chars=5, max_chars=10) == ("a b c", None)


def test_normalise_case_whitespace_nfkc() -> None:
    assert normalise("  A  Dog\tON the  Beach ") == "a dog on the beach"
    assert normalise("\uff21 \ufb01sh") == "a fish"  # full-width A, the fi ligature
    assert normalise("Stra\u00dfe") == normalise("STRASSE")  # casefold, not lower
    assert normalise("cafe\u0301") == normalise("caf\u00e9")  # composed = decomposed


# ---------------------------------------------------------------------------- shard sizes


@pytest.mark.parametrize(("total", "k"), [(10, 3), (10, 10), (7, 1), (1000, 7), (5, 4),
                                          (1_000_003, 256)])
def test_shard_sizes_near_equal(total: int, k: int) -> None:
    sizes = shard_sizes(total, k)
    assert len(sizes) == k
    assert sum(sizes) == total
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # larger shards first: ranges stay simple


@pytest.mark.parametrize("k", [0, -1, -8])
def test_num_shards_must_be_positive(k: int) -> None:
    with pytest.raises(ConfigError, match="captions.num_shards"):
        CaptionsConfig(num_captions=10, num_shards=k)
    with pytest.raises(StablerepError, match="captions.num_shards"):
        from_dict(CaptionsConfig, {"num_captions": 10, "num_shards": k}, "captions")


# ---------------------------------------------------------------------------- sampler


def _sampled(rows: list[tuple[str, str]], tmp_path: Path, **kwargs) -> tuple[list, BucketSampler]:
    sampler = BucketSampler(work_dir=tmp_path / "work", **{"seed": 3, **kwargs})
    for caption, source in rows:
        sampler.add(caption, source)
    sampler.finish()
    return list(sampler), sampler


def _rows(n: int, dup_every: int = 0) -> list[tuple[str, str]]:
    rows = [(f"caption number {i} of the set", f"src{i % 3}") for i in range(n)]
    if dup_every:
        rows += [(f"  CAPTION number {i} of  the set", "dup") for i in range(0, n, dup_every)]
    return rows


def test_caption_key_depends_on_normalised_text_and_seed() -> None:
    assert caption_key("A  Dog", 1) == caption_key("a dog", 1)
    assert caption_key("a dog", 1) != caption_key("a dog", 2)
    assert caption_key("a dog", 1) != caption_key("a cat", 1)
    assert 0 <= caption_key("a dog", -5) < 2**64


def test_sampler_yields_in_key_order_and_dedupes(tmp_path: Path) -> None:
    out, sampler = _sampled(_rows(500, dup_every=10), tmp_path)
    assert sampler.duplicates == 50
    assert sampler.unique == len(out) == 500
    keys = [caption_key(c, 3) for c, _ in out]
    assert keys == sorted(keys)
    assert {normalise(c) for c, _ in out} == {normalise(c) for c, _ in _rows(500)}
    assert sampler.spilled_files == 0  # small input stays in memory
    assert not (tmp_path / "work").exists()


def test_sampler_keeps_the_same_duplicate_whatever_the_order(tmp_path: Path) -> None:
    rows = [("A dog on the beach", "b.tsv"), ("a dog on the  beach", "a.tsv"),
            ("a dog on the beach", "c.tsv"), ("a cat on a mat", "a.tsv")]
    first, _ = _sampled(rows, tmp_path / "1")
    second, _ = _sampled(list(reversed(rows)), tmp_path / "2")
    assert first == second
    assert len(first) == 2
    # Among duplicates the smallest (caption, source) wins: "A dog ..." sorts first.
    assert ("A dog on the beach", "b.tsv") in first


def test_sampler_without_dedupe_keeps_duplicates(tmp_path: Path) -> None:
    out, sampler = _sampled(_rows(100, dup_every=5), tmp_path, dedupe=False)
    assert len(out) == 120
    assert sampler.duplicates == 0


def test_sampler_output_does_not_depend_on_input_order(tmp_path: Path) -> None:
    rows = _rows(2000, dup_every=7)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    a, _ = _sampled(rows, tmp_path / "a")
    b, _ = _sampled(shuffled, tmp_path / "b")
    assert a == b


def test_sampler_spill_path_matches_in_memory(tmp_path: Path) -> None:
    rows = _rows(5000, dup_every=3)  # duplicates land in different spill chunks
    random.Random(1).shuffle(rows)
    in_memory, mem_sampler = _sampled(rows, tmp_path / "mem", spill_rows=1_000_000)
    spilled, sampler = _sampled(rows, tmp_path / "spill", spill_rows=700)
    assert sampler.spilled_files > 0
    assert sampler.peak_rows_in_memory <= 700
    assert mem_sampler.spilled_files == 0
    assert mem_sampler.peak_rows_in_memory == len(rows)
    assert spilled == in_memory
    assert sampler.duplicates == mem_sampler.duplicates == 1667
    # finish() merged the spill files into sorted runs and deleted them.
    work = tmp_path / "spill" / "work"
    assert len(list(work.iterdir())) < sampler.spilled_files
    sampler.discard()
    assert not any(work.iterdir())


def test_sampler_seed_changes_order(tmp_path: Path) -> None:
    a, _ = _sampled(_rows(300), tmp_path / "a", seed=1)
    b, _ = _sampled(_rows(300), tmp_path / "b", seed=2)
    assert sorted(a) == sorted(b)
    assert a != b


# ---------------------------------------------------------------------------- sources


def test_split_suffix() -> None:
    assert sources.split_suffix("gs://b/x/cc3m.train.tsv.gz") == (".tsv", "gzip")
    assert sources.split_suffix("a.JSONL.ZST") == (".jsonl", "zstd")
    assert sources.split_suffix("/data/file.parquet") == (".parquet", None)
    assert sources.split_suffix("noext") == ("", None)


def test_cc3m_and_cc12m_headerless_tsv(tmp_path: Path) -> None:
    (tmp_path / "cc3m.tsv").write_text(
        "".join(f"{c}\thttps://img/{i}.jpg\n" for i, c in enumerate(CAPTIONS)))
    (tmp_path / "cc12m.tsv").write_text(
        "".join(f"http://img/{i}.jpg\t{c}\n" for i, c in enumerate(CAPTIONS)))
    assert sources.resolve(str(tmp_path / "cc3m.tsv"), fmt="auto", compression="infer",
                           column="caption").format == "cc3m"
    assert sources.resolve(str(tmp_path / "cc12m.tsv"), fmt="auto", compression="infer",
                           column="caption").format == "cc12m"
    assert _read(tmp_path / "cc3m.tsv") == CAPTIONS
    assert _read(tmp_path / "cc12m.tsv") == CAPTIONS
    assert _read(tmp_path / "cc3m.tsv", fmt="cc3m") == CAPTIONS
    # Explicit formats override the sniff (reading CC12M as CC3M gives the URLs).
    assert _read(tmp_path / "cc12m.tsv", fmt="cc3m")[0] == "http://img/0.jpg"


def test_tsv_with_header_is_sniffed_by_column(tmp_path: Path) -> None:
    path = tmp_path / "meta.tsv"
    path.write_text("url\tTEXT\n" + "".join(f"http://x/{i}\t{c}\n" for i, c in enumerate(CAPTIONS)))
    assert sources.resolve(str(path), fmt="auto", compression="infer",
                           column="TEXT").format == "tsv"
    assert _read(path, column="TEXT") == CAPTIONS


def test_tsv_sniff_failure_names_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "odd.tsv"
    path.write_text("foo\tbar\nbaz\tqux\n")
    with pytest.raises(InputError, match=r"no header column 'caption'.*cc3m or cc12m"):
        _read(path)


def test_csv_named_column_with_quotes(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('id,text\n1,"a dog, running"\n2,"a ""quoted"" cat"\n3,plain caption\n')
    assert _read(path, column="text") == ["a dog, running", 'a "quoted" cat', "plain caption"]


@pytest.mark.parametrize(("name", "content", "column", "listed"), [
    ("c.csv", "id,text,url\n1,a dog,http://x\n", "caption", "id, text, url"),
    ("h.tsv", "id\ttext\n1\ta dog\n", "caption", None),  # sniff: no such header
    ("t.tsv", "id\ttext\n1\ta dog\n", "caption", "id, text"),  # explicit tsv
    ("j.jsonl", '{"text": "a dog", "url": "u"}\n', "caption", "text, url"),
])
def test_missing_column_lists_the_columns(tmp_path: Path, name: str, content: str,
                                          column: str, listed: str | None) -> None:
    path = tmp_path / name
    path.write_text(content)
    fmt = "tsv" if name == "t.tsv" else "auto"
    with pytest.raises(InputError) as err:
        _read(path, column=column, fmt=fmt)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "'caption'" in message
    if listed:
        assert listed in message
    else:
        assert "['id', 'text']" in message


def test_parquet_named_column_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"url": [f"u{i}" for i in range(5)], "TEXT": CAPTIONS}), path)
    assert _read(path, column="TEXT") == CAPTIONS
    with pytest.raises(InputError, match="no column 'caption'; the columns are url, TEXT"):
        _read(path)


def test_parquet_binary_and_bad_utf8_string_columns(tmp_path: Path) -> None:
    raw = [b"a good caption", b"bad \xff bytes here", None]
    pq.write_table(pa.table({"caption": pa.array(raw, pa.binary())}), tmp_path / "b.parquet")
    # A string column holding invalid UTF-8 (as non-Arrow writers can produce).
    unchecked = pa.array(raw, pa.binary()).view(pa.string())
    pq.write_table(pa.table({"caption": unchecked}), tmp_path / "s.parquet")
    assert _read(tmp_path / "b.parquet") == ["a good caption", None, ""]
    assert _read(tmp_path / "s.parquet") == ["a good caption", None, ""]


def test_jsonl_and_txt(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"caption": c, "n": i}) + "\n" for i, c in enumerate(CAPTIONS))
        + "\n" + json.dumps({"n": 9}) + "\n" + json.dumps({"caption": 12345}) + "\n")
    (tmp_path / "a.txt").write_text("\n".join(CAPTIONS) + "\n")
    assert _read(tmp_path / "a.jsonl") == [*CAPTIONS, "", "12345"]
    assert _read(tmp_path / "a.txt") == CAPTIONS


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"caption": "a dog"}\n[1, 2]\n')
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        _read(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"caption": "a dog"}\n{oops\n')
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        _read(tmp_path / "b.jsonl")


def test_redcaps_annotations(tmp_path: Path) -> None:
    doc = {"info": {"subreddit": "pics"},
           "annotations": [{"image_id": str(i), "caption": c} for i, c in enumerate(CAPTIONS)]}
    (tmp_path / "pics_2020.json").write_text(json.dumps(doc))
    assert _read(tmp_path / "pics_2020.json") == CAPTIONS
    (tmp_path / "other.json").write_text(json.dumps({"images": []}))
    with pytest.raises(InputError, match="no 'annotations' list"):
        _read(tmp_path / "other.json")


def test_invalid_utf8_is_yielded_as_invalid(tmp_path: Path) -> None:
    bad = b"caf\xe9 au lait \xff"
    (tmp_path / "a.txt").write_bytes(b"a fine caption\n" + bad + b"\nanother one\n")
    (tmp_path / "a.tsv").write_bytes(b"a fine caption\thttp://x/1\n" + bad + b"\thttp://x/2\n")
    (tmp_path / "a.csv").write_bytes(b"caption\na fine caption\n" + bad + b"\n")
    (tmp_path / "a.jsonl").write_bytes(b'{"caption": "a fine caption"}\n{"caption": "'
                                       + bad + b'"}\n')
    (tmp_path / "a.json").write_bytes(b'{"annotations": [{"caption": "a fine caption"}, '
                                      b'{"caption": "' + bad + b'"}]}')
    assert _read(tmp_path / "a.txt") == ["a fine caption", None, "another one"]
    for name in ("a.tsv", "a.csv", "a.jsonl", "a.json"):
        assert _read(tmp_path / name) == ["a fine caption", None], name


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_variants(tmp_path: Path, suffix: str) -> None:
    text = "".join(f"{c}\thttps://img/{i}.jpg\n" for i, c in enumerate(CAPTIONS)).encode()
    packed = gzip.compress(text) if suffix == ".gz" else zstandard.ZstdCompressor().compress(text)
    path = tmp_path / f"cc3m.tsv{suffix}"
    path.write_bytes(packed)
    assert _read(path) == CAPTIONS  # sniffed through the compression
    # An explicit compression works on a file without the suffix too.
    plain_name = tmp_path / "cc3m_packed.tsv"
    plain_name.write_bytes(packed)
    assert _read(plain_name, fmt="cc3m", compression={".gz": "gzip", ".zst": "zstd"}[suffix]) \
        == CAPTIONS


def test_zstd_many_frames(tmp_path: Path) -> None:
    cctx = zstandard.ZstdCompressor()
    lines = [f"caption number {i}" for i in range(30_000)]
    frames = [cctx.compress(("\n".join(lines[i:i + 7000]) + "\n").encode())
              for i in range(0, len(lines), 7000)]
    (tmp_path / "a.txt.zst").write_bytes(b"".join(frames))
    assert _read(tmp_path / "a.txt.zst") == lines


_NUMBERED = "".join(f"caption line {i}\n" for i in range(5000)).encode()


@pytest.mark.parametrize(("name", "content", "match"), [
    ("not.tsv.gz", b"a caption\thttp://x\n", "gzip-compressed tsv file.*BadGzipFile"),
    ("not.txt.gz", b"a caption\n", "gzip-compressed txt file.*BadGzipFile"),
    ("cut.txt.gz", gzip.compress(_NUMBERED)[:-50], "gzip-compressed.*EOFError"),
    ("not.jsonl.zst", b'{"caption": "x"}\n', "zstd-compressed"),
    ("cut.txt.zst", zstandard.ZstdCompressor().compress(_NUMBERED)[:-50],
     "zstd-compressed txt file.*truncated"),
    ("cut.tsv.zst", zstandard.ZstdCompressor().compress(b"a caption\thttp://x\n" * 5000)[:30],
     "zstd-compressed"),
    ("junk.parquet", b"PAR1 this is not parquet", "not a readable Parquet file"),
    ("junk.json", b"{not json", "not a RedCaps annotation JSON"),
], ids=["not.tsv.gz", "not.txt.gz", "cut.txt.gz", "not.jsonl.zst", "cut.txt.zst", "cut.tsv.zst",
        "junk.parquet", "junk.json"])
def test_unreadable_files_raise_input_error(tmp_path: Path, name: str, content: bytes,
                                            match: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        _read(tmp_path / name)
    assert "\n" not in str(err.value)


def test_unknown_suffix_asks_for_a_format(tmp_path: Path) -> None:
    (tmp_path / "captions.dat").write_text("a dog\n")
    with pytest.raises(InputError, match="set captions.format"):
        _read(tmp_path / "captions.dat")
    assert _read(tmp_path / "captions.dat", fmt="txt") == ["a dog"]


def test_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StablerepError, match="missing.txt"):
        _read(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------- synthetic


def _syn(**kwargs) -> SyntheticCaptionsConfig:
    return SyntheticCaptionsConfig(**kwargs)


def test_synthetic_rows_are_deterministic_under_the_seed() -> None:
    rows_a, described = synthetic_rows(_syn(), 3000, seed=7)
    rows_b, _ = synthetic_rows(_syn(), 3000, seed=7)
    rows_c, _ = synthetic_rows(_syn(), 3000, seed=8)
    a, b, c = list(rows_a), list(rows_b), list(rows_c)
    assert len(a) == 3000
    assert a == b
    assert a != c
    assert described["rows"] == 3000 and described["concepts"] == {"imagenet1k": 1000}
    assert {s for _, s in a} == {"synthetic:imagenet1k"}


def test_synthetic_weights_backgrounds_and_templates(tmp_path: Path) -> None:
    (tmp_path / "birds.txt").write_text("# birds\nrobin\neagle\n")
    (tmp_path / "tools.txt").write_text("hammer\nanvil\n")
    (tmp_path / "templates.txt").write_text("a photo of {a_concept}\n{concept} close up\n")
    cfg = _syn(concepts=[ConceptSource("birds", str(tmp_path / "birds.txt"), 3.0),
                         ConceptSource("tools", str(tmp_path / "tools.txt"), 1.0)],
               templates_uri=str(tmp_path / "templates.txt"), background_prob=0.0)
    rows, _ = synthetic_rows(cfg, 4000, seed=0)
    rows = list(rows)
    counts = {s: sum(1 for _, src in rows if src == s) for s in ("synthetic:birds",
                                                                 "synthetic:tools")}
    assert 2700 < counts["synthetic:birds"] < 3300  # weight 3:1
    assert {c for c, _ in rows} == {
        "a photo of a robin", "a photo of an eagle", "a photo of a hammer",
        "a photo of an anvil", "robin close up", "eagle close up", "hammer close up",
        "anvil close up"}
    cfg_bg = _syn(concepts=cfg.concepts, templates_uri=cfg.templates_uri, background_prob=1.0)
    assert all(", " in c for c, _ in synthetic_rows(cfg_bg, 100, seed=0)[0])


def test_synthetic_bad_lists(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("no placeholder here\n")
    with pytest.raises(InputError, match="neither"):
        SyntheticSource.from_config(_syn(templates_uri=str(tmp_path / "t.txt")))
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(InputError, match="list is empty"):
        SyntheticSource.from_config(_syn(concepts=[ConceptSource("x",
                                                                 str(tmp_path / "empty.txt"))]))
    with pytest.raises(InputError, match="unknown built-in"):
        SyntheticSource.from_config(_syn(concepts=[ConceptSource("x", "builtin:nope")]))


def test_with_article() -> None:
    assert with_article("apple") == "an apple"
    assert with_article("Eagle") == "an Eagle"
    assert with_article("tench") == "a tench"


# ---------------------------------------------------------------------------- the stage (local)


def _cc3m_lines(captions: list[str]) -> str:
    return "".join(f"{c}\thttps://img.example/{i}.jpg\n" for i, c in enumerate(captions))


def _many(n: int, start: int = 0) -> list[str]:
    return [f"a photo of object number {i} in a field" for i in range(start, start + n)]


def _files_cfg(inputs: list[str], **kwargs) -> CaptionsConfig:
    return CaptionsConfig(source="files", inputs=inputs, **kwargs)


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def _rows_of(out: Path) -> list[tuple[int, str]]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet")))
    return list(zip(table["caption_id"].to_pylist(), table["caption"].to_pylist(), strict=True))


def test_stage_writes_the_captions_contract(tmp_path: Path, monkeypatch) -> None:
    from stablerep import storage
    from stablerep.captions import make_captions
    from stablerep.contracts import load_captions_manifest

    noisy = [
        "  a dog   running on\u00a0the beach  ",  # kept, cleaned
        "A DOG running on the beach",  # duplicate (case / whitespace)
        "\uff21 dog running on the beach",  # duplicate after NFKC (full-width A)
        "",  # empty
        "   ",  # empty after strip
        "tiny",  # too short (< 5)
        "x" * 60,  # too long (max_chars 50)
    ] + _many(20)
    data = _cc3m_lines(noisy).encode() + b"caf\xe9 \xff bad bytes\thttp://x/bad.jpg\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cc3m.tsv").write_bytes(data)
    published: list[str] = []
    publish = storage.AtomicWrite.publish

    def record(self):
        publish(self)
        published.append(storage.name(self.uri))

    monkeypatch.setattr(storage.AtomicWrite, "publish", record)
    out = tmp_path / "out"
    manifest = make_captions(_files_cfg([str(tmp_path / "in" / "cc3m.tsv")], num_shards=3,
                                        max_chars=50, seed=5), str(out))

    assert published[-1] == "manifest.json"  # written last
    assert sorted(published[:3]) == [f"part-{i:06d}.parquet" for i in range(3)]
    assert manifest.count == 21
    assert manifest.summary == {
        "rows_read": 28,
        "dropped": {"invalid_utf8": 1, "empty": 2, "too_short": 1, "too_long": 1,
                    "duplicate": 2},
        "dropped_total": 7, "kept": 21, "sampled": 21, "shards": 3,
    }
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["count"] == 21 and doc["num_shards"] == 3 and doc["seed"] == 5
    assert doc["summary"] == manifest.summary
    assert [(s["first_caption_id"], s["num_captions"]) for s in doc["shards"]] == [
        (0, 7), (7, 7), (14, 7)]
    import hashlib

    for shard in doc["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
    assert (out / "config.yaml").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staged leftovers

    loaded = load_captions_manifest(str(out))
    tables = [loaded.read_shard(i) for i in range(loaded.num_shards)]
    assert all(t.schema.names == ["caption_id", "caption", "source"] for t in tables)
    assert str(tables[0].schema.field("caption_id").type) == "int64"
    rows = _rows_of(out)
    assert [i for i, _ in rows] == list(range(21))
    captions = [c for _, c in rows]
    # One of the three duplicates survives: the smallest cleaned text ("A" < "a" < "\uff21").
    assert "A DOG running on the beach" in captions
    assert set(captions) - {"A DOG running on the beach"} == set(_many(20))
    assert set(pa.concat_tables(tables)["source"].to_pylist()) == {
        str(tmp_path / "in" / "cc3m.tsv")}


def test_stage_same_seed_is_byte_identical(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    (tmp_path / "a.tsv").write_text(_cc3m_lines(_many(300)))
    cfg = _files_cfg([str(tmp_path / "a.tsv")], num_captions=200, num_shards=4, seed=11)
    make_captions(cfg, str(tmp_path / "o1"))
    make_captions(cfg, str(tmp_path / "o2"))
    assert _parts(tmp_path / "o1") == _parts(tmp_path / "o2")
    assert len(_parts(tmp_path / "o1")) == 4
    assert (tmp_path / "o1" / "manifest.json").read_bytes() == \
        (tmp_path / "o2" / "manifest.json").read_bytes()


def test_stage_shard_count_does_not_change_the_rows(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    (tmp_path / "a.tsv").write_text(_cc3m_lines(_many(300)))
    seen = []
    for k in (1, 3, 7, 50):
        out = tmp_path / f"k{k}"
        m = make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_captions=101, num_shards=k,
                                     seed=2), str(out))
        sizes = [s.num_captions for s in m.shards]
        assert len(sizes) == k and sum(sizes) == 101 and max(sizes) - min(sizes) <= 1
        seen.append(_rows_of(out))
    assert all(rows == seen[0] for rows in seen)


def test_stage_other_seed_other_sample(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    (tmp_path / "a.tsv").write_text(_cc3m_lines(_many(300)))
    rows = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_captions=100, seed=seed),
                      str(out))
        rows[seed] = _rows_of(out)
    assert {c for _, c in rows[0]} != {c for _, c in rows[1]}
    assert {c for _, c in rows[0]} <= set(_many(300))


def test_stage_input_split_and_order_do_not_matter(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    captions = _many(240)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "all.tsv").write_text(_cc3m_lines(captions + [captions[0].upper()]))
    split = tmp_path / "split"
    split.mkdir()
    for i in range(3):  # interleaved thirds, one duplicate across files
        (split / f"p{i}.tsv").write_text(_cc3m_lines(captions[i::3] + [captions[0].upper()]))
    files = [str(split / f"p{i}.tsv") for i in range(3)]
    kw = {"num_captions": 150, "num_shards": 2, "seed": 4}
    make_captions(_files_cfg([str(tmp_path / "one" / "all.tsv")], **kw), str(tmp_path / "o1"))
    make_captions(_files_cfg(files, **kw), str(tmp_path / "o2"))
    make_captions(_files_cfg(files[::-1], **kw), str(tmp_path / "o3"))
    make_captions(_files_cfg([str(split / "*.tsv")], **kw), str(tmp_path / "o4"))
    # The same files in another order: byte-identical parts (source column included).
    assert _parts(tmp_path / "o2") == _parts(tmp_path / "o3") == _parts(tmp_path / "o4")
    # The same rows split differently: the same (caption_id, caption) rows.
    assert _rows_of(tmp_path / "o1") == _rows_of(tmp_path / "o2")


def test_stage_rerun_is_a_noop(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    (tmp_path / "a.tsv").write_text(_cc3m_lines(_many(50)))
    out = tmp_path / "out"
    cfg = _files_cfg([str(tmp_path / "a.tsv")], num_shards=2)
    first = make_captions(cfg, str(out))
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    # Run-only fields (spill size, scratch folder) do not count as another config.
    again = _files_cfg([str(tmp_path / "a.tsv")], num_shards=2, spill_rows=2000,
                       work_dir=str(tmp_path))
    second = make_captions(again, str(out))
    assert second.to_json() == json.loads((out / "manifest.json").read_text())
    assert second.count == first.count == 50
    assert "elapsed_s" not in second.extra  # nothing was run
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == stamp


def test_stage_other_config_needs_overwrite(tmp_path: Path) -> None:
    from stablerep.captions import make_captions
    from stablerep.contracts import load_captions_manifest

    (tmp_path / "a.tsv").write_text(_cc3m_lines(_many(50)))
    out = tmp_path / "out"
    make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_shards=4), str(out))
    before = _parts(out)
    manifest_before = (out / "manifest.json").read_bytes()
    with pytest.raises(InputError, match="another config.*--overwrite"):
        make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_shards=2, seed=9), str(out))
    assert _parts(out) == before
    assert (out / "manifest.json").read_bytes() == manifest_before

    m = make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_shards=2, seed=9,
                                 overwrite=True), str(out))
    assert sorted(_parts(out)) == ["part-000000.parquet", "part-000001.parquet"]  # stale gone
    assert m.num_shards == 2 and load_captions_manifest(str(out)).seed == 9
    assert [i for i, _ in _rows_of(out)] == list(range(50))


def test_stage_allow_fewer(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    (tmp_path / "a.tsv").write_text(_cc3m_lines(_many(30) + _many(5)))  # 5 duplicates
    with pytest.raises(InputError, match=r"asked for 100 captions .* has only 30 ") as err:
        make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_captions=100),
                      str(tmp_path / "no"))
    assert "allow-fewer" in str(err.value)
    assert not (tmp_path / "no").exists()
    m = make_captions(_files_cfg([str(tmp_path / "a.tsv")], num_captions=100, allow_fewer=True,
                                 num_shards=3), str(tmp_path / "yes"))
    assert m.count == 30 and m.summary["sampled"] == 30
    assert [s.num_captions for s in m.shards] == [10, 10, 10]


_GOOD = _cc3m_lines(_many(20)).encode()


@pytest.mark.parametrize(("files", "inputs", "kwargs", "match"), [
    ({}, ["missing.tsv"], {}, "no such file"),
    ({}, ["nofolder/*.tsv"], {}, "matches no file"),
    ({"a.csv": b"id,text\n1,a dog on the beach\n"}, ["a.csv"], {}, "the columns are id, text"),
    ({"a.parquet": None}, ["a.parquet"], {"column": "text"}, "the columns are url, TEXT"),
    ({"empty.txt": b""}, ["empty.txt"], {}, "holds no captions"),
    ({"e.txt.gz": gzip.compress(b"")}, ["e.txt.gz"], {}, "holds no captions"),
    ({"short.txt": b"ab\n\n  \ncd\n"}, ["short.txt"], {}, "no caption survived"),
    ({"a.tsv.gz": _GOOD}, ["a.tsv.gz"], {}, "gzip-compressed"),
    ({"a.tsv.zst": zstandard.ZstdCompressor().compress(_GOOD)[:-7]}, ["a.tsv.zst"], {},
     "zstd-compressed"),
    ({"good.tsv": _GOOD, "bad.txt.gz": b"nope"}, ["good.tsv", "bad.txt.gz"], {},
     "bad.txt.gz.*gzip"),
    ({"a.tsv": _GOOD}, ["a.tsv"], {"num_captions": 21}, "has only 20 "),
    ({"a.tsv": _GOOD}, ["a.tsv"], {"num_shards": 21}, "captions.num_shards: got 21"),
], ids=["missing-file", "empty-glob", "csv-column", "parquet-column", "empty-file", "empty-gz",
        "nothing-survives", "not-gzip", "truncated-zstd", "one-bad-of-two", "too-few",
        "too-many-shards"])
def test_stage_bad_input_publishes_nothing(tmp_path: Path, files: dict, inputs: list[str],
                                           kwargs: dict, match: str) -> None:
    from stablerep.captions import make_captions

    for name, content in files.items():
        if content is None:
            pq.write_table(pa.table({"url": ["u"], "TEXT": ["a dog on the beach"]}),
                           tmp_path / name)
        else:
            (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(StablerepError, match=match) as err:
        make_captions(_files_cfg([str(tmp_path / u) for u in inputs], **kwargs), str(out))
    assert "\n" not in str(err.value)
    assert not out.exists()


def test_stage_synthetic_source(tmp_path: Path) -> None:
    from stablerep.captions import make_captions

    cfg = CaptionsConfig(source="synthetic", num_captions=400, num_shards=3, seed=1)
    m = make_captions(cfg, str(tmp_path / "a"))
    make_captions(cfg, str(tmp_path / "b"))
    assert m.count == 400 and m.source["kind"] == "synthetic"
    assert _parts(tmp_path / "a") == _parts(tmp_path / "b")
    rows = _rows_of(tmp_path / "a")
    assert len({normalise(c) for _, c in rows}) == 400
    table = pq.read_table(tmp_path / "a" / "part-000000.parquet")
    assert set(table["source"].to_pylist()) == {"synthetic:imagenet1k"}
    other = make_captions(CaptionsConfig(source="synthetic", num_captions=400, seed=2),
                          str(tmp_path / "c"))
    assert other.count == 400
    assert {c for _, c in _rows_of(tmp_path / "c")} != {c for _, c in rows}


@pytest.mark.parametrize("source", ["synthetic", "procedural"])
def test_captions_made_before_the_rewriter_field_went_keep_their_fingerprint(source: str) -> None:
    from stablerep.captions.stage import output_fingerprint
    from stablerep.config import fingerprint, to_dict

    cfg = CaptionsConfig(source=source, num_captions=10)
    before = to_dict(cfg)  # the config as it was written when the field existed
    before["synthetic"]["rewriter"] = "none"
    for key in ("work_dir", "spill_rows", "overwrite", "out"):
        before.pop(key)
    if source != "procedural":
        before.pop("procedural")
    assert output_fingerprint(cfg) == fingerprint(before)
