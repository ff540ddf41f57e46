"""The data contracts between stages: every manifest and the shard format, in one place.

Stages meet only through files under ``data_root``; this module is the one that names,
writes, reads and checks them (every stage, the report and the components go through it):

- **captions** (``captions/``): ``part-{i:06d}.parquet`` (columns caption_id int64, caption
  string, source string) and ``manifest.json`` (kind ``stablerep.captions``: count, shards
  with sha256 and sizes, seed, source, summary, config fingerprint), written last.
- **images** (``images/``): WebDataset tars ``shard-{i:06d}.tar``, one sample per image, key
  ``{caption_id:012d}_{j:03d}``, members ``jpg``/``webp``/``png``, ``txt`` (the caption) and
  ``json`` (per-sample record); ``shard-{i:06d}.json`` (kind ``stablerep.images.shard``)
  written after its tar — a shard exists only when its json does; once every shard is done,
  ``sizes.json`` (tar name -> samples, for open_clip) and ``manifest.json`` (kind
  ``stablerep.images``).
- **checkpoints** (``train/``): ``ckpt-{step:08d}.pt`` and ``latest.json``
  ``{"step", "checkpoint", "sha256"}`` naming the newest.
- **training result** (``train/``): ``result.json`` (kind ``stablerep.train.result``: steps,
  final loss, images/s, world size, checkpoint / backbone / metrics URIs), written by rank 0
  when a run ends.
- **eval metrics** (``eval/``): ``metrics.json`` (written last), ``report.html``,
  ``report.md``.

File formats are fixed: a reader of any version of this module reads what another wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from stablerep import storage
from stablerep.errors import InputError

# ---------------------------------------------------------------------------- JSON records


def read_json_object(uri: str, what: str, *, writer: str) -> dict[str, Any]:
    """A JSON object a stage wrote (``what`` and ``writer`` name it in errors).

    Args:
        uri: the file.
        what: what it is, e.g. ``"JSON shard record"``.
        writer: the command that writes it, e.g. ``"stablerep generate"``.

    Raises:
        InputError: naming ``uri``, when it is not UTF-8, not JSON or not a JSON object.
    """
    doc = storage.read_json(uri, what=f"the {what} that `{writer}` writes")
    if not isinstance(doc, dict):
        raise InputError(f"{uri}: a JSON {type(doc).__name__}; expected the {what} (an object) "
                         f"that `{writer}` writes")
    return doc


# ---------------------------------------------------------------------------- captions

CAPTIONS_MANIFEST = "manifest.json"
CAPTIONS_KIND = "stablerep.captions"
PART_SCHEMA = pa.schema([("caption_id", pa.int64()), ("caption", pa.string()),
                         ("source", pa.string())])


def part_name(index: int) -> str:
    """The file name of captions part ``index``."""
    return f"part-{index:06d}.parquet"


@dataclass
class ShardInfo:
    """One Parquet part of a captions folder."""

    index: int
    path: str  # relative to the manifest's folder
    first_caption_id: int
    num_captions: int
    sha256: str
    bytes: int


@dataclass
class CaptionsManifest:
    """The parsed ``manifest.json`` of a captions folder."""

    uri: str  # the folder
    count: int
    shards: list[ShardInfo]
    seed: int
    source: dict[str, Any]
    summary: dict[str, Any]
    config_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def manifest_uri(self) -> str:
        return storage.join(self.uri, CAPTIONS_MANIFEST)

    def shard_uri(self, index: int) -> str:
        return storage.join(self.uri, self.shards[index].path)

    def read_shard(self, index: int, *, verify: bool = True) -> pa.Table:
        """Read part ``index``: its sha256 (unless ``verify`` is False), then its schema.

        Raises:
            InputError: naming the part, when it is missing, changed, not Parquet, or has
                other columns or row count than the manifest and the captions contract say.
        """
        if not 0 <= index < self.num_shards:
            raise InputError(
                f"shard index {index} is out of range: {self.uri} has {self.num_shards} shards "
                f"(0..{self.num_shards - 1})"
            )
        info, uri = self.shards[index], self.shard_uri(index)
        try:
            data = storage.read_bytes(uri)
        except storage.StorageNotFound:
            raise InputError(f"{uri}: the captions part listed in {self.uri}/{CAPTIONS_MANIFEST} "
                             "does not exist") from None
        if verify:
            got = hashlib.sha256(data).hexdigest()
            if got != info.sha256:
                raise InputError(f"{uri}: sha256 {got} does not match the "
                                 f"manifest ({info.sha256}); the part was changed or truncated")
        return _check_part(uri, data, info)

    def check_parts(self) -> None:
        """Read and check every part the manifest lists (exists, sha256, schema, rows)."""
        for index in range(self.num_shards):
            self.read_shard(index)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": CAPTIONS_KIND,
            "version": 1,
            "count": self.count,
            "num_shards": self.num_shards,
            "shards": [vars(s) for s in self.shards],
            "seed": self.seed,
            "source": self.source,
            "summary": self.summary,
            "config_fingerprint": self.config_fingerprint,
            **self.extra,
        }


def write_captions_manifest(manifest: CaptionsManifest) -> str:
    """Publish ``manifest.json`` in the manifest's folder (the last write of the stage)."""
    storage.write_json(manifest.manifest_uri, manifest.to_json())
    return manifest.manifest_uri


