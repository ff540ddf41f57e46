"""Evaluation data sets behind one small interface: (image, label) for train and test.

Names (``eval.datasets``):

- ``sklearn:digits`` — the 1,797 real 8x8 handwritten digits shipped inside scikit-learn;
  split (documented, none is official): stratified, 2/3 train and 1/3 test, seed 0.
- ``imagefolder:<URI>`` — ``train/<class>/*`` and ``test/<class>/*`` (or ``val/``) at any URI;
  a remote folder is copied once to the local cache through storage.py.
- ``torchvision:<Name>`` — CIFAR10, CIFAR100, FGVCAircraft, StanfordCars, DTD, Flowers102,
  OxfordIIITPet, SUN397, Caltech101, Food101, ImageNet; read from ``eval.data_cache`` (a
  missing data set is downloaded only with ``eval.download``). Official splits; where a data
  set has none (SUN397, Caltech101) a documented, seeded split is used (see SPLITS).

An image that cannot be decoded yields ``None``; feature extraction skips and counts it.
:func:`check_readable` runs before any feature is extracted: a split in which no image
decodes fails there, naming the data set.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stablerep import storage
from stablerep.errors import InputError

# what a corrupt file raises while decoding (a damaged header can claim a huge size)
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError,
                 Image.DecompressionBombError)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

SPLITS: dict[str, str] = {
    "sklearn:digits": "stratified 2/3 train, 1/3 test (seed 0)",
    "CIFAR10": "official train / test", "CIFAR100": "official train / test",
    "FGVCAircraft": "official trainval / test", "StanfordCars": "official train / test",
    "DTD": "official train+val / test (partition 1)",
    "Flowers102": "official train+val / test", "OxfordIIITPet": "official trainval / test",
    "Food101": "official train / test", "ImageNet": "official train / val",
    "SUN397": "no official split here: stratified half to train (scikit-learn, seed 0)",
    "Caltech101": "no official split: 30 images per class train, the rest test (seed 0)",
}


@dataclass
class ImageList:
    """A split: a length and a loader of (PIL image or None, label) by index."""

    labels: np.ndarray  # (n,) int64
    load: Callable[[int], Image.Image | None]
    split: str = ""  # the split's name in messages (train, test, val)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image | None, int]:
        return self.load(i), int(self.labels[i])


@dataclass
class EvalData:
    """A data set's two splits and class names."""

    name: str
    classes: list[str]
    train: ImageList
    test: ImageList
    split_note: str = ""
    extra: dict = field(default_factory=dict)


