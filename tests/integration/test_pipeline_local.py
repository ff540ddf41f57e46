"""The pipeline function run through kfp.local (subprocess runner) on CPU: a tiny variant of
the demo, end to end through `stablerep pipeline run-local`, and the first step failing on a
bad parameter value."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--param", "num_captions=8", "--param", "shards=2", "--param", "workers=2",
        "--param", "images_per_caption=2",
        "--param", "inference_steps=2", "--set", "train.max_steps=2",
        "--set", "train.captions_per_batch=4", "--set", "train.checkpoint_every=2",
        "--set", "eval.few_shot_episodes=5", "--set", "eval.probe_num_c=3"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")


def _artifact(root: Path, task: str, name: str) -> dict:
    (out,) = root.glob(f"kfp/*/{task}/executor_output.json")
    (art,) = json.loads(out.read_text())["artifacts"][name]["artifacts"]
    return art


def test_run_local_tiny_pipeline(tmp_path):
    root = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "run-local",
                          "--recipe", "demo_sd", "--data-root", str(root), *TINY],
                         capture_output=True, text=True, timeout=540, env=_env(), cwd=ROOT,
                         check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for i in range(2):  # committed shards: tar and json
        assert (root / "images" / f"shard-{i:06d}.tar").is_file()
        assert json.loads((root / "images" / f"shard-{i:06d}.json").read_text())
    manifest = json.loads((root / "images" / "manifest.json").read_text())  # the fan-in step
    assert [s["tar"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    (model,) = (root / "models").iterdir()  # the run's copy of the model, loaded by each task
    assert (model / "model_index.json").is_file() and (model / "stablerep-model.json").is_file()
    workers = [_artifact(root, f"for-loop-1-iteration-{i}/generate-shards", "shards")[
        "metadata"] for i in range(2)]  # one task per worker, each drawing its own shard
    assert [(w["worker"], w["workers"], w["shards_written"]) for w in workers] == [
        (0, 2, 1), (1, 2, 1)]
    images = _artifact(root, "images-manifest", "images")["metadata"]
    assert images["num_shards"] == 2
    assert images["captions"] == str(root / "captions" / "manifest.json")  # the lineage
    assert (root / "train" / "latest.json").is_file()
    assert (root / "train" / "backbone.pt").is_file()
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    logged = _artifact(root, "evaluate", "metrics")["metadata"]
    ds = metrics["datasets"]["sklearn:digits"]
    base = metrics["baseline"]["datasets"]["sklearn:digits"]
    expected = {"sklearn:digits/probe_top1": ds["linear_probe"]["top1"],
                "sklearn:digits/few_shot_mean": ds["few_shot"]["mean"],
                "sklearn:digits/few_shot_ci95": ds["few_shot"]["ci95"],
                "sklearn:digits/knn_top1": ds["knn"]["top1"],
                "baseline/sklearn:digits/probe_top1": base["linear_probe"]["top1"],
                "baseline/sklearn:digits/few_shot_mean": base["few_shot"]["mean"],
                "baseline/sklearn:digits/few_shot_ci95": base["few_shot"]["ci95"],
                "baseline/sklearn:digits/knn_top1": base["knn"]["top1"]}
    assert logged == pytest.approx(expected)
    html = Path(_artifact(root, "evaluate", "report_html")["uri"])
    assert html.read_text() == (root / "eval" / "report.html").read_text()
    assert html.read_text().lstrip().lower().startswith("<!doctype html")
    assert Path(_artifact(root, "evaluate", "report_md")["uri"]).read_text()
    train = _artifact(root, "train", "metrics")["metadata"]
    assert train["steps"] == 2 and math.isfinite(train["final_loss"])
    result = json.loads((root / "train" / "result.json").read_text())  # what the step logged
    assert (train["final_loss"], train["images_per_s"]) == (result["final_loss"],
                                                            result["images_per_s"])
    model = _artifact(root, "train", "checkpoint")["metadata"]
    assert model["images"] == images["manifest"] and Path(model["backbone"]).is_file()
    results = _artifact(root, "evaluate", "results")["metadata"]
    assert results["backbone"] == model["backbone"]
    caps = _artifact(root, "captions", "captions")["metadata"]
    assert caps["count"] == 8 and caps["num_shards"] == 2
    assert caps["uri"] == str(root / "captions")
    assert f"report: {root / 'eval' / 'report.html'}" in out.stdout
    assert "sklearn:digits:  probe_top1" in out.stdout and "(baseline " in out.stdout


def test_first_step_fails_naming_the_parameter(tmp_path, capfd):
    """The validate component itself (as a pod would run it), given a bad value."""
    import kfp.local

    from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
    from stablerep.kfp import params as parameters
    from stablerep.kfp.components import make_components

    validate = make_components(CPU_IMAGE, CUDA_IMAGE).validate

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(tmp_path / "kfp"))
    params = {**parameters.defaults(), **parameters.recipe_params("demo_sd"),
              "data_root": str(tmp_path / "r"),
              "train_backend": "local", "inference_steps": 0}
    with pytest.raises(RuntimeError, match="validate"):
        validate(**params)
    text = capfd.readouterr()
    assert "parameter inference_steps: got 0, expected a value >= 1" in text.out + text.err
    # the step's own output: one error line and exit status 2, no traceback
    assert "error: parameter inference_steps: got 0" in text.out + text.err
    assert "Traceback" not in text.out + text.err
    assert not (tmp_path / "r").exists()


def test_make_demo_pipeline_draws_procedurally_without_a_model(tmp_path):
    """`make demo`'s recipe (the procedural backend) runs through every step at a reduced
    budget: nothing is staged for a backend without a model, and training and evaluation end."""
    root = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "run-local",
                          "--recipe", "demo", "--data-root", str(root),
                          "--param", "num_captions=64", "--param", "shards=2",
                          "--param", "workers=2", "--set", "train.max_steps=2",
                          "--set", "train.checkpoint_every=2", "--set",
                          "eval.few_shot_episodes=5", "--set", "eval.probe_num_c=3"],
                         capture_output=True, text=True, timeout=540, env=_env(), cwd=ROOT,
                         check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert not (root / "models").exists()  # the procedural backend draws without a model
    assert json.loads((root / "images" / "manifest.json").read_text())["num_shards"] == 2
    assert json.loads((root / "train" / "result.json").read_text())["steps"] == 2
    assert "sklearn:digits:  probe_top1" in out.stdout