def load_captions_manifest(uri: str) -> CaptionsManifest:
    """Read a captions folder's manifest (``uri`` is the folder or the manifest itself).

    Raises:
        InputError: naming the manifest, when it is missing, not UTF-8 JSON, or lacks a key
            (or has one of the wrong type) that the captions contract requires.
    """
    folder = (uri[: -len(CAPTIONS_MANIFEST) - 1] if uri.rstrip("/").endswith(CAPTIONS_MANIFEST)
              else uri)
    manifest_uri = storage.join(folder, CAPTIONS_MANIFEST)
    try:
        doc = storage.read_json(manifest_uri, what="the JSON captions manifest that `stablerep "
                                                   "captions` writes")
    except storage.StorageNotFound:
        raise InputError(f"{manifest_uri}: no captions manifest (run `stablerep captions` "
                         "first, or check the URI)") from None
    if not isinstance(doc, dict) or doc.get("kind") != CAPTIONS_KIND:
        raise InputError(f"{manifest_uri}: not a stablerep captions manifest (expected a JSON "
                         f"object with kind {CAPTIONS_KIND!r})")
    _check_keys(doc, _MANIFEST_KEYS, manifest_uri, "")
    if not doc["shards"]:
        raise InputError(f"{manifest_uri}: 'shards' is empty; expected at least one part")
    for i, shard in enumerate(doc["shards"]):
        if not isinstance(shard, dict):
            raise InputError(f"{manifest_uri}: shards[{i}] is {type(shard).__name__}; "
                             "expected an object")
        _check_keys(shard, _SHARD_KEYS, manifest_uri, f"shards[{i}].")
    _check_counts(doc, manifest_uri)
    known = set(_MANIFEST_KEYS) | {"version", "num_shards"}
    return CaptionsManifest(
        uri=folder.rstrip("/"),
        count=doc["count"],
        shards=[ShardInfo(**{k: s[k] for k in _SHARD_KEYS}) for s in doc["shards"]],
        seed=doc["seed"],
        source=doc["source"],
        summary=doc["summary"],
        config_fingerprint=doc["config_fingerprint"],
        extra={k: v for k, v in doc.items() if k not in known},
    )


# Required keys of manifest.json and of each of its shards, with the JSON types they take.
_MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "kind": str, "count": int, "shards": list, "seed": int, "source": dict, "summary": dict,
    "config_fingerprint": str}
_SHARD_KEYS: dict[str, type | tuple[type, ...]] = {
    "index": int, "path": str, "first_caption_id": int, "num_captions": int, "sha256": str,
    "bytes": int}


def _check_counts(doc: dict[str, Any], uri: str) -> None:
    """The optional keys have their types; counts are not negative and agree."""
    _check_keys({k: doc[k] for k in ("version", "num_shards") if k in doc},
                {"version": int, "num_shards": int}, uri, "")
    if doc["count"] < 0:
        raise InputError(f"{uri}: 'count' is {doc['count']}; expected >= 0")
    if doc.get("num_shards", len(doc["shards"])) != len(doc["shards"]):
        raise InputError(f"{uri}: 'num_shards' is {doc['num_shards']} but 'shards' lists "
                         f"{len(doc['shards'])}; expected them equal")
    for i, shard in enumerate(doc["shards"]):
        if shard["num_captions"] < 0 or shard["index"] != i:
            raise InputError(f"{uri}: shards[{i}] has index {shard['index']} and "
                             f"num_captions {shard['num_captions']}; expected index {i} "
                             "and num_captions >= 0")


