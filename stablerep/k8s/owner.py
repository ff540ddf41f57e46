"""Who owns the training job: the pipeline run's Argo Workflow, found from the launcher's pod.

Kubeflow Pipelines v2 runs on Argo Workflows: every step's pod carries the label
``workflows.argoproj.io/workflow`` and an ownerReference to its ``Workflow``. The job is
owned by that Workflow, not by the pod, so deleting the run garbage-collects the job while an
evicted, preempted or drained launcher pod leaves it running for the step's retry to attach.

A run is being stopped when its Workflow is gone, is being deleted, has finished, or has been
told to stop: ``spec.shutdown`` (``argo stop`` / ``argo terminate``) or
``spec.activeDeadlineSeconds: 0`` (how the KFP API server terminates a run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

WORKFLOW_API = ("argoproj.io", "v1alpha1", "workflows")
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_ENDED = ("Succeeded", "Failed", "Error")


@dataclass(frozen=True)
class Owner:
    """An owner of the job: the run's Workflow, or the launcher's pod outside a workflow."""

    kind: str  # Workflow | Pod
    api_version: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        """The ownerReference the job carries (no blockOwnerDeletion: no finalizer rights)."""
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name,
                "uid": self.uid, "blockOwnerDeletion": False, "controller": False}

    @property
    def workflow(self) -> bool:
        return self.kind == "Workflow"


def pod_namespace(default: str) -> str:
    """The launcher pod's namespace: POD_NAMESPACE, the service account's, else ``default``."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def workflow_of(pod: dict[str, Any]) -> tuple[str, str]:
    """(name, uid) of the Workflow that owns ``pod`` ("" uid: only the label names it)."""
    meta = pod.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Workflow" and ref.get("apiVersion", "").startswith("argoproj.io/"):
            return ref["name"], ref.get("uid", "")
    return (meta.get("labels") or {}).get(WORKFLOW_LABEL, ""), ""


def stopping(workflow: dict[str, Any] | None) -> str:
    """Why the run is being stopped ("" while it runs); None = the Workflow is gone."""
    if workflow is None:
        return "the pipeline run was deleted"
    spec, status = workflow.get("spec") or {}, workflow.get("status") or {}
    if workflow.get("metadata", {}).get("deletionTimestamp"):
        return "the pipeline run is being deleted"
    shutdown = spec.get("shutdown") or status.get("shutdown")
    if shutdown:
        return f"the pipeline run was stopped (shutdown: {shutdown})"
    if spec.get("activeDeadlineSeconds") == 0:
        return "the pipeline run was terminated"
    if status.get("phase") in _ENDED:
        return f"the pipeline run ended ({status['phase']})"
    return ""
