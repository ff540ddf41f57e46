"""Reading generated image shards: discovery, tar streaming, regrouping images by caption.

An images folder (``stablerep generate``'s output) holds ``shard-XXXXXX.tar`` files, each
finished one with a ``shard-XXXXXX.json`` beside it, and once every shard is done a
``manifest.json`` listing them all. :func:`discover` lists the finished shards of one or more
folders -- from the manifest (one read per folder) when there is one, else from the shard
records; :func:`iter_caption_groups` streams a shard through storage.py (any URI) and yields
one :class:`CaptionGroup` per caption: its text and its images' encoded bytes, in the order
they are stored (adjacent, by the images contract).

A shard is checked while it streams: its bytes are hashed as they are read and parsed (one
download, no temporary file), and its caption groups are held back until the whole tar has
been read and matches the sha256 (and the sample and caption counts) that its json or the
manifest records; only then are they released, so nothing of a corrupt or replaced shard is
ever used. The cost is one shard's encoded images in memory per reading stream (what the
shuffle buffer holds anyway); ``verify=False`` streams unchecked for trusted storage. A
sample that cannot be used (missing image member, bad key) is skipped, logged with its key
and counted; more than ``max_errors`` of them in one shard, or a tar that cannot be parsed,
fails naming the shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from stablerep import storage
from stablerep.contracts import (
    IMAGE_EXTS,
    KEY_PATTERN,
    ShardRef,
    check_complete,
    finished_shards,
    images_manifest_refs,
    is_shard_json,
    shard_ref_of,
    split_member,
)
from stablerep.errors import InputError

__all__ = ["IMAGE_EXTS", "CaptionGroup", "ShardError", "ShardRef", "ShardStats", "discover",
           "iter_caption_groups"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read while hashing


@dataclass
class CaptionGroup:
    """All stored images of one caption."""

    caption_id: int
    caption: str
    images: list[bytes] = field(default_factory=list)  # encoded, in stored order (j)
    keys: list[str] = field(default_factory=list)  # the sample key of each image
    shard: str = ""  # the tar it was read from


@dataclass
class ShardStats:
    """Problems met while reading one shard."""

    uri: str
    bad_samples: int = 0
    samples: int = 0  # samples read (usable or not)


class ShardError(InputError):
    """A shard is unreadable or has too many corrupt samples."""


def discover(folders: list[str], *, verify: bool = True) -> list[ShardRef]:
    """The finished shards of the given images folders, sorted.

    A folder with a ``manifest.json`` costs one read (its shard list); one without is
    listed and each shard record read.

    Args:
        folders: images folders (URIs).
        verify: require each shard's sha256 (checked when the tar is read).

    Raises:
        InputError: a folder is missing or holds no finished shard, a json or the manifest
            is malformed, or a shard that the records count is not committed (named; see
            :func:`stablerep.contracts.check_complete`).
    """
    refs: list[ShardRef] = []
    for folder in folders:
        listed = images_manifest_refs(folder, verify=verify)
        if listed is not None:
            refs += listed
            continue
        if not storage.exists(folder):
            raise InputError(f"{folder}: no such images folder")
        docs = finished_shards(folder)
        if not docs:
            raise InputError(f"{folder}: no finished shard (no shard-*.json); run "
                             "`stablerep generate` first")
        records = {uri: storage.read_json(uri) for uri in docs}
        refs += [shard_ref_of(folder, uri, doc, verify=verify) for uri, doc in records.items()]
        check_complete(folder, {u: d for u, d in records.items() if isinstance(d, dict)})
    return sorted(refs, key=lambda r: r.uri)


class _HashingReader:
    """A read-only stream that hashes every byte read through it (sha256)."""

    def __init__(self, raw):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def drain(self) -> str:
        """Read (and hash) what is left after the tar's end; the hex digest of it all."""
        while self.read(CHUNK):
            pass
        return self.digest.hexdigest()


def _rest_hashed(reader: _HashingReader) -> str:
    """The digest of the whole stream after a parse error (the rest read and hashed)."""
    try:
        return reader.drain()
    except OSError:
        return ""


def _check_sha256(uri: str, got: str, sha256: str, record: str) -> None:
    if got == sha256:
        return
    where = "its json" if not record or is_shard_json(record) else f"its json and in {record}"
    raise ShardError(f"{uri}: sha256 {got[:16]}... does not match {sha256[:16]}... recorded "
                     f"in {where}: the shard is corrupt or was replaced; generate it again "
                     "(or train with --no-verify)")


