"""The launcher's view of the Kubernetes API: the job kinds, and every call it makes.

:class:`Api` wraps each call the launcher makes (training jobs, pods, logs, events, the
pipeline run's Argo Workflow) in the retrying layer of :mod:`stablerep.k8s.retry`, with a
connect/read limit per request, and turns a 403 or an API group the cluster does not serve
into one :class:`LaunchError` that says what to do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stablerep.errors import StablerepError
from stablerep.k8s.manifests import PYTORCHJOB_API, TRAINJOB_API
from stablerep.k8s.owner import WORKFLOW_API
from stablerep.k8s.retry import Retrier, take_over_retries

if TYPE_CHECKING:
    from stablerep.k8s.launcher import LaunchConfig

RBAC_HINT = "apply the launcher's RBAC (kubectl apply -k k8s/base/rbac -n NAMESPACE)"


class LaunchError(StablerepError):
    """The training job could not be started, failed, or was stopped; its message is one line."""


@dataclass(frozen=True)
class JobKind:
    """Where one kind of training job lives in the API, and how its pods are labelled."""

    kind: str
    api_version: str
    plural: str
    pod_selector: str  # label selector of the job's pods; {name} = job name
    master_selector: str  # selector of the pod whose log is streamed
    done: tuple[str, ...]  # condition types meaning success
    operator: str  # what to install when the group is not served
    suspend_path: tuple[str, ...]  # where in spec the job is suspended (a queue holds it)

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    @property
    def resource(self) -> str:
        return self.plural

    def suspended(self, job: dict[str, Any]) -> bool:
        """Whether the job is held (spec.runPolicy.suspend / spec.suspend is true)."""
        node: Any = job.get("spec") or {}
        for key in self.suspend_path:
            node = node.get(key) if isinstance(node, dict) else None
        return node is True


KINDS = {
    "pytorchjob": JobKind(
        "PyTorchJob", PYTORCHJOB_API, "pytorchjobs", "training.kubeflow.org/job-name={name}",
        "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
        ("Succeeded",), "the Kubeflow Training Operator (PyTorchJob)", ("runPolicy", "suspend")),
    "trainjob": JobKind(
        "TrainJob", TRAINJOB_API, "trainjobs", "jobset.sigs.k8s.io/jobset-name={name}",
        "jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0",
        ("Complete", "Succeeded"), "Kubeflow Trainer v2 (TrainJob)", ("suspend",)),
}
_OTHER = {"pytorchjob": "trainjob", "trainjob": "pytorchjob"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



class Api:
    """The launcher's API calls: each retried through :class:`Retrier`, 403 / an unserved
    group turned into one clear LaunchError."""

    def __init__(self, cfg: LaunchConfig, api_client: Any, namespace: str, name: str):
        from kubernetes import client

        self.cfg = cfg
        self.kind = KINDS[cfg.cluster.backend]
        self.namespace = namespace
        self.name = name
        take_over_retries(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.retrier = Retrier(cfg.api_unreachable_s, cfg.backoff_s, cfg.backoff_max_s, say)

    def _translate(self, e: Any, verb: str, resource: str) -> LaunchError | None:
        """403 and an unserved API group as one clear LaunchError; None for anything else."""
        if e.status == 403:
            return LaunchError(f"forbidden: cannot {verb} {resource} in namespace "
                               f"{self.namespace!r} ({_reason(e)}); {RBAC_HINT}")
        if e.status == 404 and resource == self.kind.plural and not _is_status(e):
            return LaunchError(
                f"{self.kind.operator} is not installed on this cluster ("
                f"{self.kind.api_version} {self.kind.plural} is not served); install it, "
                f"or use train_backend={_OTHER[self.cfg.cluster.backend]} / local")
        return None

    def call(self, verb: str, resource: str, fn: Callable[..., Any], *args: Any,
             **kwargs: Any) -> Any:
        """One API call, retried while the API is in trouble; 403 etc. as LaunchError."""
        from kubernetes.client.rest import ApiException

        limit = self.cfg.request_timeout_s  # (connect, read): the client ignores a float
        kwargs.setdefault("_request_timeout", (limit, limit))
        try:
            return self.retrier.call(f"{verb} {resource}", fn, *args, **kwargs)
        except ApiException as e:
            raise (self._translate(e, verb, resource) or e) from None

    def job_call(self, verb: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        k = self.kind
        return self.call(verb, k.plural, fn, k.group, k.version, self.namespace, k.plural,
                         *args, **kwargs)

    def get_json(self, resource: str, fn: Callable[..., Any], *args: Any) -> Any:
        """GET returning the parsed object, or None when it does not exist (404)."""
        from kubernetes.client.rest import ApiException

        try:
            resp = self.call("get", resource, fn, *args, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def get_job(self) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.job_call("get", self.custom.get_namespaced_custom_object, self.name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_job(self) -> tuple[dict[str, Any] | None, str]:
        """(the job or None, the list's resourceVersion to watch from)."""
        listing = self.job_call("list", self.custom.list_namespaced_custom_object,
                                field_selector=f"metadata.name={self.name}")
        items = listing.get("items", [])
        return (items[0] if items else None), listing["metadata"]["resourceVersion"]

    def watch(self, resource_version: str | None) -> Iterator[dict[str, Any]]:
        """Job events from ``resource_version``; ends on timeout; raises ApiException(410)."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        k = self.kind
        kwargs: dict[str, Any] = {"field_selector": f"metadata.name={self.name}",
                                  "timeout_seconds": self.cfg.watch_timeout_s,
                                  "_request_timeout": (self.cfg.request_timeout_s,
                                                       self.cfg.watch_timeout_s
                                                       + self.cfg.request_timeout_s)}
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            yield from watch.Watch().stream(self.custom.list_namespaced_custom_object, k.group,
                                            k.version, self.namespace, k.plural, **kwargs)
        except ApiException as e:
            raise (self._translate(e, "watch", k.plural) or e) from None

    def pods(self, selector: str) -> list[dict[str, Any]]:
        resp = self.call("list", "pods", self.core.list_namespaced_pod, self.namespace,
                         label_selector=selector.format(name=self.name),
                         _preload_content=False)
        return json.loads(resp.data).get("items", [])

    def warnings(self, name: str) -> list[str]:
        """Warning events' messages about the object ``name`` (oldest first)."""
        resp = self.call("list", "events", self.core.list_namespaced_event, self.namespace,
                         field_selector=f"involvedObject.name={name}", _preload_content=False)
        return [e.get("message", "") for e in json.loads(resp.data).get("items", [])
                if e.get("type") == "Warning"]

    def workflow(self, namespace: str, name: str) -> dict[str, Any] | None:
        group, version, plural = WORKFLOW_API
        return self.get_json("workflows", self.custom.get_namespaced_custom_object, group,
                             version, namespace, plural, name)


def _is_status(e: Any) -> bool:
    """Whether an ApiException carries a Kubernetes Status (an object 404, not a route 404)."""
    try:
        return json.loads(e.body or "").get("kind") == "Status"
    except (ValueError, AttributeError):
        return False


def _reason(e: Any) -> str:
    try:
        return json.loads(e.body or "").get("message") or str(e.reason)
    except (ValueError, AttributeError):
        return str(e.reason)
