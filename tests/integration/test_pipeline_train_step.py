"""The training result: rank 0 publishes ``result.json`` and every consumer reads it.

A real tiny run (the procedural recipe: 16 captions, 3 images each at 32 px, 3 steps of a tiny
ViT with a kNN check at the last step, so ``metrics.jsonl`` ends with a kNN line) writes
``<train.out>/result.json``; the pipeline's train step logs its numbers as KFP metrics (also
when the step is retried after the run finished), and the launcher path reads it from the
training folder once the cluster job succeeded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stablerep import contracts, stages
from stablerep.config import load_config
from stablerep.errors import InputError
from stablerep.kfp import params as parameters
from stablerep.kfp import steps, validation

pytestmark = pytest.mark.integration

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID")
TINY = ["captions.num_captions=16", "captions.num_shards=2", "generate.images_per_caption=3",
        "train.model=vit_tiny", "train.image_size=32", "train.head_hidden_dim=64",
        "train.head_out_dim=32", "train.captions_per_batch=8", "train.images_per_caption=2",
        "train.max_steps=3", "train.num_workers=0", "train.log_every=1", "train.device=cpu",
        "train.knn_every=3"]


class FakeArtifact:
    """What a KFP Output[Metrics] / Output[Dataset] offers a component body."""

    def __init__(self, path: Path):
        self.path, self.metadata, self.metrics = str(path), {}, {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value


@pytest.fixture(scope="module", autouse=True)
def single_process() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for var in DIST_VARS:  # one plain process
            mp.delenv(var, raising=False)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_root with the tiny captions and images (no training yet)."""
    root = tmp_path_factory.mktemp("train-result")
    cfg = load_config("procedural", TINY, require=("captions", "generate"), data_root=str(root))
    stages.run_captions(cfg)
    stages.run_generate(cfg)
    return root


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_real_run_publishes_result_json(root: Path) -> None:
    out = root / "direct"
    cfg = load_config("procedural", [*TINY, f"train.out={out}"], require=("train",),
                      data_root=str(root))
    result = stages.run_training(cfg)
    lines = _lines(out)
    assert "knn_top1" in lines[-1] and "loss" not in lines[-1]  # the case that went wrong
    last = [r for r in lines if "loss" in r][-1]
    back = contracts.read_train_result(str(out))
    assert back == result
    assert (back.steps, back.world_size, back.model) == (3, 1, "vit_tiny")
    assert back.final_loss == pytest.approx(last["loss"]) and back.images_per_s == \
        last["images_per_s"] > 0
    assert back.checkpoint == str(out / "ckpt-00000003.pt") and Path(back.checkpoint).is_file()
    assert back.backbone == str(out / "backbone.pt") and Path(back.backbone).is_file()
    assert back.latest == str(out / "latest.json") and back.metrics == str(out / "metrics.jsonl")
    assert back.seconds > 0


def _values(root: Path, out: Path) -> dict[str, Any]:
    params = parameters.check_params({"data_root": str(root), "recipe": "procedural",
                                      "train_backend": "local", "gpus_per_node": 0})
    cfg = validation.build_config("procedural", [*TINY, f"train.out={out}"], params)
    return {**{k: params[k] for k in ("recipe", *parameters.JOB_PARAMS)},
            "config": validation.resolved(cfg)}


def _images(tmp_path: Path) -> FakeArtifact:
    """The images manifest step's Dataset artifact, as the train step receives it."""
    images = FakeArtifact(tmp_path / "images.json")
    images.metadata["manifest"] = "gs://b/run/images/manifest.json"
    return images


def test_train_step_metrics_come_from_the_result(root: Path, tmp_path: Path) -> None:
    out = root / "step"
    metrics, model = FakeArtifact(tmp_path / "m"), FakeArtifact(tmp_path / "d" / "x.json")
    steps.train_step(_values(root, out), run_id="", task="train", images=_images(tmp_path),
                     checkpoint=model, metrics=metrics)
    last = [r for r in _lines(out) if "loss" in r][-1]
    assert "knn_top1" in _lines(out)[-1]
    assert metrics.metrics["final_loss"] == pytest.approx(last["loss"])
    assert metrics.metrics["images_per_s"] == last["images_per_s"] > 0
    assert metrics.metrics["steps"] == 3.0
    assert model.metadata["result"] == str(out / "result.json")
    assert model.metadata["backbone"] == str(out / "backbone.pt")
    assert model.metadata["images"] == "gs://b/run/images/manifest.json"  # the lineage
    assert json.loads(Path(model.path).read_text())["steps"] == 3
    # a retried step resumes a finished run: nothing is logged, the published result stands
    again = FakeArtifact(tmp_path / "m2")
    steps.train_step(_values(root, out), run_id="", task="train", images=_images(tmp_path),
                     checkpoint=model, metrics=again)
    assert again.metrics == metrics.metrics