def _check_keys(doc: dict[str, Any], keys: dict[str, Any], uri: str, where: str) -> None:
    for key, kind in keys.items():
        if key not in doc:
            raise InputError(f"{uri}: missing key '{where}{key}'; expected a captions manifest "
                             "as `stablerep captions` writes it")
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InputError(f"{uri}: '{where}{key}' is {type(value).__name__}; expected "
                             f"{kind.__name__}")


def _check_part(uri: str, data: bytes, info: ShardInfo) -> pa.Table:
    """Parse one part's bytes and check them against the captions contract."""
    try:
        # One thread, no read-ahead: the part is in memory, and pyarrow's pools can abort
        # the process at exit (apache/arrow#34314) when a user error ends the run right after.
        table = pq.read_table(pa.BufferReader(data), use_threads=False, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{uri}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                         "expected a captions part") from None
    for name in ("caption_id", "caption"):
        expected = PART_SCHEMA.field(name).type
        if name not in table.column_names:
            raise InputError(f"{uri}: no column '{name}'; expected columns "
                             f"{_schema_text()} (got {_schema_text(table.schema)})")
        got = table.schema.field(name).type
        if got not in (expected, pa.large_string() if expected == pa.string() else expected):
            raise InputError(f"{uri}: column '{name}' is {got}; expected columns "
                             f"{_schema_text()} (got {_schema_text(table.schema)})")
    if table.num_rows != info.num_captions:
        raise InputError(f"{uri}: {table.num_rows} rows; the manifest says "
                         f"{info.num_captions}")
    return table


def _schema_text(schema: pa.Schema = PART_SCHEMA) -> str:
    return ", ".join(f"{f.name} {f.type}" for f in schema)


# ---------------------------------------------------------------------------- image shards

SHARD_JSON_KIND = "stablerep.images.shard"
IMAGES_KIND = "stablerep.images"
IMAGES_MANIFEST = "manifest.json"
SIZES = "sizes.json"
"""Shard name -> sample count, beside the shards (the file open_clip's loader reads)."""
IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")
"""Image member extensions a reader accepts (the writer uses jpg, webp or png)."""
KEY_PATTERN = re.compile(r"(?P<caption_id>\d+)_(?P<j>\d+)")
"""A sample key, ``{caption_id:012d}_{j:03d}`` as written (no dots)."""
SHA256 = re.compile(r"[0-9a-f]{64}")


def shard_stem(index: int) -> str:
    """``shard-{index:06d}``, the name of shard ``index`` without extension."""
    return f"shard-{index:06d}"


def shard_tar_name(index: int) -> str:
    return f"{shard_stem(index)}.tar"


def shard_json_name(index: int) -> str:
    return f"{shard_stem(index)}.json"


def is_shard_json(uri: str) -> bool:
    """Whether ``uri`` names a shard record (``shard-*.json``)."""
    name = storage.name(uri)
    return name.startswith("shard-") and name.endswith(".json")


def sample_key(caption_id: int, j: int) -> str:
    """The WebDataset key of image ``j`` of caption ``caption_id`` (no dots)."""
    return f"{caption_id:012d}_{j:03d}"


def split_member(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the key runs to the first dot of the base name."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def sample_record(caption_id: int, j: int, *, caption: str, seed: int, guidance_scale: float,
                  steps: int, scheduler: str, model: str, generated_size: tuple[int, int],
                  stored_size: int, stored_dims: tuple[int, int]) -> dict[str, Any]:
    """The json member of one sample: generation settings plus img2dataset's fields.

    Args:
        caption_id: the caption's id.
        j: the image's index among the caption's images.
        caption: the caption text.
        seed: the image's seed.
        guidance_scale: classifier-free guidance scale.
        steps: denoising steps.
        scheduler: the scheduler name.
        model: the model id.
        generated_size: (width, height) as generated.
        stored_size: the stored shorter side setting (0 = as generated).
        stored_dims: (width, height) as stored.
    """
    width, height = stored_dims
    return {"caption_id": caption_id, "j": j, "seed": seed,
            "guidance_scale": guidance_scale, "steps": steps, "scheduler": scheduler,
            "model": model, "generated_size": list(generated_size), "stored_size": stored_size,
            # the per-sample fields img2dataset writes, so its readers take these shards
            "key": sample_key(caption_id, j), "caption": caption, "width": width,
            "height": height, "original_width": generated_size[0],
            "original_height": generated_size[1], "status": "success"}


