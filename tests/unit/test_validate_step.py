"""The pipeline's first step checks everything the training launcher checks, before any stage.

World size against the recipe's batch (the launcher's own message), the rendered PyTorchJob /
TrainJob against the webhook rules, the image against the GPUs, Kubernetes names, and the
cluster recipe the job's other settings come from; each bad value is one line naming the
parameter, and the validate component ends with exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stablerep.errors import ConfigError
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE, QUEUE_LABEL, ClusterConfig, PodConfig
from stablerep.k8s.manifests import training_job
from stablerep.k8s.render import check_world_size
from stablerep.kfp import params as parameters
from stablerep.kfp import steps, validation

ROOT = Path(__file__).resolve().parents[2]
RECIPE_4X8 = str(ROOT / "configs" / "k8s" / "cc12m_4x8.yaml")


@pytest.fixture(autouse=True)
def _eval_sets(paper_eval_sets):
    """Every test here validates with the paper's evaluation sets in the cache (conftest)."""


def _refused(params: dict, root: Path) -> str:
    """validate's message for ``params`` (a cluster run), checking nothing was written."""
    with pytest.raises(ConfigError) as e:
        validation.check_run({"data_root": str(root / "run"), **params}, local=False)
    assert not (root / "run").exists()
    text = str(e.value)
    assert "\n" not in text
    return text


def test_world_size_refused_with_the_launchers_message(tmp_path):
    text = _refused({"nodes": 3, "gpus_per_node": 8}, tmp_path)
    cluster = ClusterConfig(nodes=3, recipe="cc12m", pod=PodConfig(gpus=8))
    with pytest.raises(ConfigError) as launcher:
        check_world_size(cluster)  # what launch() would say hours later
    assert text == f"parameters nodes, gpus_per_node: {launcher.value}"
    assert "3 x 8 = 24 processes" in text and "captions_per_batch 1376" in text


def test_world_size_counts_the_overrides(tmp_path):
    validation.check_run({"nodes": 3, "gpus_per_node": 8, "captions_per_batch": 1368}, local=False)
    text = _refused({"nodes": 2, "overrides": ["train.captions_per_batch=12"]}, tmp_path)
    assert "do not divide train.captions_per_batch 12" in text


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("recipe, message", [
    ("cluster:\n  pod:\n    cpu: lots\n",
     "cluster.pod.cpu: got 'lots', expected a Kubernetes quantity"),
    ("cluster:\n  pod:\n    shm_size: 1 Gi\n", "cluster.pod.shm_size: got '1 Gi'"),
    ("cluster:\n  name: Train_Job\n", "cluster.name: got 'Train_Job', expected a DNS-1035"),
    ("cluster:\n  backoff_limit: -1\n", "cluster.backoff_limit: got -1, expected >= 0"),
    ("cluster:\n  nodes: 2\n  elastic_min_nodes: 1\n  elastic_max_nodes: 2\n",
     "cluster.elastic_min_nodes/elastic_max_nodes: got 1/2, expected 1 <= min <= nodes (4)"),
    ("cluster:\n  podz: {}\n", "cluster.podz: unknown field"),
])
def test_bad_cluster_recipe_value_fails_in_validate(recipe, message, tmp_path):
    uri = _recipe(tmp_path, recipe)
    text = _refused({"cluster_recipe": uri}, tmp_path)
    assert text.startswith(f"parameter cluster_recipe ({uri}): {message}") or \
        text.startswith(f"parameter cluster_recipe: {uri}: {message}"), text


@pytest.mark.parametrize("content, message", [
    (None, "parameter cluster_recipe: cannot read"),
    ("- a\n- b\n", "expected a YAML mapping at the top level"),
    ("cluster: [1\n", "not valid YAML"),
])
def test_cluster_recipe_missing_or_not_a_mapping(content, message, tmp_path):
    uri = str(tmp_path / "nope.yaml") if content is None else _recipe(tmp_path, content)
    for backend in ("pytorchjob", "local"):  # read and checked even when training is local
        with pytest.raises(ConfigError) as e:
            validation.check_run({"cluster_recipe": uri, "train_backend": backend}, local=False)
        assert str(e.value).startswith("parameter cluster_recipe: ") and uri in str(e.value)
        assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("params, message", [
    ({"tolerations": [{"key": 1, "operator": "Exists"}]},
     "parameter tolerations[0].key: got 1, expected a string"),
    ({"tolerations": [{"key": "gpu", "operator": "In"}]},
     "parameter tolerations[0].operator: got 'In', expected Equal or Exists"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedul"}]},
     "parameter tolerations[0].effect: got 'NoSchedul'"),
    ({"tolerations": [{"operator": "Equal", "value": "x"}]},
     "parameter tolerations[0].key: missing; expected a taint key (only operator Exists"),
    ({"tolerations": [{"key": "g", "operator": "Exists", "tolerationSeconds": 60}]},
     "parameter tolerations[0].tolerationSeconds: set with effect ''; expected it only "
     "with effect NoExecute"),
    ({"service_account": "Train_SA"}, "parameter service_account: got 'Train_SA', expected a "
                                      "DNS-1123 subdomain"),
    ({"queue_name": "team a"}, "parameter queue_name: got 'team a', expected the name of a "
                                "Kueue LocalQueue (a DNS-1123 label"),
    ({"queue_name": "q" * 64}, "parameter queue_name: got 'qqqq"),  # a label value: <= 63
    ({"service_account": "a" + ".a" * 127}, "parameter service_account: got 'a.a."),  # 255
    ({"priority_class": "High"}, "parameter priority_class: got 'High', expected a DNS-1123"),
    ({"train_backend": "trainjob", "priority_class": "high"},
     "parameter priority_class: a TrainJob cannot set it"),
    ({"image": CPU_IMAGE}, f"parameter image: {CPU_IMAGE!r} is the CPU-only image but 8 GPU(s)"),
    ({"gpus_per_node": 0, "nodes": 1}, f"parameter image: {CUDA_IMAGE!r} is the CUDA image but "
                                       "gpus_per_node is 0"),
    ({"image": "my image"}, "parameter image: got 'my image', expected an image reference"),
])
def test_bad_job_parameter_named(params, message, tmp_path):
    assert _refused(params, tmp_path).startswith(message)


