"""Reading generated image shards: discovery, tar streaming, regrouping images by caption.

An images folder (``stablerep generate``'s output) holds ``shard-XXXXXX.tar`` files, each
finished one with a ``shard-XXXXXX.json`` beside it. :func:`discover` lists the finished shards
of one or more folders; :func:`iter_caption_groups` streams a shard through storage.py (any URI)
and yields one :class:`CaptionGroup` per caption: its text and its images' encoded bytes, in
the order they are stored (adjacent, by the images contract).

A sample that cannot be used (missing image member, bad key) is skipped and counted; more than
``max_errors`` of them in one shard, or a tar that cannot be parsed, fails naming the shard.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from stablerep import storage
from stablerep.errors import InputError

IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")


@dataclass(frozen=True)
class ShardRef:
    """A finished shard: its tar URI and what its json says."""

    uri: str
    num_captions: int
    num_samples: int
    images_per_caption: int


@dataclass
class CaptionGroup:
    """All stored images of one caption."""

    caption_id: int
    caption: str
    images: list[bytes] = field(default_factory=list)  # encoded, in stored order (j)


@dataclass
class ShardStats:
    """Problems met while reading one shard."""

    uri: str
    bad_samples: int = 0


class ShardError(InputError):
    """A shard is unreadable or has too many corrupt samples."""


def discover(folders: list[str]) -> list[ShardRef]:
    """The finished shards (those with a json) of the given images folders, sorted.

    Raises:
        InputError: a folder is missing or holds no finished shard.
    """
    refs: list[ShardRef] = []
    for folder in folders:
        if not storage.exists(folder):
            raise InputError(f"{folder}: no such images folder")
        docs = [u for u in storage.list_dir(folder)
                if storage.name(u).startswith("shard-") and u.endswith(".json")]
        if not docs:
            raise InputError(f"{folder}: no finished shard (no shard-*.json); run "
                             "`stablerep generate` first")
        for doc_uri in docs:
            doc = storage.read_json(doc_uri)
            try:
                refs.append(ShardRef(storage.join(folder, doc["tar"]), int(doc["num_captions"]),
                                     int(doc["num_samples"]), int(doc["images_per_caption"])))
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{doc_uri}: not a stablerep shard json") from None
    return sorted(refs, key=lambda r: r.uri)


def _samples(uri: str, stats: ShardStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in tar order."""
    key, members = None, {}
    try:
        with storage.open_read(uri) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    stats.bad_samples += 1
                    continue
                k, ext = base.split(".", 1)
                data = tar.extractfile(info).read()
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, storage.StorageError):
            raise
        raise ShardError(f"{uri}: not a readable tar shard ({type(e).__name__}: {e})") from None
    if key is not None:
        yield key, members


def _parse(key: str, members: dict[str, bytes]) -> tuple[int, str, bytes] | None:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    text = members.get("txt")
    caption_id, _, j = key.rpartition("_")
    if image is None or text is None or not caption_id.isdigit() or not j.isdigit():
        return None
    try:
        caption = text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return int(caption_id), caption, image


def iter_caption_groups(uri: str, *, max_errors: int = 10,
                        stats: ShardStats | None = None) -> Iterator[CaptionGroup]:
    """Stream one shard as caption groups.

    Args:
        uri: the tar.
        max_errors: unusable samples tolerated before the shard fails.
        stats: filled with the counts of what was skipped.
    """
    stats = stats or ShardStats(uri)
    group: CaptionGroup | None = None
    for key, members in _samples(uri, stats):
        parsed = _parse(key, members)
        if parsed is None:
            stats.bad_samples += 1
            if stats.bad_samples > max_errors:
                raise ShardError(f"{uri}: more than {max_errors} unusable samples (last: "
                                 f"{key!r}); the shard looks corrupt")
            continue
        caption_id, caption, image = parsed
        if group is None or group.caption_id != caption_id:
            if group is not None:
                yield group
            group = CaptionGroup(caption_id, caption)
        group.images.append(image)
    if group is not None:
        yield group