def sample_members(image: bytes, fmt: str, caption: str, meta: dict[str, Any]) -> dict[str, bytes]:
    """The tar members of one sample, in a fixed order."""
    return {
        fmt: image,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
    }


class TarShardWriter:
    """Writes WebDataset samples to a binary stream as a deterministic USTAR tar.

    Members get fixed metadata (mtime 0, uid/gid 0, mode 0444), so the same samples give the
    same bytes.
    """

    def __init__(self, stream: BinaryIO):
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: ``members`` maps extension (``jpg``, ``txt``, ``json``) to bytes."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()


def read_shard_record(uri: str) -> dict[str, Any]:
    """A ``shard-*.json`` as a JSON object (see :func:`read_json_object`)."""
    return read_json_object(uri, "JSON shard record", writer="stablerep generate")


def write_shard_record(out: str, index: int, record: dict[str, Any]) -> str:
    """Publish the json of shard ``index`` (after its tar: it commits the shard)."""
    uri = storage.join(out, shard_json_name(index))
    storage.write_json(uri, record)
    return uri


@dataclass(frozen=True)
class ShardRef:
    """A finished shard: its tar URI and what its json says."""

    uri: str
    num_captions: int
    num_samples: int
    images_per_caption: int
    sha256: str | None = None  # of the tar, as its json records it
    record: str = field(default="", compare=False)  # the json that lists it (for errors)


def shard_ref(folder: str, doc_uri: str, *, verify: bool) -> ShardRef:
    """What the shard record ``doc_uri`` in ``folder`` says about its tar.

    Raises:
        InputError: the record lacks a field, or (with ``verify``) its sha256 is not 64 hex
            digits.
    """
    return shard_ref_of(folder, doc_uri, storage.read_json(doc_uri), verify=verify)


def shard_ref_of(folder: str, doc_uri: str, doc: Any, *, verify: bool) -> ShardRef:
    """:func:`shard_ref` of a record already read (``doc``, parsed from ``doc_uri``)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("tar"), str):
        raise InputError(f"{doc_uri}: not a stablerep shard json (expected an object with "
                         "tar, num_captions, num_samples, images_per_caption)")
    counts = []
    for key in ("num_captions", "num_samples", "images_per_caption"):
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{doc_uri}: not a stablerep shard json: field {key}: got "
                             f"{value!r}, expected an integer >= 0")
        counts.append(value)
    ref = ShardRef(storage.join(folder, doc["tar"]), *counts, doc.get("sha256"), doc_uri)
    if verify and not (isinstance(ref.sha256, str) and SHA256.fullmatch(ref.sha256)):
        raise InputError(f"{doc_uri}: field sha256: got {ref.sha256!r}, expected the tar's "
                         "sha256 as 64 hex digits (or train with --no-verify)")
    return ref


def finished_shards(folder: str) -> list[str]:
    """The shard records (``shard-*.json``) of an images folder: its committed shards."""
    return [u for u in storage.list_dir(folder) if is_shard_json(u)]


def check_complete(folder: str, records: dict[str, dict[str, Any]]) -> None:
    """Fail when a shard that the records say exists has no record: it is not committed.

    Each record names its index (``shard``) and the number of shards of its captions
    (``num_shards``); records without them (hand-made folders) are not checked.

    Args:
        folder: the images folder.
        records: record URI -> its parsed json, every committed shard of ``folder``.

    Raises:
        InputError: naming the first missing shard's json and how many are committed.
    """
    counts = {r.get("num_shards") for r in records.values()}
    indices = {r.get("shard") for r in records.values()}
    if len(counts) != 1 or not all(isinstance(i, int) for i in counts | indices):
        return
    (total,) = counts
    missing = sorted(set(range(total)) - indices)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(
            f"{storage.join(folder, shard_json_name(missing[0]))}: missing{more}; "
            f"{total - len(missing)} of {total} shards are committed (a shard exists once its "
            f"json does): generate the missing shards first (stablerep generate --shard "
            f"{missing[0]})")


def read_images_manifest(out: str) -> dict[str, Any] | None:
    """The images folder's ``manifest.json``, or None while shards are missing."""
    uri = storage.join(out, IMAGES_MANIFEST)
    if not storage.exists(uri):
        return None
    return read_json_object(uri, "JSON images manifest", writer="stablerep generate")


