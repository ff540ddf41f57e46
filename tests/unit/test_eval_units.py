"""Evaluation pieces in isolation (pure CPU, seconds): data set readers, backbone loading,
and the feature cache.

Backbones are tiny ViTs at 32 px with random weights; image folders hold small generated
PNGs in a temporary folder; torchvision data sets are looked for in an empty temporary
``data_cache`` (nothing is downloaded).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablerep.config import TrainConfig
from stablerep.errors import InputError
from stablerep.evaluation.backbones import load_backbone, random_like
from stablerep.evaluation.datasets import (
    ImageList,
    check_names,
    check_readable,
    decode,
    load_dataset,
    load_digits_data,
)
from stablerep.evaluation.features import Features, cache_uri, features_for, load_cached
from stablerep.models import create_model
from stablerep.training.checkpoint import export_backbone, save_checkpoint
from stablerep.training.trainer import model_info

TIMM = "timm:vit_tiny_patch16_224"
TINY = dict(model="vit_tiny", image_size=32, head_hidden_dim=64, head_out_dim=32)


def _png(color: tuple[int, int, int], size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png`` with ``layout[split][class]`` images each."""
    for split, classes in layout.items():
        for c, (name, count) in enumerate(classes.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (root / split / name / f"{i}.png").write_bytes(_png((80 * c, 10 * i, 50)))
    return root


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- data sets


def test_digits_split_sizes_stratified_and_deterministic():
    data = load_digits_data()
    assert (len(data.train), len(data.test)) == (1198, 599)
    assert data.classes == [str(i) for i in range(10)]
    train_counts = np.bincount(data.train.labels, minlength=10)
    test_counts = np.bincount(data.test.labels, minlength=10)
    total = train_counts + test_counts
    assert total.sum() == 1797
    assert np.all(np.abs(test_counts - total / 3) <= 1)  # stratified: 1/3 of every class
    image, label = data.train[5]
    assert image.mode == "RGB" and image.size == (8, 8) and label == data.train.labels[5]
    again = load_digits_data()
    assert np.array_equal(again.test.labels, data.test.labels)
    for i in (0, 17, 598):
        assert np.array_equal(np.asarray(again.test.load(i)), np.asarray(data.test.load(i)))
    other = load_digits_data(seed=1)
    assert not all(np.array_equal(np.asarray(other.test.load(i)), np.asarray(data.test.load(i)))
                   for i in range(20))


def test_imagefolder_local_with_test_or_val(tmp_path: Path):
    root = _folder(tmp_path / "a", {"train": {"b_dog": 3, "a_cat": 2},
                                    "test": {"b_dog": 1, "a_cat": 2}})
    (root / "train" / "a_cat" / "notes.txt").write_text("not an image")
    (root / "train" / "a_cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    data = load_dataset(f"imagefolder:{root}")
    assert data.name == f"imagefolder:{root}" and data.classes == ["a_cat", "b_dog"]
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # 2 PNGs + bad.png, then 3
    assert data.test.labels.tolist() == [0, 0, 1]
    loaded = [data.train[i][0] for i in range(len(data.train))]
    assert sum(im is None for im in loaded) == 1  # bad.png: None, counted later
    assert all(im.mode == "RGB" for im in loaded if im is not None)

    val = _folder(tmp_path / "v", {"train": {"x": 2, "y": 2}, "val": {"x": 1, "y": 1}})
    data = load_dataset(f"imagefolder:{val}")
    assert len(data.test) == 2 and "val" in data.split_note


@pytest.mark.parametrize("layout, expected", [
    ({"train": {}, "test": {}}, "train/ holds no class folder with images"),
    ({"train": {"x": 2}}, "expected train/<class>/* and test/<class>/*"),
    ({"train": {"x": 2, "y": 1}, "test": {"x": 1, "z": 1}},
     "train and test classes differ (only in train: ['y']; only in test: ['z'])"),
    ({"train": {"x": 2, "y": 1}, "val": {"x": 0, "y": 0}}, "val/ holds no class folder"),
    ({"train": {"x": 2, "y": 0}, "test": {"x": 1, "y": 1}},
     "class folders with no image: ['train/y']; every class needs images in train/ and test/"),
])
def test_imagefolder_errors(tmp_path: Path, layout: dict, expected: str):
    root = tmp_path / "f"
    for split in layout:
        (root / split).mkdir(parents=True)
    _folder(root, layout)
    with pytest.raises(InputError) as err:
        load_dataset(f"imagefolder:{root}")
    assert expected in str(err.value) and str(root) in str(err.value)


def test_check_readable_needs_one_decodable_image_per_split(tmp_path: Path):
    root = _folder(tmp_path / "f", {"train": {"x": 2, "y": 2}, "val": {"x": 1, "y": 1}})
    data = load_dataset(f"imagefolder:{root}")
    for image in (root / "train" / "x").iterdir():  # the first images of train/ are bad
        image.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    check_readable(data)
    for image in (root / "val").rglob("*.png"):
        image.write_bytes(os.urandom(200))
    with pytest.raises(InputError) as err:
        check_readable(data)
    assert str(err.value) == (f"imagefolder:{root}: no image could be read in its val split "
                              "(2 files tried; none decodes as an image)")


def test_imagefolder_missing(tmp_path: Path):
    where = re.escape(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match=f"^imagefolder:{where}: no such folder$"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


def test_decode_corrupt_images_give_none():
    assert decode(_png((1, 2, 3))).size == (12, 12)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    bmp = bytearray(buf.getvalue())
    bmp[18:26] = struct.pack("<ii", 20000, 20000)  # header claims 400 Mpx: a "bomb"
    for data in (b"", os.urandom(300), _png((1, 2, 3))[:50], bytes(bmp)):
        assert decode(data) is None


def test_unknown_names(tmp_path: Path):
    for spec in ("mnist", "sklearn:iris", "imagefolder:", "torchvision:MNIST"):
        with pytest.raises(InputError, match="unknown data set") as err:
            check_names(["sklearn:digits", spec])
        assert "sklearn:digits" in str(err.value) and "CIFAR10" in str(err.value)
    with pytest.raises(InputError, match="torchvision:MNIST: unknown data set; known: CIFAR10"):
        load_dataset("torchvision:MNIST", data_cache=str(tmp_path))
    with pytest.raises(InputError, match="unknown data set 'nosuch:x'"):
        load_dataset("nosuch:x")


@pytest.mark.parametrize("name", ["CIFAR10", "DTD"])
def test_torchvision_missing_data_set_says_how_to_get_it(tmp_path: Path, name: str):
    with pytest.raises(InputError) as err:
        load_dataset(f"torchvision:{name}", data_cache=str(tmp_path))
    message = str(err.value)
    assert f"torchvision:{name}: not found under {tmp_path / name}" in message
    assert "eval.download=true" in message and "\n" not in message
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing downloaded


# ---------------------------------------------------------------------------- backbones


def test_timm_backbone_is_seeded_and_matches_the_random_baseline():
    a = load_backbone(TIMM, image_size=32, seed=0)
    torch.rand(100)  # the global RNG state must not matter
    b = load_backbone(TIMM, image_size=32, seed=0)
    assert a.info == {"timm_model": "vit_tiny_patch16_224", "image_size": 32,
                      "feature_dim": 192}
    assert _same_weights(a.model, b.model) and a.key == b.key
    base = random_like(a.info, seed=0)
    assert _same_weights(a.model, base.model) and base.key == a.key  # same weights, same key
    c = load_backbone(TIMM, image_size=32, seed=1)
    assert not _same_weights(a.model, c.model) and c.key != a.key
    assert load_backbone("timm:vit_tiny", image_size=48).info["image_size"] == 48
    with torch.no_grad():
        assert a.model(torch.zeros(2, 3, 32, 32)).shape == (2, 192)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A training folder (checkpoint + latest.json) and a backbone export of one model."""
    root = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(**TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = create_model(cfg)
    info = model_info(cfg, model.feature_dim)
    ckpt = save_checkpoint(str(root / "run"), {"model": model.state_dict(), "model_info": info,
                                               "step": 7}, step=7, keep=1)
    export_backbone(str(root / "export"), model.backbone.state_dict(), {**info, "step": 7})
    return root, model, ckpt


def test_checkpoint_folder_file_and_export(trained):
    root, model, ckpt = trained
    folder = load_backbone(str(root / "run"))
    assert _same_weights(folder.model, model.backbone)
    assert folder.info["timm_model"] == "vit_tiny_patch16_224" and folder.info["step"] == 7
    assert folder.info["image_size"] == 32 and folder.key.startswith("ckpt-")
    assert load_backbone(ckpt).key == folder.key  # the ckpt-*.pt file itself
    export = load_backbone(str(root / "export"))
    assert _same_weights(export.model, model.backbone) and export.key.startswith("backbone-")
    assert export.info["image_size"] == 32
    assert load_backbone(str(root / "export" / "backbone.pt")).key == export.key
    assert not folder.model.training and not export.model.training


def _bad(path: Path, expected: str) -> None:
    with pytest.raises(InputError) as err:
        load_backbone(str(path))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_checkpoints(tmp_path: Path, trained):
    root, model, _ = trained
    (tmp_path / "random.pt").write_bytes(os.urandom(2048))
    _bad(tmp_path / "random.pt", "not a stablerep checkpoint or timm backbone")
    (tmp_path / "x.json").write_text(json.dumps({"model": "vit_tiny"}))
    _bad(tmp_path / "x.json", "not a stablerep checkpoint or timm backbone")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    _bad(tmp_path / "other.pt", "not a stablerep checkpoint (no model / model_info)")
    torch.save({"model": {}, "model_info": {"step": 1}}, tmp_path / "noinfo.pt")
    _bad(tmp_path / "noinfo.pt", "names no timm_model and image_size")
    _bad(tmp_path / "nowhere", "no such checkpoint, backbone or training folder")
    (tmp_path / "empty").mkdir()
    _bad(tmp_path / "empty", "neither latest.json")

    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "backbone.pt").write_bytes((root / "export" / "backbone.pt").read_bytes())
    _bad(lone / "backbone.pt", "no backbone.json beside it")
    info = json.loads((root / "export" / "backbone.json").read_text())
    (lone / "backbone.json").write_text(json.dumps({**info, "image_size": 64}))
    _bad(lone, "the weights do not fit vit_tiny_patch16_224 at image_size 64")
    (lone / "backbone.json").write_text(json.dumps({**info, "timm_model": "vit_nonesuch"}))
    _bad(lone, "'vit_nonesuch' is not a timm model")
    torch.save({k: v for k, v in model.state_dict().items()}, lone / "backbone.pt")
    (lone / "backbone.json").write_text(json.dumps(info))
    _bad(lone, "the weights do not fit vit_tiny_patch16_224")  # head.* / backbone.* keys
    with pytest.raises(InputError, match="timm:vit_nonesuch: cannot create this timm backbone"):
        load_backbone("timm:vit_nonesuch")


# ---------------------------------------------------------------------------- features


def test_a_split_with_no_decodable_image_is_an_error_and_not_cached(tmp_path: Path):
    backbone = load_backbone(TIMM, image_size=32)
    images = ImageList(np.array([0, 1, 1]), lambda i: None, "test")
    with pytest.raises(InputError) as err:
        features_for(backbone, images, cache_root=str(tmp_path), dataset="imagefolder:/x",
                     split="test", image_size=32, batch_size=2, device="cpu", amp_dtype=None,
                     num_workers=0)
    assert str(err.value) == ("imagefolder:/x: no image could be read in its test split "
                              "(3 files tried; none decodes as an image)")
    assert list(tmp_path.iterdir()) == []


def test_feature_cache_round_trip(tmp_path: Path):
    backbone = load_backbone(TIMM, image_size=32)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    images = ImageList(np.array([0, 1, 0, 1, 1]),
                       lambda i: None if i == 3 else decode(_png(colors[i])))
    kwargs = dict(cache_root=str(tmp_path), dataset="imagefolder:gs://b/x y", split="train",
                  image_size=32, batch_size=2, device="cpu", amp_dtype=None, num_workers=0)
    calls: list[int] = []
    hook = backbone.model.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    try:
        first = features_for(backbone, images, **kwargs)
        assert calls == [2, 1, 1]  # batches of 2 less the undecodable image
        second = features_for(backbone, images, **kwargs)
        assert calls == [2, 1, 1], "the second call ran the backbone instead of the cache"
    finally:
        hook.remove()
    assert first.x.shape == (4, 192) and first.x.dtype == np.float32
    assert first.y.tolist() == [0, 1, 0, 1] and first.corrupt == 1 and not first.cached
    assert second.cached and second.corrupt == 1 and isinstance(second, Features)
    assert np.array_equal(second.x, first.x) and np.array_equal(second.y, first.y)
    uri = cache_uri(str(tmp_path), backbone, "imagefolder:gs://b/x y", "train", 32)
    assert uri == str(tmp_path / backbone.key / "imagefolder_gs_b_x_y-32px" / "train.npz")
    assert Path(uri).is_file() and load_cached(str(tmp_path / "missing.npz")) is None
    other = cache_uri(str(tmp_path), backbone, "imagefolder:gs://b/x y", "train", 48)
    assert other != uri  # another input size is another cache entry


# ---------------------------------------------------------------------- splits and devices


def test_seeded_split_half_is_stratified_and_seeded():
    from stablerep.evaluation.datasets import seeded_split

    labels = np.repeat(np.arange(5), [10, 20, 7, 4, 9])
    train, test = seeded_split(labels, per_class=None, seed=0)
    assert sorted([*train, *test]) == list(range(len(labels)))
    assert np.all(np.abs(np.bincount(labels[train]) - np.bincount(labels) / 2) <= 1)
    again = seeded_split(labels, per_class=None, seed=0)
    assert np.array_equal(again[0], train)
    assert not np.array_equal(seeded_split(labels, per_class=None, seed=1)[0], train)


def test_seeded_split_per_class_keeps_some_to_test():
    from stablerep.evaluation.datasets import seeded_split

    labels = np.repeat(np.arange(3), [40, 31, 5])
    train, test = seeded_split(labels, per_class=30, seed=0)
    assert np.bincount(labels[train]).tolist() == [30, 30, 4]
    assert np.bincount(labels[test]).tolist() == [10, 1, 1]
    assert set(train).isdisjoint(test)


def test_every_classifier_runs_on_the_eval_device(monkeypatch):
    from stablerep.config import EvalConfig
    from stablerep.evaluation import classifiers, stage
    from stablerep.evaluation.features import Features

    seen = {}

    def spy(name, fn):
        def run(*args, **kwargs):
            seen[name] = kwargs["device"]
            return fn(*args, **{**kwargs, "device": "cpu"})
        monkeypatch.setattr(classifiers, name, run)

    for name in ("linear_probe", "few_shot", "knn_accuracy"):
        spy(name, getattr(classifiers, name))
    rng = np.random.default_rng(0)
    tr = Features(rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3, 0, False)
    te = Features(rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3, 0, False)
    cfg = EvalConfig(probe_num_c=3, few_shot_way=3, few_shot_shot=2, few_shot_query=3,
                     few_shot_episodes=4, knn_k=5)
    result = stage._classify(tr, te, cfg, "cuda:7")
    assert seen == {"linear_probe": "cuda:7", "few_shot": "cuda:7", "knn_accuracy": "cuda:7"}
    assert set(result) == {"linear_probe", "few_shot", "knn"}


# ------------------------------------------------------------------- data sets in the cache


def _cache(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "data.bin").write_bytes(b"x")
    return root


def test_check_available_names_every_missing_set_and_how_to_provide_it(tmp_path: Path):
    from stablerep.evaluation.datasets import check_available

    cache = _cache(tmp_path / "cache", ["CIFAR10"])
    (cache / "DTD").mkdir()  # an empty folder is not a data set
    specs = ["torchvision:CIFAR10", "torchvision:DTD", "torchvision:ImageNet",
             f"imagefolder:{tmp_path / 'nope'}", "sklearn:digits"]
    with pytest.raises(InputError) as err:
        check_available(specs, data_cache=str(cache))
    text = str(err.value)
    assert text.startswith(f"eval.datasets: torchvision:DTD, torchvision:ImageNet, "
                           f"imagefolder:{tmp_path / 'nope'} not found")
    assert str(cache) in text and "eval.data_cache" in text and "eval.download=true" in text
    assert "\n" not in text and "CIFAR10," not in text
    check_available(specs[:1] + specs[-1:], data_cache=str(cache))  # all there: no error


def test_check_available_with_download_still_needs_imagenet(tmp_path: Path):
    from stablerep.evaluation.datasets import check_available

    check_available(["torchvision:CIFAR100"], data_cache=str(tmp_path), download=True)
    with pytest.raises(InputError, match="torchvision:ImageNet not found"):
        check_available(["torchvision:ImageNet", "torchvision:CIFAR100"],
                        data_cache=str(tmp_path), download=True)


def test_check_available_default_cache_and_imagefolder(tmp_path: Path, monkeypatch):
    from stablerep.evaluation.datasets import check_available

    monkeypatch.setenv("STABLEREP_CACHE", str(tmp_path / "c"))
    _cache(tmp_path / "c" / "datasets", ["Food101"])
    root = _folder(tmp_path / "f", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    check_available(["torchvision:Food101", f"imagefolder:{root}"])
    with pytest.raises(InputError, match=str(tmp_path / "c" / "datasets")):
        check_available(["torchvision:Flowers102"])


@pytest.mark.parametrize("recipe", ["cc3m", "cc12m", "redcaps", "cc12m_plus", "laion10m",
                                    "cc12m_simclr", "cc12m_clip"])
def test_paper_recipes_probe_imagenet_and_the_fine_grained_sets(recipe):
    from stablerep.config import load_config
    from stablerep.evaluation.datasets import check_names

    datasets = load_config(recipe).eval.datasets
    check_names(datasets)
    assert datasets[0] == "torchvision:ImageNet" and len(datasets) == 11
    assert "sklearn:digits" not in datasets


def test_paper_recipe_without_its_data_fails_in_the_pipelines_validate(tmp_path, monkeypatch):
    from stablerep.kfp.params import PAPER_EVAL_SETS
    from stablerep.kfp.validation import check_run as validate

    monkeypatch.setenv("STABLEREP_CACHE", str(tmp_path))
    with pytest.raises(InputError) as err:
        validate({"recipe": "cc3m"}, local=False)
    assert "torchvision:ImageNet, torchvision:CIFAR10" in str(err.value)
    _cache(tmp_path / "datasets", list(PAPER_EVAL_SETS))
    cfg = validate({"recipe": "cc3m"}, local=False)
    assert cfg.eval.datasets == [f"torchvision:{n}" for n in PAPER_EVAL_SETS]


def test_torchvision_sun397_reader_on_a_tiny_copy(tmp_path: Path):
    """torchvision's SUN397 layout: the documented stratified half split, readable images."""
    from stablerep.evaluation.datasets import check_available

    data = tmp_path / "cache" / "SUN397" / "SUN397"  # <data_cache>/<Name>/, torchvision's root
    classes = {"/a/abbey": 4, "/b/beach": 6}
    data.mkdir(parents=True)
    (data / "ClassName.txt").write_text("".join(f"{c}\n" for c in classes))
    for c, (name, count) in enumerate(classes.items()):
        folder = data / name.strip("/")
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10, 10), (90 * c, 20 * i, 9)).save(folder / f"sun_{c}{i}.jpg")
    cache = str(tmp_path / "cache")
    check_available(["torchvision:SUN397"], data_cache=cache)
    ds = load_dataset("torchvision:SUN397", data_cache=cache, seed=0)
    assert ds.classes == ["abbey", "beach"]
    assert np.bincount(ds.train.labels).tolist() == [2, 3]
    assert np.bincount(ds.test.labels).tolist() == [2, 3]
    image, label = ds.test[0]
    assert image.mode == "RGB" and image.size == (10, 10) and label == ds.test.labels[0]
    again = load_dataset("torchvision:SUN397", data_cache=cache, seed=0)
    assert np.array_equal(again.train.labels, ds.train.labels)


def test_torchvision_caltech101_reader_on_a_tiny_copy(tmp_path: Path):
    """30 images per class to train, the rest to test; a failed read leaves no false copy."""
    from stablerep.evaluation.datasets import check_available

    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="torchvision:Caltech101: not found"):
        load_dataset("torchvision:Caltech101", data_cache=str(cache))
    with pytest.raises(InputError, match="torchvision:Caltech101 not found"):
        check_available(["torchvision:Caltech101"], data_cache=str(cache))  # folders, no file
    cats = cache / "Caltech101" / "caltech101" / "101_ObjectCategories"
    for name, count in (("BACKGROUND_Google", 2), ("accordion", 33), ("anchor", 3)):
        (cats / name).mkdir(parents=True)
        for i in range(1, count + 1):
            Image.new("RGB", (8, 8), (7 * i, 0, 0)).save(cats / name / f"image_{i:04d}.jpg")
    check_available(["torchvision:Caltech101"], data_cache=str(cache))
    ds = load_dataset("torchvision:Caltech101", data_cache=str(cache), seed=0)
    assert np.bincount(ds.train.labels).tolist() == [30, 2]
    assert np.bincount(ds.test.labels).tolist() == [3, 1]
    assert ds.train[0][0].size == (8, 8)