def test_good_job_parameters_pass():
    validation.check_run({"image": CPU_IMAGE, "gpus_per_node": 0, "nodes": 4}, local=False)
    validation.check_run({"queue_name": "q" * 63, "service_account": "a" + ".a" * 126,  # the longest
                  "priority_class": "high", "tolerations": [
                      {"key": "k", "operator": "Equal", "value": "v", "effect": "NoExecute",
                       "tolerationSeconds": 30}, {"operator": "Exists"}]}, local=False)


def test_parameters_win_over_the_cluster_recipe():
    values = parameters.check_params({"cluster_recipe": RECIPE_4X8, "nodes": 2, "gpus_per_node": 4,
                               "queue_name": "team-a", "service_account": "trainer"})
    cluster = validation.cluster_config(values)
    assert (cluster.nodes, cluster.pod.gpus) == (2, 4)  # parameters
    assert (cluster.pod.cpu, cluster.pod.memory, cluster.pod.shm_size) == ("88", "1000Gi",
                                                                           "256Gi")  # recipe
    assert cluster.name == "stablerep-cc12m-vitb16" and cluster.recipe == "cc12m"
    assert cluster.pod.service_account == "trainer" and cluster.queue_name == "team-a"
    job = training_job(cluster)
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    validation.check_job(cluster, RECIPE_4X8)


def test_empty_knobs_keep_the_cluster_recipes(tmp_path):
    uri = _recipe(tmp_path, "cluster:\n  queue_name: from-recipe\n  pod:\n"
                            "    service_account: recipe-sa\n    priority_class: low\n")
    cluster = validation.cluster_config(parameters.check_params({"cluster_recipe": uri}))
    assert (cluster.queue_name, cluster.pod.service_account, cluster.pod.priority_class) == (
        "from-recipe", "recipe-sa", "low")
    cluster = validation.cluster_config(parameters.check_params({"cluster_recipe": uri,
                                                   "priority_class": "high"}))
    assert cluster.pod.priority_class == "high"


def test_validate_step_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # as in a pipeline pod
    with pytest.raises(SystemExit) as e:
        steps.validate_step({"nodes": 3})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: parameters nodes, gpus_per_node: ")
    assert json.loads(steps.validate_step({}))["data_root"] == "gs://YOUR_BUCKET/stablerep/cc12m"


def test_run_local_refuses_a_missing_cluster_recipe_before_any_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run(
        [sys.executable, "-m", "stablerep.cli", "pipeline", "run-local", "--data-root",
         str(tmp_path / "run"), "--param", f"cluster_recipe={tmp_path / 'nope.yaml'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parameter cluster_recipe: "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no kfp root


@pytest.mark.parametrize("launch, message", [
    ({"queue_timeout_s": 0}, "launch.queue_timeout_s: got 0.0, expected a number of seconds > 0 "
                             "or None"),
    ({"schedule_timeout_s": float("nan")}, "launch.schedule_timeout_s: got nan, expected"),
    ({"watch_timeout_s": 2.5}, "launch.watch_timeout_s: got 2.5, expected an integer"),
    ({"deadline_s": 5}, "launch.deadline_s: unknown field"),
])
def test_bad_launch_section_of_the_cluster_recipe_fails_in_validate(launch, message, tmp_path):
    uri = tmp_path / "cluster.yaml"
    uri.write_text(yaml.safe_dump({"launch": launch}))
    with pytest.raises(ConfigError) as e:
        validation.check_run({"cluster_recipe": str(uri)}, local=False)
    assert str(e.value).startswith("parameter cluster_recipe: ") and message in str(e.value)
    assert "\n" not in str(e.value)
