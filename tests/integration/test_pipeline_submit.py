"""Submission over real HTTP: `kfp run create` and `stablerep pipeline submit` against a
recording loopback fake of the KFP v2beta1 API (tests/integration/_kfp_fake.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PACKAGE = ROOT / "pipelines" / "stablerep_pipeline.yaml"
KFP = Path(sys.executable).with_name("kfp")


def _load_fake():
    spec = importlib.util.spec_from_file_location("_kfp_fake", HERE / "_kfp_fake.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_kfp_fake"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kfp_fake = _load_fake()


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=os.environ.get("HOME", "/tmp"))
    env.pop("KUBECONFIG", None)
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=ROOT, check=False)


def _numbers_as_floats(x: Any) -> Any:
    """Protobuf JSON has one number type: compare 8192 and 8192.0 as equal."""
    if isinstance(x, dict):
        return {k: _numbers_as_floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_numbers_as_floats(v) for v in x]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return x


def _compiled() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(PACKAGE.read_text()) if d]
    return docs[0], docs[1]


def _assert_run_carries_the_package(body: dict) -> None:
    spec, platform = _compiled()
    sent = body["pipeline_spec"]
    assert _numbers_as_floats(sent["pipeline_spec"]) == _numbers_as_floats(spec)
    assert _numbers_as_floats(sent["platform_spec"]) == _numbers_as_floats(platform)


PARAMS = {"data_root": "gs://bucket/run1", "shards": 16, "workers": 8, "guidance_scale": 3.5,
          "eval_datasets": ["sklearn:digits", "torchvision:CIFAR10"],
          "node_selector": {"pool": "h100"}, "train_backend": "trainjob",
          "overrides": ["train.max_steps=100"]}


def test_kfp_cli_run_create_sends_spec_and_typed_parameters():
    assert KFP.exists(), f"the kfp CLI is expected beside {sys.executable}"
    args = ["data_root=gs://bucket/run1", "shards=16", "workers=8", "guidance_scale=3.5",
            'eval_datasets=["sklearn:digits", "torchvision:CIFAR10"]',
            'node_selector={"pool": "h100"}', "train_backend=trainjob",
            'overrides=["train.max_steps=100"]']
    with kfp_fake.kfp_server() as (url, state):
        out = _run([str(KFP), "--endpoint", url, "run", "create", "--experiment-name", "E",
                    "--package-file", str(PACKAGE), *args])
        assert out.returncode == 0, out.stdout + out.stderr
        assert [b["display_name"] for b in state.posted("/experiments")] == ["E"]
        (run,) = state.posted("/runs")
    _assert_run_carries_the_package(run)
    assert run["runtime_config"]["parameters"] == PARAMS
    assert isinstance(run["runtime_config"]["parameters"]["shards"], int)


def test_stablerep_submit_sends_spec_and_typed_parameters():
    with kfp_fake.kfp_server() as (url, state):
        out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host", url,
                    "--experiment", "E", "--set", "train.max_steps=100",
                    "--param", "data_root=gs://bucket/run1", "--param", "shards=16",
                    "--param", "workers=8", "--param", "guidance_scale=3.5",
                    "--param", 'eval_datasets=["sklearn:digits", "torchvision:CIFAR10"]',
                    "--param", 'node_selector={"pool": "h100"}',
                    "--param", "train_backend=trainjob"])
        assert out.returncode == 0, out.stdout + out.stderr
        (run,) = state.posted("/runs")
        run_id = next(iter(state.runs))
        assert [r.path for r in state.requests][0].endswith("/healthz")
        assert [b["display_name"] for b in state.posted("/experiments")] == ["E"]
    _assert_run_carries_the_package(run)
    assert run["runtime_config"]["parameters"] == PARAMS
    assert isinstance(run["runtime_config"]["parameters"]["guidance_scale"], float)
    assert f"run {run_id}" in out.stdout
    assert f"{url}/#/runs/details/{run_id}" in out.stdout


def test_second_submit_reuses_the_experiment():
    with kfp_fake.kfp_server() as (url, state):
        for _ in range(2):
            out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host",
                        url, "--experiment", "E"])
            assert out.returncode == 0, out.stdout + out.stderr
        assert len(state.posted("/experiments")) == 1
        assert len(state.posted("/runs")) == 2


def test_submit_uploads_the_package_once_and_runs_that_version():
    with kfp_fake.kfp_server() as (url, state):
        for _ in range(2):
            out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host",
                        url, "--experiment", "E", "--upload", "stablerep",
                        "--param", "shards=16", "--param", "workers=16"])
            assert out.returncode == 0, out.stdout + out.stderr
        uploads = [r for r in state.requests if r.path.startswith(f"{kfp_fake.API}/pipelines/")
                   and r.method == "POST"]
        assert [r.path.rsplit("/", 1)[1] for r in uploads] == ["upload", "upload_version"]
        assert "PIPELINE DEFINITION" in uploads[1].body  # the compiled file, multipart
        runs = state.posted("/runs")
        (pid,) = state.pipelines.values()
        version = next(v for n, v in state.versions[pid].items() if n != "stablerep")
    assert len(runs) == 2
    for run in runs:
        assert run["pipeline_version_reference"] == {"pipeline_id": pid,
                                                     "pipeline_version_id": version}
        assert "pipeline_spec" not in run
        assert run["runtime_config"]["parameters"] == {"shards": 16, "workers": 16}


@pytest.mark.parametrize("param, expected", [
    ("nosuch=1", "error: parameter 'nosuch': the pipeline has no such parameter; its "
                 "parameters: data_root, recipe, overrides,"),
    ("shards=0", "error: parameter shards: got 0, expected a value >= 1"),
    ("train_backend=slurm", "error: parameter train_backend: got 'slurm', expected one of "
                            "pytorchjob, trainjob, local"),
])
def test_bad_parameter_is_refused_before_any_request(param, expected):
    with kfp_fake.kfp_server() as (url, state):
        out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host", url,
                    "--experiment", "E", "--param", param])
        assert state.requests == []
    assert out.returncode == 2
    assert out.stderr.startswith(expected), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_service_account_is_the_runs():
    with kfp_fake.kfp_server() as (url, state):
        for extra in ([], ["--upload", "stablerep"]):
            out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host",
                        url, "--experiment", "E", "--service-account", "stablerep-runner",
                        *extra])
            assert out.returncode == 0, out.stdout + out.stderr
        runs = state.posted("/runs")
    assert [r["service_account"] for r in runs] == ["stablerep-runner"] * 2


def test_bad_service_account_is_refused_before_any_request():
    with kfp_fake.kfp_server() as (url, state):
        out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host", url,
                    "--experiment", "E", "--service-account", "Runner_SA"])
        assert state.requests == []
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --service-account: got 'Runner_SA', expected a DNS-1123 subdomain (lower-case "
        "letters, digits, '-' and '.', at most 253)"]


def test_more_workers_than_shards_is_refused_before_any_request():
    with kfp_fake.kfp_server() as (url, state):
        out = _run([sys.executable, "-m", "stablerep.cli", "pipeline", "submit", "--host", url,
                    "--experiment", "E", "--param", "shards=16"])  # workers stays 64
        assert state.requests == []
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: parameter workers: got 64, expected at most the 16 caption shards (parameter "
        "shards)"]
