"""Pod hardening of the rendered workloads and their checkov skip annotations.

Every pod runs with a read-only root filesystem, a scratch ``emptyDir`` at ``/tmp`` holding
``HOME``, and (where the kind allows it) no service-account token. The checks a manifest
fails on purpose carry ``checkov.io/skipN: CHECK=reason``, and only while the config really
fails them. ``tests/integration/test_images.py`` runs checkov itself on ``k8s/``.
"""

from __future__ import annotations

import re

import pytest

from stablerep.k8s import ClusterConfig, GenerationJobConfig, generation_job, pytorchjob, trainjob
from stablerep.k8s.config import PodConfig
from stablerep.k8s.manifests import (
    SCRATCH_HOME,
    SCRATCH_PATH,
    checkov_skips,
    generation_network_policy,
    launcher_rbac,
)

_SKIP = re.compile(r"^(CKV2?_K8S_\d+)=(\S.*)$")


def _pods(kind: str, pod: PodConfig | None = None) -> tuple[dict, list[dict]]:
    """(manifest, pod specs) of one workload kind built with ``pod``."""
    pod = pod or PodConfig()
    if kind == "pytorchjob":
        job = pytorchjob(ClusterConfig(nodes=2, pod=pod))
        return job, [rs["template"]["spec"] for rs in job["spec"]["pytorchReplicaSpecs"].values()]
    if kind == "trainjob":
        job = trainjob(ClusterConfig(backend="trainjob", nodes=2, pod=pod))
        patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
        return job, [patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]]
    job = generation_job(GenerationJobConfig(shards=4, pod=pod))
    return job, [job["spec"]["template"]["spec"]]


def _env(job: dict, spec: dict) -> list[dict]:
    """The environment of the stage container (a TrainJob keeps it in spec.trainer)."""
    return job["spec"]["trainer"]["env"] if job["kind"] == "TrainJob" else spec["containers"][0]["env"]


@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob", "generation"])
def test_read_only_root_with_scratch_and_home(kind):
    job, specs = _pods(kind)
    for spec in specs:
        container = spec["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        scratch = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == SCRATCH_PATH]
        assert len(scratch) == 1
        volume = {v["name"]: v for v in spec["volumes"]}[scratch[0]]
        assert volume["emptyDir"] == {}  # node disk, not memory: model caches are large
        assert SCRATCH_HOME.startswith(SCRATCH_PATH + "/")
        homes = [e["value"] for e in _env(job, spec) if e["name"] == "HOME"]
        assert homes == [SCRATCH_HOME]


@pytest.mark.parametrize("kind", ["pytorchjob", "generation"])
def test_no_service_account_token(kind):
    _, specs = _pods(kind, PodConfig(service_account="stablerep-data"))
    assert all(spec["automountServiceAccountToken"] is False for spec in specs)


def test_pod_env_sets_its_own_home():
    job, specs = _pods("pytorchjob", PodConfig(env={"HOME": "/scratch/me", "NCCL_DEBUG": "WARN"}))
    env = _env(job, specs[0])
    assert [e for e in env if e["name"] == "HOME"] == [{"name": "HOME", "value": "/scratch/me"}]
    assert [e["name"] for e in env] == ["HOME", "NCCL_DEBUG"]


@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob", "generation"])
def test_defaults_carry_a_reason_for_each_skip(kind):
    job, _ = _pods(kind)
    skips = job["metadata"]["annotations"]
    assert list(skips) == [f"checkov.io/skip{i}" for i in range(1, len(skips) + 1)]
    checks = []
    for text in skips.values():
        match = _SKIP.match(text)
        assert match, text
        assert "=" not in match.group(2) and len(match.group(2)) > 20, text
        checks.append(match.group(1))
    assert checks == ["CKV_K8S_21", "CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_40"]


def test_a_config_that_meets_a_check_drops_its_skip():
    pod = PodConfig(image="registry.example/stablerep@sha256:" + "a" * 64,
                    image_pull_policy="Always", run_as_user=10_001)
    job = pytorchjob(ClusterConfig(namespace="ml", pod=pod))
    assert "annotations" not in job["metadata"]
    assert checkov_skips("ml", pod) == {}
    only_uid = checkov_skips("ml", PodConfig(image=pod.image, image_pull_policy="Always"))
    assert [v.split("=")[0] for v in only_uid.values()] == ["CKV_K8S_40"]


def test_rbac_skips_only_the_namespace():
    assert all(list(o["metadata"]["annotations"].values())[0].startswith("CKV_K8S_21=")
               and len(o["metadata"]["annotations"]) == 1 for o in launcher_rbac())
    assert all("annotations" not in o["metadata"] for o in launcher_rbac("ml"))


def test_generation_network_policy(k8s_check):
    cfg = GenerationJobConfig(shards=4, namespace="ml", labels={"team": "vision"})
    policy = generation_network_policy(cfg)
    k8s_check(policy)
    pod_labels = generation_job(cfg)["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()  # it selects the job's pods
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in policy["spec"]
    assert policy["metadata"]["namespace"] == "ml"
