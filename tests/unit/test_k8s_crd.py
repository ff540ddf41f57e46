"""The CRD schemas shipped in the package, and check_manifest's use of them.

The shipped files must equal the CRDs in ../shared/schemas (the test skips, saying why, where
that folder is absent); a job that breaks its kind's schema, or carries a field the API server
would drop, is refused in one line naming the field.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from stablerep.errors import ConfigError
from stablerep.k8s import crd
from stablerep.k8s.config import ClusterConfig
from stablerep.k8s.manifests import training_job
from stablerep.k8s.validate import check_manifest

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "schemas"


def test_shipped_schemas_equal_the_crds(tmp_path: Path) -> None:
    if not SHARED.is_dir():
        reason = f"CRD folder {SHARED} is absent (shared/schemas beside the project root)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    for written in crd.vendor(SHARED, tmp_path):
        shipped = crd.SCHEMAS / written.name
        assert json.loads(gzip.decompress(written.read_bytes())) == \
            json.loads(gzip.decompress(shipped.read_bytes())), f"{shipped}: run make crd-schemas"


@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_todays_jobs_pass_the_schema(backend: str) -> None:
    job = training_job(ClusterConfig(backend=backend, nodes=2))
    assert crd.schema_problems(job) == []
    check_manifest(job)


def _pytorchjob() -> dict:
    return copy.deepcopy(training_job(ClusterConfig(nodes=2)))


def test_a_wrong_type_is_named() -> None:
    job = _pytorchjob()
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(ConfigError) as e:
        check_manifest(job)
    assert str(e.value).startswith("PyTorchJob 'stablerep-train': spec.runPolicy.backoffLimit: "
                                   "'three' is not of type 'integer'")
    assert "\n" not in str(e.value)


def test_a_field_the_server_would_drop_is_named() -> None:
    job = _pytorchjob()
    job["spec"]["runPolicy"]["retries"] = 3
    with pytest.raises(ConfigError, match=r"spec\.runPolicy\.retries: not a field of the "
                                          r"PyTorchJob schema \(the API server would drop it\)"):
        check_manifest(job)


def test_other_kinds_pass_unchecked() -> None:
    assert crd.schema_problems({"apiVersion": "v1", "kind": "ConfigMap", "extra": 1}) == []
