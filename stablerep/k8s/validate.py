"""What the cluster checks of a PyTorchJob or TrainJob, applied offline.

A CRD's OpenAPI schema checks types (:mod:`stablerep.k8s.crd`, shipped with the package); the
operator's webhook adds rules a manifest can still break (names, roles, the container name).
:func:`check_manifest` applies both, so the validate step, ``k8s render`` and the launcher
refuse such a job before anything runs, with a message naming the field.
"""

from __future__ import annotations

from typing import Any

from stablerep.errors import ConfigError
from stablerep.k8s.config import DNS_1035
from stablerep.k8s.manifests import TORCH_PLUGIN_ENV

_ROLES = ("Master", "Worker")
_CLEAN_POD_POLICIES = ("None", "Running", "All")
_RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")


def _name_problems(manifest: dict[str, Any]) -> list[str]:
    name = (manifest.get("metadata") or {}).get("name", "")
    if not isinstance(name, str) or len(name) > 63 or not DNS_1035.match(name):
        return [f"metadata.name: got {name!r}, expected a DNS-1035 label"]
    return []


def pytorchjob_problems(job: dict[str, Any]) -> list[str]:
    """Webhook rules of the Training Operator v1 for a PyTorchJob; [] when it passes."""
    problems = _name_problems(job)
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        problems.append("spec.pytorchReplicaSpecs: expected a Master and/or Worker role")
    for role, rs in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{role}"
        if role not in _ROLES:
            problems.append(f"{where}: unknown role, expected Master or Worker")
        if role == "Master" and rs.get("replicas", 1) != 1:
            problems.append(f"{where}.replicas: got {rs.get('replicas')}, expected 1")
        if rs.get("restartPolicy", "OnFailure") not in _RESTART_POLICIES:
            problems.append(f"{where}.restartPolicy: got {rs.get('restartPolicy')!r}, expected "
                            f"one of {', '.join(_RESTART_POLICIES)}")
        containers = ((rs.get("template") or {}).get("spec") or {}).get("containers") or []
        named = [c for c in containers if c.get("name") == "pytorch"]
        if not named or not named[0].get("image"):
            problems.append(f"{where}.template.spec.containers: expected a container named "
                            "'pytorch' with an image")
    if spec.get("elasticPolicy") is not None and "Worker" not in replicas:
        problems.append("spec.elasticPolicy: an elastic job needs a Worker role")
    policy = (spec.get("runPolicy") or {}).get("cleanPodPolicy")
    if policy is not None and policy not in _CLEAN_POD_POLICIES:
        problems.append(f"spec.runPolicy.cleanPodPolicy: got {policy!r}, expected one of "
                        f"{', '.join(_CLEAN_POD_POLICIES)}")
    return problems


def trainjob_problems(job: dict[str, Any]) -> list[str]:
    """Webhook rules of Kubeflow Trainer v2 for a TrainJob (those checkable offline)."""
    problems = _name_problems(job)
    spec = job.get("spec") or {}
    if not (spec.get("runtimeRef") or {}).get("name"):
        problems.append("spec.runtimeRef.name: expected the name of a training runtime")
    env = ((spec.get("trainer") or {}).get("env")) or []
    for i, var in enumerate(env):
        if var.get("name") in TORCH_PLUGIN_ENV:
            problems.append(f"spec.trainer.env[{i}]: {var['name']} is set by the torch plugin")
    return problems


def check_manifest(manifest: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first webhook or schema rule ``manifest`` breaks.

    Kinds other than PyTorchJob, TrainJob and ClusterTrainingRuntime pass unchanged (their API
    server validates them against built-in schemas).
    """
    from stablerep.k8s.crd import schema_problems

    kind = manifest.get("kind")
    rules = {"PyTorchJob": pytorchjob_problems, "TrainJob": trainjob_problems}.get(kind)
    problems = (rules(manifest) if rules else []) + schema_problems(manifest)
    if problems:
        name = (manifest.get("metadata") or {}).get("name")
        raise ConfigError(f"{kind} {name!r}: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