def images_manifest_refs(folder: str, *, verify: bool) -> list[ShardRef] | None:
    """The shards an images folder's ``manifest.json`` lists (one read); None without one.

    Args:
        folder: the images folder.
        verify: require each listed shard's sha256 (checked when its tar is read).

    Raises:
        InputError: naming the manifest, when it is not an images manifest, lists no shard,
            or its counts disagree with its own shard list.
    """
    uri = storage.join(folder, IMAGES_MANIFEST)
    try:
        doc = read_json_object(uri, "JSON images manifest", writer="stablerep generate")
    except storage.StorageNotFound:
        return None
    shards, m = doc.get("shards"), doc.get("images_per_caption")
    if doc.get("kind") != IMAGES_KIND or not isinstance(shards, list) or not shards \
            or not isinstance(m, int):
        raise InputError(f"{uri}: not an images manifest (expected kind {IMAGES_KIND!r}, a "
                         "non-empty 'shards' list and 'images_per_caption')")
    refs = [shard_ref_of(folder, uri, {**s, "images_per_caption": m} if isinstance(s, dict)
                         else s, verify=verify) for s in shards]
    totals = {"num_shards": len(refs), "num_samples": sum(r.num_samples for r in refs),
              "num_captions": sum(r.num_captions for r in refs)}
    for key, total in totals.items():
        if doc.get(key) != total:
            raise InputError(f"{uri}: {key} is {doc.get(key)!r} but its shards list adds up to "
                             f"{total}; the manifest was changed (write it again with the "
                             "pipeline's images manifest step)")
    indices = [s.get("index") for s in shards]
    if indices != list(range(len(shards))):
        raise InputError(f"{uri}: shards are not listed as indices 0..{len(shards) - 1}")
    return refs


def write_images_manifest(out: str, records: list[dict[str, Any]], *, images_per_caption: int,
                          fingerprint: str, captions: str) -> str:
    """Publish ``sizes.json`` and then ``manifest.json`` of a complete images folder.

    Args:
        out: the images folder.
        records: every shard's json, in shard order.
        images_per_caption: m, images drawn per caption.
        fingerprint: the generation config fingerprint all records share.
        captions: the captions folder the images were drawn from.

    Returns:
        The manifest's URI.
    """
    # WebDataset readers (open_clip's get_dataset_size) take the size from here.
    storage.write_json(storage.join(out, SIZES), {d["tar"]: d["num_samples"] for d in records})
    uri = storage.join(out, IMAGES_MANIFEST)
    storage.write_json(uri, {
        "kind": IMAGES_KIND, "version": 1, "num_shards": len(records),
        "num_samples": sum(d["num_samples"] for d in records),
        "num_captions": sum(d["num_captions"] for d in records),
        "failed_captions": sum(len(d["failed"]) for d in records),
        "images_per_caption": images_per_caption,
        "config_fingerprint": fingerprint, "captions": captions,
        "shards": [{"index": d["shard"], "tar": d["tar"], "num_samples": d["num_samples"],
                    "num_captions": d["num_captions"], "sha256": d["sha256"]} for d in records],
    })
    return uri


# ---------------------------------------------------------------------------- checkpoints

