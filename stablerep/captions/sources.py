"""Caption sources: streaming readers for caption-data-set files at any URI.

Layouts (``CaptionsConfig.format``):

- ``cc3m``: TSV without header, ``caption<TAB>url`` (Conceptual Captions 3M).
- ``cc12m``: TSV without header, ``url<TAB>caption`` (Conceptual 12M).
- ``tsv`` / ``csv``: a header row and a named column.
- ``jsonl``: one JSON object per line with a named field.
- ``parquet``: a named column (img2dataset / LAION metadata parquet: ``caption`` or ``TEXT``).
- ``txt``: one caption per line.
- ``redcaps``: a RedCaps annotation file (``{"annotations": [{"caption": ...}, ...]}``).
- ``auto``: from the suffix; a ``.tsv`` is sniffed (header holding the column, or CC3M/CC12M
  by which field is the URL).

Every reader streams: rows are yielded one at a time (Parquet in record batches), so a 10M-row
file is never held in memory. Compressed files (``.gz``, ``.zst``, ``.bz2``, ``.xz``) are
decompressed on the fly. A caption that is not valid UTF-8 is yielded as ``None`` (counted by
the cleaner), never crashed on.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from stablerep import storage
from stablerep.errors import InputError

INVALID = None
"""What a reader yields for a caption that is not valid UTF-8 text."""

_SUFFIX_COMPRESSION = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd",
                       ".bz2": "bz2", ".xz": "xz"}
_SUFFIX_FORMAT = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                  ".txt": "txt", ".tsv": "tsv", ".json": "redcaps"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class FileSpec:
    """One input file and how to read it."""

    uri: str
    format: str  # a concrete layout (never "auto")
    compression: str | None  # fsspec compression name or None
    column: str


def split_suffix(uri: str) -> tuple[str, str | None]:
    """The format suffix and the compression of a file name (``x.tsv.gz`` -> ``.tsv``, gzip)."""
    base = storage.name(uri).lower()
    compression = None
    for suffix, comp in _SUFFIX_COMPRESSION.items():
        if base.endswith(suffix):
            compression = comp
            base = base[: -len(suffix)]
            break
    dot = base.rfind(".")
    return (base[dot:] if dot >= 0 else ""), compression


def resolve(uri: str, *, fmt: str, compression: str, column: str) -> FileSpec:
    """Decide the layout and compression of one input file."""
    suffix, inferred = split_suffix(uri)
    comp = {"infer": inferred, "none": None}.get(compression, compression)
    if fmt == "auto":
        fmt = _SUFFIX_FORMAT.get(suffix, "")
        if not fmt:
            raise InputError(
                f"{uri}: cannot tell the caption layout from the suffix {suffix or '(none)'!r}; "
                "set captions.format to one of cc3m, cc12m, tsv, csv, jsonl, parquet, txt, redcaps"
            )
        if fmt == "tsv":
            spec = FileSpec(uri, "tsv", comp, column)
            try:
                fmt = _sniff_tsv(spec)
            except Exception as e:
                raise _read_error(spec, e) from None
    return FileSpec(uri, fmt, comp, column)


def _sniff_tsv(spec: FileSpec) -> str:
    with _open_text(spec) as f:
        first = f.readline().rstrip("\r\n").split("\t")
    if spec.column in first:
        return "tsv"
    if len(first) >= 2:
        looks_url = [cell.startswith(("http://", "https://")) for cell in first[:2]]
        if looks_url == [False, True]:
            return "cc3m"
        if looks_url == [True, False]:
            return "cc12m"
    raise InputError(
        f"{spec.uri}: no header column {spec.column!r} (header: {first[:8]}) and not a "
        "caption/url TSV; set captions.column, or captions.format to cc3m or cc12m"
    )


@contextlib.contextmanager
def _open_binary(spec: FileSpec) -> Iterator[io.BufferedIOBase]:
    if spec.compression != "zstd":
        with storage.open_read(spec.uri, compression=spec.compression) as f:
            yield f
        return
    # fsspec's zstd reader (zstandard's stream_reader) ends quietly on a truncated file, so a
    # cut-off download would pass as a shorter one: decompress here and check frame ends.
    with storage.open_read(spec.uri, compression=None) as raw:
        yield io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 16)


class _ZstdReader(io.RawIOBase):
    """Streams the frames of a zstd file; raises EOFError if the last frame is cut off."""

    def __init__(self, raw: io.BufferedIOBase):
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # bytes fed to the current frame, its end not reached yet
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended in the middle of a frame (truncated file)")
                return 0
            self._out = memoryview(self._feed(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._dobj.eof:
                self._dobj = self._zstd.ZstdDecompressor().decompressobj()
            out.append(self._dobj.decompress(chunk))
            self._in_frame = not self._dobj.eof
            chunk = self._dobj.unused_data if self._dobj.eof else b""
        return b"".join(out)


class _TextStream:
    """Decodes a binary stream line by line, keeping bad UTF-8 as surrogate escapes."""

    def __init__(self, spec: FileSpec):
        self._ctx = _open_binary(spec)

    def __enter__(self) -> io.TextIOWrapper:
        raw = self._ctx.__enter__()
        return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def _open_text(spec: FileSpec) -> _TextStream:
    return _TextStream(spec)


def _valid(text: str | None) -> str | None:
    """``text`` if it is valid UTF-8 (no surrogate escapes), else :data:`INVALID`."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return INVALID
    return text