def test_launcher_path_reads_result_json(monkeypatch, tmp_path: Path) -> None:
    from stablerep.k8s import launcher

    out = tmp_path / "train"
    published = contracts.TrainResult(
        out=str(out), steps=7, final_loss=1.25, images_per_s=2048.0, world_size=32,
        seconds=3600.0, method="stablerep", model="vit_base_patch16_224",
        checkpoint=str(out / "ckpt-00000007.pt"), latest=str(out / "latest.json"),
        backbone=str(out / "backbone.pt"), metrics=str(out / "metrics.jsonl"))
    seen = []

    def fake_launch(cfg: Any) -> Any:
        seen.append(cfg.cluster)
        return launcher.LaunchResult("job", "ns", "PyTorchJob", False, str(out), "", "", 1.0)

    monkeypatch.setattr(launcher, "launch", fake_launch)
    values = parameters.check_params({"data_root": str(tmp_path), "queue_name": "team-a"})
    values["config"] = validation.resolved(validation.build_config(values["recipe"], [], values))
    with pytest.raises(InputError, match=r"result\.json: no training result"):
        steps.train_model(values, run_id="run-1")  # the job "succeeded" but published nothing
    contracts.write_train_result(published)
    metrics, model = FakeArtifact(tmp_path / "m"), FakeArtifact(tmp_path / "d.json")
    steps.train_step(values, run_id="run-1", task="train", images=_images(tmp_path),
                     checkpoint=model, metrics=metrics)
    assert metrics.metrics == {"final_loss": 1.25, "images_per_s": 2048.0, "steps": 7.0}
    assert model.metadata["world_size"] == 32
    assert seen[-1].queue_name == "team-a" and seen[-1].nodes == 4


def test_torchrun_path_reads_rank_0s_result(root: Path, monkeypatch) -> None:
    out = root / "torchrun"
    overrides = [*TINY, f"train.out={out}"]
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = validation.build_config("procedural", overrides, {"data_root": str(root)})
    result = steps._torchrun(cfg, "procedural", 2)
    lines = _lines(out)
    last = [r for r in lines if "loss" in r][-1]
    assert "knn_top1" in lines[-1]
    assert result == contracts.read_train_result(str(out))
    assert (result.world_size, result.steps) == (2, 3)
    assert result.final_loss == pytest.approx(last["loss"])
    assert result.images_per_s == last["images_per_s"] > 0


def test_cluster_recipes_launch_section_reaches_the_launcher(monkeypatch, tmp_path: Path) -> None:
    import yaml

    from stablerep.k8s import launcher

    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"pod": {"cpu": "4"}},
                                      "launch": {"queue_timeout_s": 7200,
                                                 "schedule_timeout_s": 1800,
                                                 "api_unreachable_s": 900}}))
    seen = []

    def fake_launch(cfg: Any) -> Any:
        seen.append(cfg)
        raise launcher.LaunchError("stop here")

    monkeypatch.setattr(launcher, "launch", fake_launch)
    values = parameters.check_params({"data_root": str(tmp_path), "cluster_recipe": str(recipe)})
    values["config"] = validation.resolved(validation.build_config(values["recipe"], [], values))
    with pytest.raises(launcher.LaunchError, match="stop here"):
        steps.train_model(values, run_id="run-1")
    cfg = seen[-1]
    assert (cfg.queue_timeout_s, cfg.schedule_timeout_s, cfg.api_unreachable_s) == (
        7200, 1800, 900)
    assert cfg.timeout_s is None and cfg.backoff_max_s == 30.0  # the rest: defaults
    assert cfg.cluster.pod.cpu == "4" and cfg.run_id == "run-1"
