"""Reading generated image shards: discovery, tar streaming, regrouping images by caption.

An images folder (``stablerep generate``'s output) holds ``shard-XXXXXX.tar`` files, each
finished one with a ``shard-XXXXXX.json`` beside it. :func:`discover` lists the finished shards
of one or more folders; :func:`iter_caption_groups` streams a shard through storage.py (any URI)
and yields one :class:`CaptionGroup` per caption: its text and its images' encoded bytes, in
the order they are stored (adjacent, by the images contract).

Before a shard is read its bytes are checked against the sha256 its json records (a corrupt or
replaced shard fails naming it); ``verify=False`` skips this for huge shards on trusted
storage. Remote shards are spooled to a local temporary file while hashing, so each is
downloaded once. A sample that cannot be used (missing image member, bad key) is skipped,
logged with its key and counted; more than ``max_errors`` of them in one shard, or a tar that
cannot be parsed, fails naming the shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from stablerep import storage
from stablerep.contracts import (
    IMAGE_EXTS,
    KEY_PATTERN,
    ShardRef,
    check_complete,
    finished_shards,
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


class ShardError(InputError):
    """A shard is unreadable or has too many corrupt samples."""


def discover(folders: list[str], *, verify: bool = True) -> list[ShardRef]:
    """The finished shards (those with a json) of the given images folders, sorted.

    Args:
        folders: images folders (URIs).
        verify: require each json to record its tar's sha256 (checked when the tar is read).

    Raises:
        InputError: a folder is missing or holds no finished shard, a json is malformed, or
            a shard that the records count is not committed (named; see
            :func:`stablerep.contracts.check_complete`).
    """
    refs: list[ShardRef] = []
    for folder in folders:
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


def _hash_copy(src: io.BufferedIOBase, dst: io.BufferedIOBase | None) -> str:
    """sha256 of what ``src`` holds from here on, copied to ``dst`` (when given)."""
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _verified(uri: str, sha256: str | None) -> Iterator[io.BufferedIOBase]:
    """``uri`` opened for reading, after its bytes were found to hash to ``sha256``.

    None skips the check and streams the shard directly.
    """
    if sha256 is None:
        with storage.open_read(uri) as raw:
            yield raw
        return
    with contextlib.ExitStack() as stack:
        # a remote shard is downloaded once: spooled locally while hashing, read from there
        spool = (None if storage.is_local(uri)
                 else stack.enter_context(tempfile.TemporaryFile(prefix="stablerep-shard-")))
        with storage.open_read(uri) as raw:
            got = _hash_copy(raw, spool)
        if got != sha256:
            raise ShardError(f"{uri}: sha256 {got[:16]}... does not match {sha256[:16]}... "
                             "recorded in its json: the shard is corrupt or was replaced; "
                             "generate it again (or train with --no-verify)")
        if spool is None:
            yield stack.enter_context(storage.open_read(uri))
        else:
            spool.seek(0)
            yield spool


def _samples(uri: str, stats: ShardStats, sha256: str | None, log_skips: bool
             ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order."""
    key, members = None, {}
    try:
        with _verified(uri, sha256) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    stats.bad_samples += 1
                    if log_skips:
                        log.warning("%s: skipped member %r: no extension (expected KEY.EXT)",
                                    uri, info.name)
                    continue
                k, ext = split_member(base)
                data = tar.extractfile(info).read()
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, storage.StorageError):
            raise
        raise ShardError(f"{uri}: not a readable tar shard ({type(e).__name__}: {e})") from None
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
                        sha256: str | None = None, log_skips: bool = True
                        ) -> Iterator[CaptionGroup]:
    """Stream one shard as caption groups.

    Args:
        uri: the tar.
        max_errors: unusable samples tolerated before the shard fails.
        stats: filled with the counts of what was skipped.
        sha256: the tar's expected sha256, checked before any sample is read (None: no check).
        log_skips: log each skipped sample with its key (a warning).

    Raises:
        ShardError: the tar does not match ``sha256``, cannot be parsed, or holds more than
            ``max_errors`` unusable samples.
    """
    stats = stats or ShardStats(uri)
    group: CaptionGroup | None = None
    for key, members in _samples(uri, stats, sha256, log_skips):
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