@contextlib.contextmanager
def _open(uri: str, record: str) -> Iterator[io.BufferedIOBase]:
    """``storage.open_read(uri)``; a missing shard that a json lists (``record``) is a
    ShardError naming that json; without one, the storage layer's StorageNotFound stands."""
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(storage.open_read(uri))
        except storage.StorageNotFound:
            if not record:
                raise
            raise ShardError(f"{uri}: no such shard; {record} lists it") from None
        yield raw


def _samples(uri: str, stats: ShardStats, sha256: str | None, log_skips: bool,
             record: str = "") -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order; with ``sha256``, the hash is checked
    after the last sample (the caller holds the samples back until then)."""
    key, members, got = None, {}, None
    with _open(uri, record) as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = info.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        stats.bad_samples += 1
                        if log_skips:
                            log.warning("%s: skipped member %r: no extension (expected "
                                        "KEY.EXT)", uri, info.name)
                        continue
                    k, ext = split_member(base)
                    data = tar.extractfile(info).read()
                    if k != key:
                        if key is not None:
                            yield key, members
                        key, members = k, {}
                    members[ext] = data
            got = reader.drain() if sha256 is not None else None
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, storage.StorageError):
                raise
            if sha256 is not None:  # other bytes than the recorded ones: say that first
                _check_sha256(uri, _rest_hashed(reader), sha256, record)
            raise ShardError(f"{uri}: not a readable tar shard ({type(e).__name__}: {e})"
                             ) from None
    if got is not None:
        _check_sha256(uri, got, sha256, record)
    if key is not None:
        yield key, members


def _parse(key: str, members: dict[str, bytes]) -> tuple[int, str, bytes] | str:
    """(caption_id, caption, image bytes) of a sample, or why it cannot be used."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    text = members.get("txt")
    m = KEY_PATTERN.fullmatch(key)
    if m is None:
        return "its key is not CAPTIONID_J"
    if image is None:
        return f"no image member ({'/'.join(IMAGE_EXTS)}); it has {sorted(members)}"
    if text is None:
        return "no txt member (the caption)"
    try:
        caption = text.decode("utf-8")
    except UnicodeDecodeError:
        return "its txt member is not UTF-8"
    return int(m["caption_id"]), caption, image


def iter_caption_groups(uri: str, *, max_errors: int = 10, stats: ShardStats | None = None,
                        sha256: str | None = None, log_skips: bool = True,
                        expect: tuple[int, int] | None = None, record: str = ""
                        ) -> Iterator[CaptionGroup]:
    """Stream one shard as caption groups.

    Args:
        uri: the tar.
        max_errors: unusable samples tolerated before the shard fails.
        stats: filled with the counts of what was skipped.
        sha256: the tar's expected sha256, computed while the tar streams; no group is
            yielded before the whole tar matches it (None: no check, groups as they come).
        log_skips: log each skipped sample with its key (a warning).
        expect: (samples, captions) the json says the verified tar holds (checked with
            ``sha256``).
        record: the json that lists the shard, named in errors.

    Raises:
        ShardError: the tar is missing, does not match ``sha256`` or ``expect``, cannot be
            parsed, or holds more than ``max_errors`` unusable samples.
    """
    if sha256 is None:
        yield from _groups(uri, max_errors, stats or ShardStats(uri), None, log_skips, record)
        return
    stats = stats or ShardStats(uri)
    held = list(_groups(uri, max_errors, stats, sha256, log_skips, record))  # verified first
    samples = sum(len(g.keys) for g in held)  # usable ones, as the json counts them
    if expect is not None and (samples, len(held)) != tuple(expect):
        raise ShardError(f"{uri}: holds {samples} samples of {len(held)} captions; "
                         f"{record or 'its json'} says {expect[0]} of {expect[1]}")
    yield from held


def _groups(uri: str, max_errors: int, stats: ShardStats, sha256: str | None,
            log_skips: bool, record: str) -> Iterator[CaptionGroup]:
    group: CaptionGroup | None = None
    for key, members in _samples(uri, stats, sha256, log_skips, record):
        stats.samples += 1
        parsed = _parse(key, members)
        if isinstance(parsed, str):
            stats.bad_samples += 1
            if log_skips:
                log.warning("%s: skipped sample %r: %s", uri, key, parsed)
            if stats.bad_samples > max_errors:
                raise ShardError(f"{uri}: more than {max_errors} unusable samples (last: "
                                 f"{key!r}: {parsed}); the shard looks corrupt")
            continue
        caption_id, caption, image = parsed
        if group is None or group.caption_id != caption_id:
            if group is not None:
                yield group
            group = CaptionGroup(caption_id, caption, shard=uri)
        group.images.append(image)
        group.keys.append(key)
    if group is not None:
        yield group
