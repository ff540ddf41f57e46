"""Kubernetes manifests: valid against the CRD schemas, the webhook rules and core schemas.

Validation is the ``k8s_check`` fixture (tests/conftest.py): CRD schemas from
``../shared/schemas/`` with jsonschema plus a strict walk for unknown fields, the webhook rules,
and kubernetes-validate's strict schemas for core kinds and for pod templates inside jobs.
Bad configs fail before any manifest is built, naming the field.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from stablerep.errors import ConfigError
from stablerep.k8s import (
    ClusterConfig,
    GenerationJobConfig,
    check_manifest,
    generation_job,
    launcher_rbac,
    pytorchjob,
    trainjob,
)
from stablerep.k8s.config import CPU_IMAGE, PodConfig

CLUSTERS = {
    "master-only": ClusterConfig(nodes=1, recipe="configs/cc12m.yaml"),
    "4x8": ClusterConfig(nodes=4, recipe="configs/cc12m.yaml", data_root="gs://b/cc12m",
                         overrides=["train.epochs=15"], active_deadline_s=86_400,
                         pod=PodConfig(node_selector={"cloud.google.com/gke-accelerator":
                                                      "nvidia-h100-80gb"},
                                       tolerations=[{"key": "nvidia.com/gpu",
                                                     "operator": "Exists",
                                                     "effect": "NoSchedule"}],
                                       priority_class="training", env={"NCCL_DEBUG": "WARN"})),
    "elastic": ClusterConfig(nodes=2, elastic_min_nodes=2, elastic_max_nodes=2),
}


@pytest.mark.parametrize("name", CLUSTERS)
def test_pytorchjob_valid(name, k8s_check):
    job = pytorchjob(CLUSTERS[name])
    k8s_check(job)
    assert "&id" not in yaml.safe_dump(job)  # no YAML aliases between replica templates


def test_pytorchjob_roles_and_command():
    job = pytorchjob(CLUSTERS["4x8"])
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in specs.items()} == {"Master": 1, "Worker": 3}
    assert job["spec"]["nprocPerNode"] == "8"
    pod = specs["Worker"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["command"] == ["python", "-m", "stablerep.train_launch"]
    assert c["args"] == ["-m", "stablerep.train", "--config", "$(STABLEREP_RECIPE)",
                         "--data-root", "$(STABLEREP_DATA_ROOT)", "--set", "train.epochs=15"]
    assert c["env"][:2] == [{"name": "STABLEREP_RECIPE", "value": "configs/cc12m.yaml"},
                            {"name": "STABLEREP_DATA_ROOT", "value": "gs://b/cc12m"}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert pod["spec"]["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["priorityClassName"] == "training"
    # restarts by exit status: 1-127 fail the job, 128 and up restart the pod
    assert {v["restartPolicy"] for v in specs.values()} == {"ExitCode"}
    assert {v["template"]["spec"]["restartPolicy"] for v in specs.values()} == {"Never"}
    run = job["spec"]["runPolicy"]
    assert run["activeDeadlineSeconds"] == 86_400 and run["cleanPodPolicy"] == "Running"
    master_only = pytorchjob(CLUSTERS["master-only"])["spec"]["pytorchReplicaSpecs"]
    assert list(master_only) == ["Master"]


@pytest.mark.parametrize("name", ["master-only", "4x8"])
def test_trainjob_valid(name, k8s_check):
    cfg = copy.deepcopy(CLUSTERS[name])
    cfg.backend, cfg.pod.priority_class = "trainjob", ""
    job = trainjob(cfg)
    k8s_check(job)
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == cfg.nodes and trainer["numProcPerNode"] == 8
    assert job["spec"]["runtimeRef"]["name"] == "stablerep-torch"  # exit-status policy
    patched = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    node = patched["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert node["containers"][0]["name"] == "node"
    assert node["volumes"][0]["emptyDir"]["medium"] == "Memory"


def test_generation_job_valid(k8s_check):
    job = generation_job(GenerationJobConfig(shards=64, parallelism=8, recipe="configs/cc12m.yaml",
                                             data_root="gs://b/cc12m"))
    k8s_check(job)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 64
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailIndex"
    assert rules[1]["onExitCodes"] == {"containerName": "generate", "operator": "In",
                                       "values": list(range(1, 128))}
    args = spec["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "generate" and args[-1] == "--shard-from-env"
    assert generation_job(GenerationJobConfig(shards=3, parallelism=8))["spec"]["parallelism"] == 3


def test_rbac_valid(k8s_check):
    for obj in launcher_rbac("ml"):
        k8s_check(obj)


@pytest.mark.parametrize("mutate, message", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "replicas"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     .update(name="trainer"), "named 'pytorch'"),
    (lambda j: j["spec"].update(elasticPolicy={}), "needs a Worker role"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief={}), "unknown role"),
    (lambda j: j["metadata"].update(name="Train_1"), "DNS-1035"),
])
def test_webhook_rules_refuse(mutate, message):
    job = pytorchjob(CLUSTERS["master-only"])
    mutate(job)
    with pytest.raises(ConfigError, match=message):
        check_manifest(job)


@pytest.mark.parametrize("build, message", [
    (lambda: ClusterConfig(nodes=0), "cluster.nodes: got 0, expected >= 1"),
    (lambda: ClusterConfig(name="StableRep_run"), "cluster.name: .*DNS-1035"),
    (lambda: ClusterConfig(name="1run"), "cluster.name: .*DNS-1035"),
    (lambda: ClusterConfig(pod=PodConfig(image=CPU_IMAGE, gpus=8)), "CPU-only image"),
    (lambda: ClusterConfig(pod=PodConfig(cpu="lots")), "cluster.pod.cpu"),
    (lambda: ClusterConfig(nodes=2, elastic_min_nodes=3, elastic_max_nodes=4), "elastic"),
    (lambda: pytorchjob(ClusterConfig(nodes=2, elastic_min_nodes=1, elastic_max_nodes=4)),
     "got 1/4, expected equal values: a run resumes only at the world size"),
    (lambda: trainjob(ClusterConfig(backend="trainjob",
                                    pod=PodConfig(env={"PET_NNODES": "2"}))), "PET_NNODES"),
    (lambda: trainjob(ClusterConfig(backend="trainjob",
                                    pod=PodConfig(priority_class="high"))), "priority_class"),
    (lambda: GenerationJobConfig(shards=0), "generation.shards"),
])
def test_bad_cluster_config(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_cpu_image_without_gpus_is_fine():
    job = pytorchjob(ClusterConfig(pod=PodConfig(image=CPU_IMAGE, gpus=0, cpu="4",
                                                 memory="8Gi", shm_size="1Gi")))
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and job["spec"]["nprocPerNode"] == "1"
