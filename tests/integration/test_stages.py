"""The four stage entry functions of stablerep.stages, called directly on tiny data.

The data goes through all four, in this process, from the built-in ``procedural`` recipe
(loaded by name): 16 captions in 2 shards -> procedural images at 32 px, 3 per caption (one
shard through ``shard=``, then the rest) -> 3 steps of a tiny ViT -> an evaluation on
sklearn digits. Each step's state is a module fixture that builds what it needs, so any test
runs alone (``-k train`` included); the one-shard state keeps a folder of its own. Each result's fields are checked against what is on disk; a missing section
is a ConfigError naming it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stablerep import stages
from stablerep.config import load_config
from stablerep.errors import ConfigError, InputError

pytestmark = pytest.mark.integration

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")
TINY = ["captions.num_captions=16", "captions.num_shards=2", "generate.images_per_caption=3",
        "train.model=vit_tiny", "train.image_size=32", "train.head_hidden_dim=64",
        "train.head_out_dim=32", "train.captions_per_batch=8", "train.images_per_caption=2",
        "train.max_steps=3", "train.num_workers=0", "train.log_every=1", "train.device=cpu",
        "eval.probe_num_c=5", "eval.num_workers=0", "eval.few_shot_episodes=20",
        "eval.baseline=none", "eval.device=cpu"]


@pytest.fixture(scope="module", autouse=True)
def single_process() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for var in DIST_VARS:  # run_training must set up a plain single process
            mp.delenv(var, raising=False)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """(root, captions result, one-shard result): captions and only shard 1 of 2 drawn."""
    root = tmp_path_factory.mktemp("partial")
    captions = stages.run_captions(_cfg(root))
    return root, captions, stages.run_generate(_cfg(root), shard=1)


@pytest.fixture(scope="module")
def full(partial, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """(root, result of drawing the rest): a copy of ``partial`` with shard 0 drawn too."""
    root = tmp_path_factory.mktemp("full")
    shutil.copytree(partial[0], root, dirs_exist_ok=True)
    return root, stages.run_generate(_cfg(root, "generate.all_shards=true"))


@pytest.fixture(scope="module")
def trained(full) -> tuple[Path, object]:
    """(root, training result): 3 steps on every shard of ``full``."""
    root = full[0]
    return root, stages.run_training(_cfg(root))


def _cfg(root: Path, *extra: str):
    return load_config("procedural", [*TINY, *extra],
                       require=("captions", "generate", "train", "eval"), data_root=str(root))


def test_run_captions(partial) -> None:
    root, result, _ = partial
    manifest = json.loads((root / "captions" / "manifest.json").read_text())
    assert result.uri == str(root / "captions")
    assert result.manifest == str(root / "captions" / "manifest.json")
    assert (result.count, result.num_shards) == (manifest["count"], manifest["num_shards"])
    assert (result.count, result.num_shards) == (16, 2)
    assert sorted(p.name for p in (root / "captions").glob("part-*.parquet")) == [
        "part-000000.parquet", "part-000001.parquet"]


def test_run_generate_one_shard(partial) -> None:
    root, _, one = partial
    images = root / "images"
    assert one.uri == str(images)
    assert sorted(p.name for p in images.glob("shard-*.json")) == ["shard-000001.json"]
    doc = json.loads((images / "shard-000001.json").read_text())
    assert (one.shards_written, one.shards_skipped, one.failed_captions) == (1, 0, 0)
    assert one.images == doc["num_samples"] == 3 * doc["num_captions"]
    assert one.images_per_s > 0


def test_run_training_refuses_a_missing_shard(partial) -> None:
    root = partial[0]
    with pytest.raises(InputError) as e:
        stages.run_training(_cfg(root))
    assert str(e.value).startswith(f"{root / 'images' / 'shard-000000.json'}: missing; 1 of 2 "
                                   "shards are committed")
    assert not (root / "train").exists()


def test_run_generate_the_rest(full) -> None:
    root, rest = full
    images = root / "images"
    assert (rest.shards_written, rest.shards_skipped) == (1, 1)
    docs = [json.loads(p.read_text()) for p in sorted(images.glob("shard-*.json"))]
    assert [d["shard"] for d in docs] == [0, 1]
    assert rest.images == docs[0]["num_samples"] and sum(d["num_samples"] for d in docs) == 48


def test_run_training(trained) -> None:
    root, result = trained
    train = root / "train"
    lines = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    latest = json.loads((train / "latest.json").read_text())
    assert result.out == str(train) and result.steps == 3 == latest["step"]
    assert result.checkpoint == str(train / "ckpt-00000003.pt")
    assert Path(result.checkpoint).is_file()
    assert result.backbone == str(train / "backbone.pt") and Path(result.backbone).is_file()
    assert result.metrics == str(train / "metrics.jsonl")
    assert result.final_loss == pytest.approx(lines[-1]["loss"])
    assert result.images_per_s == lines[-1]["images_per_s"] > 0
    assert "model: vit_tiny" in (train / "config.yaml").read_text()
    from stablerep.contracts import read_train_result

    assert read_train_result(str(train)) == result  # rank 0 published it


def test_run_eval(trained) -> None:
    root = trained[0]
    result = stages.run_eval(_cfg(root))
    out = root / "eval"
    assert result.out == str(out)
    assert result.metrics_uri == str(out / "metrics.json")
    assert result.metrics == json.loads((out / "metrics.json").read_text())
    assert result.metrics["checkpoint"] == str(root / "train")
    assert 0 <= result.metrics["datasets"]["sklearn:digits"]["linear_probe"]["top1"] <= 1
    assert Path(result.report_html).is_file() and Path(result.report_md).is_file()
    assert (out / "config.yaml").is_file()


@pytest.mark.parametrize("fn", [stages.run_captions, stages.run_generate, stages.run_training,
                                stages.run_eval])
def test_missing_section_is_a_config_error(fn, tmp_path: Path) -> None:
    cfg = load_config(None, data_root=str(tmp_path))
    section = {"run_captions": "captions", "run_generate": "generate",
               "run_training": "train", "run_eval": "eval"}[fn.__name__]
    with pytest.raises(ConfigError, match=f"^{section}: the config has no {section} section"):
        fn(cfg)
    assert list(tmp_path.iterdir()) == []
