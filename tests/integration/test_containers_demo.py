"""`make demo`'s pipeline with every step in the project's image (`stablerep pipeline run-local
--runner docker`), against the same pipeline run as processes here: same parameters, same
seed, the same metrics to the last digit, and the same lineage. Each container runs as UID
1000 with a read-only root, a /tmp tmpfs and no network, the data root mounted.

A reduced budget (64 captions, 2 shards, 12 steps) keeps it near a minute; the full demo in
containers is `make demo RUNNER=containers` (README, "Locally"). Needs a Docker API: the one
at DOCKER_HOST, else a podman service this test starts on a private socket; and the image
(STABLEREP_TEST_IMAGE, default the CPU image `make images IMAGES=cpu` builds). Skips saying
which is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stablerep.k8s.config import CPU_IMAGE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("STABLEREP_TEST_IMAGE") or CPU_IMAGE
REDUCED = ["--recipe", "demo", "--param", "num_captions=64", "--param", "shards=2",
           "--param", "workers=2", "--set", "train.max_steps=12",
           "--set", "train.checkpoint_every=6", "--set", "train.log_every=6",
           "--set", "eval.few_shot_episodes=20", "--set", "eval.probe_num_c=3"]


def _ping(host: str) -> str:
    """'' when a Docker API answers at ``host`` and holds IMAGE, else why not."""
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=30)
    except Exception as e:  # noqa: BLE001 - any failure: no engine to test with
        return f"no container engine answers at {host} ({type(e).__name__}: {e})"
    try:
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return f"no image {IMAGE} at {host}: build it with `make images IMAGES=cpu`"
    except Exception as e:  # noqa: BLE001
        return f"no container engine answers at {host} ({type(e).__name__}: {e})"
    finally:
        client.close()
    return ""


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DOCKER_HOST's API, or a podman service on a private socket for this module."""
    if os.environ.get("DOCKER_HOST"):
        problem = _ping(os.environ["DOCKER_HOST"])
        if problem:
            pytest.skip(problem)
        yield os.environ["DOCKER_HOST"]
        return
    podman = shutil.which("podman")
    if not podman:
        pytest.skip("no container engine: DOCKER_HOST is unset and podman is not installed "
                    "(.ci/run installs it)")
    host = f"unix://{tmp_path_factory.mktemp('podman')}/podman.sock"
    service = subprocess.Popen([podman, "system", "service", "--time=0", host],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while (problem := _ping(host)) and "no image" not in problem:
            assert service.poll() is None, "podman system service exited"
            assert time.monotonic() < deadline, problem
            time.sleep(0.5)
        if problem:
            pytest.skip(problem)
        yield host
    finally:
        service.terminate()
        service.wait(timeout=60)


def _run_local(root: Path, *extra: str, host: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    if host:
        env["DOCKER_HOST"] = host
    return subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "run-local",
                           *REDUCED, "--data-root", str(root), *extra],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
                          check=False)


def _headline(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("sklearn:digits:")]


def _without_timings(value):
    """The metrics without their wall-clock ``seconds`` (the only fields a runner may change)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    return value


def _owners(root: Path) -> set[int]:
    return {p.stat().st_uid for p in (root / "train").iterdir()}


def test_the_demo_in_containers_gives_the_demo_s_numbers(docker_host: str,
                                                         tmp_path: Path) -> None:
    here = _run_local(tmp_path / "processes")
    assert here.returncode == 0, (here.stdout + here.stderr)[-4000:]
    boxed = _run_local(tmp_path / "containers", "--runner", "docker", "--image", IMAGE,
                       host=docker_host)
    assert boxed.returncode == 0, (boxed.stdout + boxed.stderr)[-4000:]
    assert _headline(boxed.stdout) and _headline(boxed.stdout) == _headline(here.stdout)
    metrics = [_without_timings(json.loads((tmp_path / run / "eval" / "metrics.json")
                                           .read_text())["datasets"])
               for run in ("processes", "containers")]
    assert metrics[0] == metrics[1]
    steps = json.loads((tmp_path / "containers" / "train" / "result.json").read_text())["steps"]
    assert steps == 12
    assert _owners(tmp_path / "containers") == {1000}  # written by the image's user
    # the lineage the run records: captions -> images -> checkpoint -> report
    executions = sorted(p.parent.name for p in
                        (tmp_path / "containers" / "kfp").glob("*/*/executor_output.json"))
    assert {"captions", "images-manifest", "evaluate"} <= set(executions), executions
