"""Captions -> generate with the procedural backend through the CLI, in subprocesses, with the
recipe configs/procedural.yaml into a temporary data_root: the shards hold every image of
every caption, losslessly equal to a direct render of its caption with its per-image seed; a
rerun does nothing; bad input (a caption outside the grammar, a bad config value) fails with
one ``error:`` line, exit status 2, and nothing under the output.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablerep.captions.procedural import CLASS_NAMES, procedural_label
from stablerep.contracts import KEY_PATTERN, load_captions_manifest
from stablerep.generation.procedural import MODEL_ID, render
from stablerep.generation.shards import image_seed


def _parse_key(key: str) -> tuple[int, int]:
    """(caption_id, j) of a sample key, as the data loader and the report read it."""
    m = KEY_PATTERN.fullmatch(key)
    assert m is not None, key
    return int(m["caption_id"]), int(m["j"])

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "procedural.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stablerep.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of one WebDataset tar."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member)
            assert data is not None
            out.setdefault(key, {})[ext] = data.read()
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("procedural")
    made = _cli("captions", "--config", RECIPE, "--data-root", str(root),
                "--num-captions", "30", "--num-shards", "2")
    assert made.returncode == 0, made.stderr
    drawn = _cli("generate", "--config", RECIPE, "--data-root", str(root), "-m", "3")
    assert drawn.returncode == 0, drawn.stderr
    assert "generate: 2 shard(s) written, 0 already done; 90 images" in drawn.stdout
    return root


def test_shards_hold_every_image_rendered_from_its_caption(data_root: Path) -> None:
    captions = load_captions_manifest(str(data_root / "captions"))
    table = {r["caption_id"]: r for i in range(captions.num_shards)
             for r in captions.read_shard(i).to_pylist()}
    manifest = json.loads((data_root / "images" / "manifest.json").read_text())
    assert (manifest["num_shards"], manifest["num_samples"], manifest["num_captions"]) == (
        2, 90, 30)
    seen = set()
    for index in range(2):
        doc = json.loads((data_root / "images" / f"shard-{index:06d}.json").read_text())
        assert doc["model"] == MODEL_ID and doc["failed"] == []
        for key, sample in _samples(data_root / "images" / f"shard-{index:06d}.tar").items():
            assert sorted(sample) == ["json", "png", "txt"]
            cid, j = _parse_key(key)
            caption = sample["txt"].decode()
            meta = json.loads(sample["json"])
            assert caption == table[cid]["caption"]
            assert table[cid]["source"] == f"procedural:{CLASS_NAMES[procedural_label(caption)]}"
            assert meta["seed"] == image_seed(0, cid, j) and meta["model"] == MODEL_ID
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
            assert pixels.shape == (32, 32, 3)
            assert np.array_equal(pixels, render(caption, meta["seed"], 32, 32))
            seen.add((cid, j))
    assert seen == {(cid, j) for cid in table for j in range(3)}


def test_rerun_does_nothing(data_root: Path) -> None:
    tars = {p.name: p.stat().st_mtime_ns for p in (data_root / "images").glob("*.tar")}
    again = _cli("generate", "--config", RECIPE, "--data-root", str(data_root), "-m", "3")
    assert again.returncode == 0, again.stderr
    assert "generate: 0 shard(s) written, 2 already done" in again.stdout
    assert tars == {p.name: p.stat().st_mtime_ns for p in (data_root / "images").glob("*.tar")}


def test_a_caption_outside_the_grammar_fails_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "captions.txt"
    src.write_text("a handwritten digit 7, bold red ink on a noisy light background, small\n"
                   "a photo of a dog\n")
    made = _cli("captions", "--input", str(src), "--data-root", str(tmp_path))
    assert made.returncode == 0, made.stderr
    out = tmp_path / "images"
    failed = _cli("generate", "--data-root", str(tmp_path), "--backend", "procedural",
                  "--size", "32", "-m", "2", "--out", str(out))
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("error: shard 0: 1 captions failed, more than "
                                "generate.max_failures=0; first error: InputError: caption "
                                "'a photo of a dog': the figure must be ")
    assert "expected the procedural grammar" in lines[-1]
    assert "Traceback" not in failed.stderr
    assert not out.exists() or not any(out.iterdir())
    # With failures allowed the good caption is written and the bad one recorded.
    allowed = _cli("generate", "--data-root", str(tmp_path), "--backend", "procedural",
                   "--size", "32", "-m", "2", "--out", str(out), "--set",
                   "generate.max_failures=-1")
    assert allowed.returncode == 0, allowed.stderr
    doc = json.loads((out / "shard-000000.json").read_text())
    assert doc["num_samples"] == 2 and [f["caption"] for f in doc["failed"]] == [
        "a photo of a dog"]


def test_a_bad_procedural_config_value_fails_cleanly(tmp_path: Path) -> None:
    failed = _cli("captions", "--config", RECIPE, "--data-root", str(tmp_path),
                  "--set", "captions.procedural.typefaces=[comic]")
    assert failed.returncode == 2
    assert failed.stderr.strip() == (
        "error: captions.procedural.typefaces[0]: got 'comic', expected one of handwritten, "
        "sans-serif, serif, monospace")
    assert not (tmp_path / "captions").exists()
