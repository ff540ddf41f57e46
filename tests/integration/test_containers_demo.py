"""`make demo`'s pipeline with every step in the project's image:
`stablerep pipeline run-local --recipe demo --runner docker --image $STABLEREP_TEST_IMAGE`.

Runs when STABLEREP_TEST_IMAGE names an image (e.g. the CPU image `make images` builds) and
a container engine answers at DOCKER_HOST (or the default socket); otherwise it is skipped,
saying which is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _engine_problem() -> str:
    """'' when a container engine answers, else why not."""
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        import docker

        client = docker.from_env(timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - any failure means: no engine to test with
        return f"no container engine answers at {where} ({type(e).__name__})"
    return ""


def test_demo_runs_in_containers(tmp_path: Path) -> None:
    image = os.environ.get("STABLEREP_TEST_IMAGE", "")
    if not image:
        pytest.skip("STABLEREP_TEST_IMAGE is not set (the image to run the steps in)")
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path / "demo"  # made by the run and handed to UID 1000 (as root), or UID 1000's
    env = dict(os.environ, PYTHONPATH=str(ROOT), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    out = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "run-local",
                          "--recipe", "demo", "--runner", "docker", "--image", image,
                          "--data-root", str(root)],
                         capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT,
                         check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert json.loads((root / "images" / "manifest.json").read_text())["num_shards"] > 0
    assert (root / "train" / "backbone.pt").is_file()
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert "sklearn:digits" in metrics["datasets"]
    assert "sklearn:digits:  probe_top1" in out.stdout
    print(out.stdout[-1000:])