LATEST = "latest.json"
BACKBONE = "backbone.pt"
BACKBONE_JSON = "backbone.json"
TRAIN_METRICS = "metrics.jsonl"


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of step ``step``."""
    return f"ckpt-{step:08d}.pt"


def is_checkpoint(uri: str) -> bool:
    name = storage.name(uri)
    return name.startswith("ckpt-") and name.endswith(".pt")


def write_latest(out: str, step: int, sha256: str) -> str:
    """Point ``out/latest.json`` at the checkpoint of ``step`` (published after it)."""
    uri = storage.join(out, LATEST)
    storage.write_json(uri, {"step": step, "checkpoint": checkpoint_name(step), "sha256": sha256})
    return uri


def read_latest(out: str) -> str | None:
    """The checkpoint URI ``out/latest.json`` points at, or None when there is no latest.json.

    Raises:
        InputError: latest.json is not UTF-8 JSON of the form {"checkpoint": "ckpt-*.pt", ...}.
    """
    latest = storage.join(out, LATEST)
    if not storage.exists(latest):
        return None
    expected = 'a JSON object {"step": N, "checkpoint": "ckpt-NNNNNNNN.pt", ...}'
    doc = storage.read_json(latest, what=expected)
    name = doc.get("checkpoint") if isinstance(doc, dict) else None
    if not (isinstance(name, str) and is_checkpoint(name) and "/" not in name):
        got = type(doc).__name__ if not isinstance(doc, dict) else f"checkpoint={name!r}"
        raise InputError(f"{latest}: got {got}, expected {expected}")
    return storage.join(out, name)


# ---------------------------------------------------------------------------- training result

TRAIN_RESULT = "result.json"
TRAIN_RESULT_KIND = "stablerep.train.result"
STAGE_CONFIG = "config.yaml"
"""The resolved config a stage writes beside its outputs (train/ and eval/)."""


@dataclass
class TrainResult:
    """A finished training run: what rank 0 publishes as ``<train.out>/result.json``.

    Every consumer (``stablerep train``, the pipeline's train step after torchrun or a cluster
    job, the KFP metrics) reads this; none derives it from ``metrics.jsonl``.
    """

    out: str  # the training folder
    steps: int  # optimizer steps reached (= the run's total)
    final_loss: float  # mean loss over ranks of the last logged training step (NaN = unknown)
    images_per_s: float  # images/s over all ranks in the last logged window (log_every steps)
    world_size: int  # training processes
    seconds: float  # wall time of the training loop in the process that finished the run
    method: str  # training objective (train.method)
    model: str  # timm backbone (train.model)
    checkpoint: str  # the last ckpt-*.pt
    latest: str  # latest.json, which names it
    backbone: str  # the exported backbone.pt ("" on ranks other than 0)
    metrics: str  # metrics.jsonl

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``result.json`` (an unknown loss is null)."""
        doc: dict[str, Any] = {"kind": TRAIN_RESULT_KIND, "version": 1, **vars(self)}
        if doc["final_loss"] != doc["final_loss"]:  # NaN is not JSON
            doc["final_loss"] = None
        return doc


# Keys of result.json and the JSON types they take (null is allowed for final_loss only).
_RESULT_KEYS: dict[str, type | tuple[type, ...]] = {
    "out": str, "steps": int, "final_loss": (int, float), "images_per_s": (int, float),
    "world_size": int, "seconds": (int, float), "method": str, "model": str,
    "checkpoint": str, "latest": str, "backbone": str, "metrics": str}


def write_train_result(result: TrainResult) -> str:
    """Publish ``<result.out>/result.json`` atomically (rank 0, after the run); its URI."""
    uri = storage.join(result.out, TRAIN_RESULT)
    storage.write_json(uri, result.to_json())
    return uri


def read_train_result(out: str) -> TrainResult:
    """The ``result.json`` of the training folder ``out``.

    Raises:
        InputError: naming the file, when it is missing (the run did not finish), not a JSON
            object, of another kind, or lacks a key or has one of the wrong type.
    """
    uri = storage.join(out, TRAIN_RESULT)
    if not storage.exists(uri):
        raise InputError(f"{uri}: no training result (the run has not finished; "
                         "`stablerep train` writes it at the end)")
    writer = "stablerep train"
    doc = read_json_object(uri, "JSON training result", writer=writer)
    if doc.get("kind") != TRAIN_RESULT_KIND:
        raise InputError(f"{uri}: kind {doc.get('kind')!r}; expected {TRAIN_RESULT_KIND!r} "
                         f"(the training result that `{writer}` writes)")
    for key, kind in _RESULT_KEYS.items():
        value = doc.get(key)
        if key not in doc:
            raise InputError(f"{uri}: missing key {key!r}; expected the training result that "
                             f"`{writer}` writes")
        if value is None and key == "final_loss":
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "number"
            raise InputError(f"{uri}: key {key!r}: got {value!r}, expected {names}")
    values = {k: doc[k] for k in _RESULT_KEYS}
    values["final_loss"] = float("nan") if doc["final_loss"] is None else doc["final_loss"]
    return TrainResult(**values)


# ---------------------------------------------------------------------------- eval outputs

EVAL_METRICS = "metrics.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def write_eval_metrics(out: str, metrics: dict[str, Any]) -> str:
    """Publish ``out/metrics.json`` (the last write of an evaluation: the run is done)."""
    uri = storage.join(out, EVAL_METRICS)
    storage.write_json(uri, metrics)
    return uri