def _read_delimited(spec: FileSpec, delimiter: str) -> Iterator[str | None]:
    with _open_text(spec) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        if spec.column not in header:
            raise InputError(
                f"{spec.uri}: no column {spec.column!r}; the columns are {', '.join(header)}"
            )
        idx = header.index(spec.column)
        for row in reader:
            yield _valid(row[idx]) if idx < len(row) else ""


def _read_headerless_tsv(spec: FileSpec, idx: int) -> Iterator[str | None]:
    with _open_text(spec) as f:
        for line in f:
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) == 1 and not cells[0]:
                continue
            yield _valid(cells[idx]) if idx < len(cells) else ""


def _read_jsonl(spec: FileSpec) -> Iterator[str | None]:
    with _open_text(spec) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if _valid(line) is INVALID:
                    yield INVALID
                    continue
                raise InputError(f"{spec.uri}: line {lineno} is not a JSON object") from None
            if not isinstance(obj, dict):
                raise InputError(f"{spec.uri}: line {lineno} is not a JSON object")
            if spec.column not in obj and lineno == 1:
                raise InputError(
                    f"{spec.uri}: no field {spec.column!r}; the first object has "
                    f"{', '.join(sorted(obj))}"
                )
            value = obj.get(spec.column)
            yield _valid(value) if isinstance(value, str) else ("" if value is None else str(value))


def _read_txt(spec: FileSpec) -> Iterator[str | None]:
    with _open_text(spec) as f:
        for line in f:
            yield _valid(line.rstrip("\r\n"))


def _read_parquet(spec: FileSpec) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open_binary(spec) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{spec.uri}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if spec.column not in names:
            raise InputError(
                f"{spec.uri}: no column {spec.column!r}; the columns are {', '.join(names)}"
            )
        for batch in pf.iter_batches(batch_size=65536, columns=[spec.column]):
            col = _utf8_or_binary(batch.column(0))
            if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                for value in col.to_pylist():
                    yield _decode(value)
            else:
                for value in col.to_pylist():
                    yield "" if value is None else str(value)


def _utf8_or_binary(col):
    """A string column as is when it is valid UTF-8, else viewed as binary (decoded per value).

    Parquet writers other than Arrow may store invalid UTF-8 in a string column; Arrow reads
    it unchecked and ``to_pylist`` would fail on the whole batch.
    """
    import pyarrow as pa

    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    try:
        col.validate(full=True)
    except pa.ArrowInvalid:
        return col.view(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
    return col


def _decode(value: bytes | None) -> str | None:
    if value is None:
        return ""
    try:
        return codecs.decode(value, "utf-8")
    except UnicodeDecodeError:
        return INVALID


def _read_redcaps(spec: FileSpec) -> Iterator[str | None]:
    # RedCaps ships one JSON document per subreddit-year (tens of MB at most): parsed whole.
    with _open_binary(spec) as f:
        try:  # bad UTF-8 inside a caption drops that caption, not the file
            doc = json.loads(f.read().decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise InputError(f"{spec.uri}: not a RedCaps annotation JSON ({e})") from None
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, list):
        raise InputError(f"{spec.uri}: no 'annotations' list (not a RedCaps annotation file)")
    for ann in annotations:
        value = ann.get(spec.column) if isinstance(ann, dict) else None
        yield _valid(value) if isinstance(value, str) else ""


def read_captions(spec: FileSpec) -> Iterator[str | None]:
    """Stream the raw captions of one file (``None`` for a caption that is not UTF-8).

    Raises:
        InputError: the file is missing, unreadable, corrupt or lacks the column.
    """
    readers = {
        "cc3m": lambda: _read_headerless_tsv(spec, 0),
        "cc12m": lambda: _read_headerless_tsv(spec, 1),
        "tsv": lambda: _read_delimited(spec, "\t"),
        "csv": lambda: _read_delimited(spec, ","),
        "jsonl": lambda: _read_jsonl(spec),
        "txt": lambda: _read_txt(spec),
        "parquet": lambda: _read_parquet(spec),
        "redcaps": lambda: _read_redcaps(spec),
    }
    try:
        yield from readers[spec.format]()
    except Exception as e:
        raise _read_error(spec, e) from None


def _read_error(spec: FileSpec, e: Exception) -> Exception:
    """The user-facing error for an exception raised while reading ``spec`` (or ``e``)."""
    if isinstance(e, (InputError, storage.StorageError)):
        return e
    what = f"{spec.compression}-compressed " if spec.compression else ""
    if isinstance(e, (OSError, EOFError, ValueError)):
        # gzip.BadGzipFile, truncated streams, csv errors ...
        return InputError(
            f"{spec.uri}: cannot read this {what}{spec.format} file ({type(e).__name__}: {e})"
        )
    if type(e).__module__.startswith("zstandard") or "Zstd" in type(e).__name__:
        return InputError(f"{spec.uri}: cannot read this zstd-compressed file ({e})")
    return e
