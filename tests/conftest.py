"""Shared fixtures: real storage servers on loopback (a GCS-API emulator and an S3-API server).

The tier of a test is its folder: everything under ``tests/integration`` carries the
``integration`` marker and everything under ``tests/gpu`` the ``gpu`` marker, whether or not
the file says so, so ``-m "not integration"`` selects exactly the unit tier.

Both servers are started once per test session on free 127.0.0.1 ports. The environment is
pointed at them the way a user's would be (STORAGE_EMULATOR_HOST for gcsfs, AWS_ENDPOINT_URL
for s3fs/botocore), so the code under test takes its ordinary path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

TIERS = {"integration": pytest.mark.integration, "gpu": pytest.mark.gpu}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier (see the module docstring)."""
    tests = Path(__file__).resolve().parent
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(tests).parts
        mark = TIERS.get(parts[0]) if len(parts) > 1 else None
        if mark is not None and mark.name not in {m.name for m in item.iter_markers()}:
            item.add_marker(mark)


@pytest.fixture
def paper_eval_sets(tmp_path_factory, monkeypatch) -> Path:
    """The paper recipes' evaluation data sets present (one file each) in the data cache the
    pipeline's validate step checks (``$STABLEREP_CACHE/datasets``); returns the cache."""
    from stablerep.kfp.params import PAPER_EVAL_SETS

    cache = tmp_path_factory.mktemp("cache")
    for name in PAPER_EVAL_SETS:
        (cache / "datasets" / name).mkdir(parents=True)
        (cache / "datasets" / name / "data.bin").write_bytes(b"x")
    monkeypatch.setenv("STABLEREP_CACHE", str(cache))
    return cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on 127.0.0.1:{port} did not start in {timeout}s")


def _clear_fsspec_cache() -> None:
    import fsspec

    for proto in ("gs", "gcs", "s3"):
        with contextlib.suppress(ImportError, ValueError):
            fsspec.get_filesystem_class(proto).clear_instance_cache()


@contextlib.contextmanager
def _serving(server, port: int, env: dict[str, str]) -> Iterator[str]:
    """Start ``server``, point the environment at it (``{endpoint}`` in values), clean up."""
    server.start()
    _wait_for_port(port)
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v.format(endpoint=endpoint) for k, v in env.items()})
    _clear_fsspec_cache()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fsspec_cache()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    """A gcp-storage-emulator on loopback; yields its endpoint URL and sets the env for gcsfs."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    with _serving(server, port, {"STORAGE_EMULATOR_HOST": "{endpoint}"}) as endpoint:
        yield endpoint


@pytest.fixture
def gcs_bucket(gcs_server: str) -> str:
    """A fresh bucket on the GCS emulator; yields ``gs://<bucket>``."""
    import gcsfs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = gcsfs.GCSFileSystem(token="anon")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"gs://{name}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3-API server on loopback; yields its endpoint URL and sets the env for s3fs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    env = {"AWS_ENDPOINT_URL": "{endpoint}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with _serving(server, port, env) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the S3 server; yields ``s3://<bucket>``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
CHROMIUM_TIMEOUT_S = 120


@pytest.fixture
def chromium(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run headless Debian Chromium (a fresh profile per call); skips, saying why, if absent."""
    binary = shutil.which("chromium")
    if binary is None:
        reason = "chromium is not installed (Debian: apt-get install -y chromium)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    calls = iter(range(1 << 20))

    def browse(*args: str) -> subprocess.CompletedProcess:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / f'chromium-{next(calls)}'}",
               *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=CHROMIUM_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"chromium did not finish in {CHROMIUM_TIMEOUT_S}s: {' '.join(cmd)}\n"
                        f"{e.stderr}")

    return browse


# ------------------------------------------------------------------------ Kubernetes manifests

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (backoffLimitPerIndex GA)
CRD_FILES = {"PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
             "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
             "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml"}


def _pod_templates(doc: dict) -> list[dict]:
    """The pod templates inside a PyTorchJob (its replica specs)."""
    if doc.get("kind") != "PyTorchJob":
        return []
    return [rs["template"] for rs in doc["spec"]["pytorchReplicaSpecs"].values()]


@pytest.fixture(scope="session")
def k8s_check() -> Callable[[dict], None]:
    """Validate one manifest offline as an API server and the operators' webhooks would.

    CRD kinds: jsonschema against the CRD in ../shared/schemas (skips, saying why, where that
    folder is absent), no field the schema lacks, the webhook rules
    (stablerep.k8s.check_manifest), and each pod template against the core Pod schema. Core
    kinds: kubernetes-validate's strict schemas for Kubernetes 1.33.
    """
    import jsonschema
    import kubernetes_validate
    import yaml

    from stablerep.k8s import check_manifest
    from stablerep.k8s.crd import pruned_fields

    schemas: dict[str, dict] = {}

    def crd_schema(kind: str) -> dict:
        if kind not in schemas:
            path = SCHEMAS / CRD_FILES[kind]
            if not path.exists():
                reason = f"CRD schema {path} is absent (shared/schemas beside the project root)"
                print(f"SKIP: {reason}")
                pytest.skip(reason)
            crd = yaml.safe_load(path.read_text())
            schemas[kind] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        return schemas[kind]

    def check(doc: dict) -> None:
        if doc["kind"] in CRD_FILES:
            schema = crd_schema(doc["kind"])
            jsonschema.validate(doc, schema)
            assert pruned_fields(doc, schema) == [], f"fields the {doc['kind']} CRD lacks"
            check_manifest(doc)
            for tpl in _pod_templates(doc):
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "p", **tpl["metadata"]}, "spec": tpl["spec"]}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    return check