def decode(data: bytes) -> Image.Image | None:
    """Decode image bytes to RGB, or None when they are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except DECODE_ERRORS:
        return None


# ---------------------------------------------------------------------------- sklearn


def load_digits_data(seed: int = 0) -> EvalData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)  # (1797, 8, 8)
    idx = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(idx, test_size=1 / 3, random_state=seed,
                                           stratify=digits.target)

    def split(rows: np.ndarray, name: str) -> ImageList:
        return ImageList(digits.target[rows].astype(np.int64),
                         lambda i: Image.fromarray(pixels[rows[i]], mode="L").convert("RGB"),
                         name)

    return EvalData("sklearn:digits", [str(c) for c in digits.target_names],
                    split(np.sort(train_idx), "train"), split(np.sort(test_idx), "test"),
                    SPLITS["sklearn:digits"])


# ---------------------------------------------------------------------------- image folders


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        classes[d.name] = files
    return classes


def load_imagefolder(uri: str) -> EvalData:
    try:
        root = storage.cache_local(uri)
    except storage.StorageNotFound:
        raise InputError(f"imagefolder:{uri}: no such folder") from None
    if not root.is_dir():
        raise InputError(f"imagefolder:{uri}: not a folder")
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise InputError(f"imagefolder:{uri}: expected train/<class>/* and test/<class>/* "
                         "(or val/) inside")
    train, test = _class_files(train_dir), _class_files(test_dir)
    if not train or not any(train.values()):
        raise InputError(f"imagefolder:{uri}: train/ holds no class folder with images")
    if not any(test.values()):
        raise InputError(f"imagefolder:{uri}: {test_dir.name}/ holds no class folder with images")
    if set(train) != set(test):
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise InputError(f"imagefolder:{uri}: train and {test_dir.name} classes differ "
                         f"(only in train: {only_train[:5]}; only in {test_dir.name}: "
                         f"{only_test[:5]})")
    empty = [f"{s}/{c}" for s, files in (("train", train), (test_dir.name, test))
             for c, found in files.items() if not found]
    if empty:
        raise InputError(f"imagefolder:{uri}: class folders with no image: {empty[:5]}; every "
                         f"class needs images in train/ and {test_dir.name}/")
    classes = sorted(train)

    def split(files: dict[str, list[Path]], name: str) -> ImageList:
        paths = [(p, classes.index(c)) for c in classes for p in files[c]]
        return ImageList(np.array([y for _, y in paths], dtype=np.int64),
                         lambda i: decode(paths[i][0].read_bytes()), name)

    return EvalData(f"imagefolder:{uri}", classes, split(train, "train"),
                    split(test, test_dir.name), f"train / {test_dir.name} folders")


# ---------------------------------------------------------------------------- torchvision


def _tv_split(cls, root: str, name: str, download: bool, seed: int):
    """(train dataset, test dataset, train indices or None, test indices or None)."""
    kw = {"root": root, "download": download}
    if name in ("CIFAR10", "CIFAR100"):
        return cls(train=True, **kw), cls(train=False, **kw), None, None
    if name in ("FGVCAircraft", "OxfordIIITPet"):
        return cls(split="trainval", **kw), cls(split="test", **kw), None, None
    if name in ("StanfordCars", "Food101"):
        return cls(split="train", **kw), cls(split="test", **kw), None, None
    if name in ("DTD", "Flowers102"):
        import torch.utils.data as tud

        both = tud.ConcatDataset([cls(split="train", **kw), cls(split="val", **kw)])
        return both, cls(split="test", **kw), None, None
    if name == "ImageNet":
        return cls(root=root, split="train"), cls(root=root, split="val"), None, None
    full = cls(**kw)
    train_idx, test_idx = seeded_split(np.asarray(_labels_of(full)),
                                       per_class=30 if name == "Caltech101" else None,
                                       seed=seed)
    return full, full, train_idx, test_idx


def seeded_split(labels: np.ndarray, *, per_class: int | None,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented split of a data set without an official one, by scikit-learn.

    ``per_class=None``: half of the images to train, stratified
    (``train_test_split(stratify=labels)``); else ``per_class`` images of each class to train
    (fewer where a class has no more than that: all but one) and the rest to test.

    Args:
        labels: (n,) integer labels of the whole data set.
        per_class: train images per class, or None for a stratified half.
        seed: ``random_state`` of the splitter(s).

    Returns:
        (train indices, test indices), each sorted.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if per_class is None:
        train, test = train_test_split(idx, test_size=0.5, random_state=seed, stratify=labels)
        return np.sort(train), np.sort(test)
    train, test = [], []
    for c in np.unique(labels):
        rows = idx[labels == c]
        if len(rows) < 2:  # a lone image can only train
            train.append(rows)
            continue
        tr, te = train_test_split(rows, train_size=min(per_class, len(rows) - 1),
                                  random_state=seed)
        train.append(tr)
        test.append(te)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test or [idx[:0]]))


def _labels_of(ds) -> list[int]:
    for attr in ("targets", "_labels", "y", "labels", "_samples"):
        if hasattr(ds, attr):
            values = getattr(ds, attr)
            if attr == "_samples":
                return [s[1] for s in values]
            return list(values)
    if hasattr(ds, "datasets"):  # ConcatDataset
        return [y for d in ds.datasets for y in _labels_of(d)]
    return [ds[i][1] for i in range(len(ds))]


def load_torchvision(name: str, *, data_cache: str, download: bool, seed: int) -> EvalData:
    import torchvision.datasets as tvd

    if name not in SPLITS or name == "sklearn:digits" or not hasattr(tvd, name):
        known = ", ".join(k for k in SPLITS if k != "sklearn:digits")
        raise InputError(f"torchvision:{name}: unknown data set; known: {known}")
    root = str(data_root(name, data_cache))
    try:
        train, test, tr_idx, te_idx = _tv_split(getattr(tvd, name), root, name, download, seed)
    except RuntimeError as e:
        raise InputError(f"torchvision:{name}: not found under {root} ({str(e).splitlines()[0]});"
                         " put it there, or set eval.download=true where there is network"
                         ) from None

    def split(ds, rows, name: str) -> ImageList:
        labels = np.asarray(_labels_of(ds), dtype=np.int64)
        rows = np.arange(len(labels)) if rows is None else rows

        def load(i: int) -> Image.Image | None:
            try:
                return ds[int(rows[i])][0].convert("RGB")
            except DECODE_ERRORS:
                return None

        return ImageList(labels[rows], load, name)

    classes = [str(c) for c in getattr(train, "classes", [])] or [
        str(i) for i in range(int(max(_labels_of(train))) + 1)]
    test_split = "val" if name == "ImageNet" else "test"
    return EvalData(f"torchvision:{name}", classes, split(train, tr_idx, "train"),
                    split(test, te_idx, test_split), SPLITS[name])


# ---------------------------------------------------------------------------- dispatch

KNOWN = ("sklearn:digits", "imagefolder:<URI>", "torchvision:<Name>")


def load_dataset(spec: str, *, data_cache: str = "", download: bool = False,
                 seed: int = 0) -> EvalData:
    """The data set named by ``spec`` (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if spec == "sklearn:digits":
        return load_digits_data(seed)
    if kind == "imagefolder" and arg:
        return load_imagefolder(arg)
    if kind == "torchvision" and arg:
        return load_torchvision(arg, data_cache=data_cache, download=download, seed=seed)
    raise InputError(f"eval.datasets: unknown data set {spec!r}; known: {', '.join(KNOWN)}")


def check_names(specs: Sequence[str]) -> None:
    """Fail early on a malformed or unknown data set name (before any model is built)."""
    for spec in specs:
        kind, _, arg = spec.partition(":")
        ok = spec == "sklearn:digits" or (kind == "imagefolder" and arg) or (
            kind == "torchvision" and arg in SPLITS and arg != "sklearn:digits")
        if not ok:
            known = ", ".join(KNOWN) + " (torchvision names: " + ", ".join(
                k for k in SPLITS if k != "sklearn:digits") + ")"
            raise InputError(f"eval.datasets: unknown data set {spec!r}; known: {known}")


# ---------------------------------------------------------------------------- checks


def data_root(name: str, data_cache: str) -> Path:
    """Where ``torchvision:<name>`` is read from: ``<data_cache>/<name>`` (default cache)."""
    return Path(data_cache or storage.cache_dir() / "datasets") / name


def _present(spec: str, data_cache: str) -> bool:
    kind, _, arg = spec.partition(":")
    if kind == "torchvision":
        root = data_root(arg, data_cache)  # a failed read can leave empty folders behind
        return root.is_dir() and any(p.is_file() for p in root.rglob("*"))
    if kind == "imagefolder" and "://" not in arg:  # a remote folder is checked when read
        return (Path(arg) / "train").is_dir()
    return True


def check_available(specs: Sequence[str], *, data_cache: str = "",
                    download: bool = False) -> None:
    """Fail, naming every missing data set and how to provide it, before any stage runs.

    A ``torchvision:<Name>`` data set must be a folder ``<data_cache>/<Name>`` holding files
    (torchvision's layout; not checked with ``download``, except ImageNet, which torchvision
    cannot download); a local ``imagefolder:`` needs its
    ``train/`` folder. Names are checked too (:func:`check_names`).

    Args:
        specs: the ``eval.datasets`` names.
        data_cache: ``eval.data_cache`` ("" = the stablerep cache).
        download: ``eval.download``.

    Raises:
        InputError: one line listing what is missing.
    """
    check_names(specs)
    missing = [s for s in specs if not (download and s.startswith("torchvision:")
                                        and s != "torchvision:ImageNet")
               and not _present(s, data_cache)]
    if not missing:
        return
    cache = data_root("", data_cache)
    raise InputError(
        f"eval.datasets: {', '.join(missing)} not found (torchvision data sets are read from "
        f"{cache}/<Name>, an imagefolder needs train/ and test/); put them there in "
        "torchvision's layout (ImageNet: the ILSVRC2012 devkit and train/val tars), set "
        "eval.data_cache to the folder that holds them, set eval.download=true where there is "
        "network (not ImageNet), or list only the data sets you have in eval.datasets")



def check_readable(data: EvalData) -> None:
    """Fail unless each split of ``data`` holds at least one image that decodes.

    Images are tried in order until one decodes, so a healthy data set costs one decode per
    split; a split of only unreadable files is read once, here, before any model runs.
    """
    for images, default in ((data.train, "train"), (data.test, "test")):
        if len(images) == 0:
            raise InputError(f"{data.name}: its {images.split or default} split holds no image")
        if not any(images.load(i) is not None for i in range(len(images))):
            raise InputError(f"{data.name}: no image could be read in its "
                             f"{images.split or default} split ({len(images)} files tried; "
                             "none decodes as an image)")
