"""The training launcher: create (or attach to) a PyTorchJob / TrainJob, follow it, clean up.

What a pipeline step or a laptop runs to train on a cluster::

    result = launch(LaunchConfig(cluster=cluster_config, run_id=RUN_ID, task="train"))

- **Idempotent.** The job's name derives from the pipeline run and task (or is given); an
  existing job of that name is attached to, never created twice, and one that already
  succeeded returns at once.
- **Nothing left behind.** The job is owned by the launcher's own pod (``POD_NAME`` /
  ``POD_UID`` from the downward API), so Kubernetes collects it with the pod; on SIGTERM (a
  cancelled run), failure or timeout the launcher deletes it itself. Success keeps it until
  its TTL.
- **Watches.** It follows the job with a watch from the last resourceVersion, re-listing on
  ``410 Gone`` or a dropped connection, and streams the master pod's log to its own output.
- **Says why it is stuck.** Pods that stay Pending (unschedulable, image pull back-off) or
  crash-loop past ``schedule_timeout_s`` fail the launch with the reason from the pod's
  conditions, container states and events, naming the pod; the job is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from stablerep.errors import StablerepError
from stablerep.k8s.config import ClusterConfig, check_dns_1035
from stablerep.k8s.manifests import PYTORCHJOB_API, TRAINJOB_API, training_job
from stablerep.k8s.validate import check_manifest

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
RBAC_HINT = "apply the launcher's RBAC (kubectl apply -k k8s/base/rbac -n NAMESPACE)"
#: Container states that mean a pod will not make progress by itself.
STUCK_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
                 "CreateContainerConfigError", "CreateContainerError")


class LaunchError(StablerepError):
    """The training job could not be started, failed, or was stopped; its message is one line."""


class _Cancelled(BaseException):
    """SIGTERM arrived: unwind to the clean-up (a BaseException, so nothing swallows it)."""


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

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    @property
    def resource(self) -> str:
        return self.plural


KINDS = {
    "pytorchjob": JobKind(
        "PyTorchJob", PYTORCHJOB_API, "pytorchjobs", "training.kubeflow.org/job-name={name}",
        "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
        ("Succeeded",), "the Kubeflow Training Operator (PyTorchJob)"),
    "trainjob": JobKind(
        "TrainJob", TRAINJOB_API, "trainjobs", "jobset.sigs.k8s.io/jobset-name={name}",
        "jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0",
        ("Complete", "Succeeded"), "Kubeflow Trainer v2 (TrainJob)"),
}
_OTHER = {"pytorchjob": "trainjob", "trainjob": "pytorchjob"}


@dataclass
class LaunchConfig:
    """One launch: the job to run and how to follow it."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run_id: str = ""  # the pipeline run (the job name derives from run_id + task)
    task: str = "train"  # the pipeline task
    job_name: str = ""  # explicit job name (wins over run_id/task)
    schedule_timeout_s: float = 900.0  # how long pods may stay stuck before the launch fails
    timeout_s: float | None = None  # whole-run limit (None = none)
    watch_timeout_s: int = 30  # one watch request's length (the loop re-watches)
    log_tail_lines: int = 30  # master log lines quoted when the job fails
    stream_logs: bool = True  # copy the master pod's log to this process's stdout

    def __post_init__(self) -> None:
        if self.job_name:
            check_dns_1035("job_name", self.job_name)
        if self.schedule_timeout_s <= 0:
            raise LaunchError(f"schedule_timeout_s: got {self.schedule_timeout_s}, "
                              "expected > 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise LaunchError(f"timeout_s: got {self.timeout_s}, expected > 0 or None")


@dataclass
class LaunchResult:
    """How a launch ended (only success returns; everything else raises LaunchError)."""

    name: str
    namespace: str
    kind: str
    attached: bool  # True when the job existed before this launch
    train_out: str  # the training folder: latest.json, ckpt-*.pt, backbone.pt
    checkpoint: str  # <train_out>/latest.json
    backbone: str  # <train_out>/backbone.pt
    seconds: float


def job_name(run_id: str, task: str, default: str) -> str:
    """A DNS-1035 job name that is the same for every retry of one pipeline task."""
    if not run_id:
        return default
    digest = hashlib.sha256(f"{run_id}\0{task}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", f"{default}-{task}".lower()).strip("-")[:50].rstrip("-")
    return f"{stem}-{digest}"


def _owner_reference() -> list[dict[str, Any]]:
    """The launcher's pod as owner (downward API env), or [] outside a pod."""
    name, uid = os.environ.get("POD_NAME", ""), os.environ.get("POD_UID", "")
    if not (name and uid):
        return []
    return [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid,
             "blockOwnerDeletion": False, "controller": False}]


def _train_out(cluster: ClusterConfig) -> str:
    """Where the job writes checkpoints: train.out of its recipe, else <data_root>/train."""
    from stablerep.config import load_config
    from stablerep.storage import join

    data_root, out = cluster.data_root, ""
    with contextlib.suppress(StablerepError, OSError):
        if cluster.recipe:
            cfg = load_config(cluster.recipe, cluster.overrides, require=("train",))
            data_root = data_root or cfg.data_root
            out = cfg.train.out if cfg.train else ""
    return out or join(data_root or "./data", "train")


class Launcher:
    """Creates one training job and follows it to its end. See the module docstring."""

    def __init__(self, cfg: LaunchConfig, api_client: Any, namespace: str):
        from kubernetes import client

        self.cfg = cfg
        self.kind = KINDS[cfg.cluster.backend]
        self.namespace = namespace
        self.name = cfg.job_name or job_name(cfg.run_id, cfg.task, cfg.cluster.name)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._stuck_since: dict[str, float] = {}
        self._log_threads: dict[str, threading.Thread] = {}
        self._stop_logs = threading.Event()

    # ------------------------------------------------------------------ API calls

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

    def _call(self, verb: str, resource: str, fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
        """One API call, with 403 / an unserved group turned into LaunchError."""
        from kubernetes.client.rest import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise (self._translate(e, verb, resource) or e) from None

    def _job_call(self, verb: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        k = self.kind
        return self._call(verb, k.plural, fn, k.group, k.version, self.namespace, k.plural,
                          *args, **kwargs)

    def _get_job(self) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self._job_call("get", self.custom.get_namespaced_custom_object, self.name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _create_job(self) -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        manifest = training_job(self.cfg.cluster)
        manifest["metadata"].update(name=self.name, namespace=self.namespace)
        labels = manifest["metadata"]["labels"]
        if self.cfg.run_id:
            labels["stablerep.dev/run-hash"] = hashlib.sha256(
                self.cfg.run_id.encode()).hexdigest()[:16]
        owners = _owner_reference()
        if owners:
            manifest["metadata"]["ownerReferences"] = owners
        check_manifest(manifest)
        try:
            job = self._job_call("create", self.custom.create_namespaced_custom_object,
                                 manifest)
        except ApiException as e:
            if e.status == 404 and "namespace" in (e.body or "").lower():
                raise LaunchError(f"namespace {self.namespace!r} does not exist on this "
                                  "cluster; create it or pass another --namespace") from None
            if e.status == 422:
                raise LaunchError(f"the cluster refused {self.kind.kind} {self.name}: "
                                  f"{_reason(e)}") from None
            raise
        return job

    def _delete_job(self, why: str) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self._job_call("delete", self.custom.delete_namespaced_custom_object, self.name,
                           body={"propagationPolicy": "Background"})
            print(f"launch: deleted {self.kind.kind} {self.namespace}/{self.name} ({why})",
                  file=sys.stderr, flush=True)
        except (ApiException, LaunchError) as e:
            print(f"launch: could not delete {self.kind.kind} {self.namespace}/{self.name}: "
                  f"{e}", file=sys.stderr, flush=True)

    def _pods(self, selector: str) -> list[dict[str, Any]]:
        resp = self._call("list", "pods", self.core.list_namespaced_pod, self.namespace,
                          label_selector=selector.format(name=self.name),
                          _preload_content=False)
        return json.loads(resp.data).get("items", [])

    def _events(self, name: str) -> list[dict[str, Any]]:
        resp = self._call("list", "events", self.core.list_namespaced_event, self.namespace,
                          field_selector=f"involvedObject.name={name}", _preload_content=False)
        return json.loads(resp.data).get("items", [])

    def _log_tail(self) -> list[str]:
        from kubernetes.client.rest import ApiException

        lines: list[str] = []
        with contextlib.suppress(ApiException, LaunchError):
            for pod in self._pods(self.kind.master_selector)[:1]:
                text = self._call("get", "pods/log", self.core.read_namespaced_pod_log,
                                  pod["metadata"]["name"], self.namespace,
                                  tail_lines=self.cfg.log_tail_lines)
                lines = str(text).splitlines()
        return lines

    # ------------------------------------------------------------------ following

    def _watch(self, resource_version: str | None) -> Iterator[dict[str, Any]]:
        """Job events from ``resource_version``; ends on timeout; raises ApiException(410)."""
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        k = self.kind
        kwargs: dict[str, Any] = {"field_selector": f"metadata.name={self.name}",
                                  "timeout_seconds": self.cfg.watch_timeout_s}
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            yield from watch.Watch().stream(self.custom.list_namespaced_custom_object, k.group,
                                            k.version, self.namespace, k.plural, **kwargs)
        except ApiException as e:
            raise (self._translate(e, "watch", k.plural) or e) from None

    def _list_job(self) -> tuple[dict[str, Any] | None, str]:
        """(the job or None, the list's resourceVersion to watch from)."""
        listing = self._job_call("list", self.custom.list_namespaced_custom_object,
                                 field_selector=f"metadata.name={self.name}")
        items = listing.get("items", [])
        return (items[0] if items else None), listing["metadata"]["resourceVersion"]

    def follow(self, started: float) -> dict[str, Any]:
        """Follow the job until it succeeds (returned) or fails/stalls (LaunchError)."""
        import urllib3
        from kubernetes.client.rest import ApiException

        job, rv = self._list_job()
        while True:
            if job is None:
                raise LaunchError(f"{self.kind.kind} {self.namespace}/{self.name} was deleted "
                                  "by someone else while it ran")
            if self._finished(job):
                return job
            self._check_pods(started)
            self._check_deadline(started)
            try:
                for event in self._watch(rv):
                    obj = event["raw_object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    job = None if event["type"] == "DELETED" else obj
                    break  # re-check after every change
            except ApiException as e:
                if e.status != 410:
                    raise
                log.info("launch: watch expired (410 Gone); re-listing")
                job, rv = self._list_job()
            except (urllib3.exceptions.HTTPError, ConnectionError) as e:
                log.info("launch: watch connection dropped (%s); re-listing", e)
                time.sleep(1.0)
                job, rv = self._list_job()

    def _finished(self, job: dict[str, Any]) -> bool:
        """True on success; raises LaunchError on failure; False while it runs."""
        conditions = {c.get("type"): c for c in job.get("status", {}).get("conditions") or []
                      if c.get("status") == "True"}
        if any(t in conditions for t in self.kind.done):
            return True
        if "Failed" in conditions:
            c = conditions["Failed"]
            tail = self._log_tail()
            for line in tail:
                print(f"[{self.name} master] {line}", file=sys.stderr)
            last = f"; last log line: {tail[-1].strip()}" if tail else ""
            raise LaunchError(f"{self.kind.kind} {self.namespace}/{self.name} failed: "
                              f"{c.get('reason', 'Failed')}: {c.get('message', '')}".rstrip(": ")
                              + last)
        return False

    def _check_deadline(self, started: float) -> None:
        limit = self.cfg.timeout_s
        if limit is not None and time.monotonic() - started > limit:
            raise LaunchError(f"{self.kind.kind} {self.namespace}/{self.name} did not finish "
                              f"within timeout_s={limit:g}s")

    def _check_pods(self, started: float) -> None:
        """Stream new master logs; fail when a pod stays stuck past schedule_timeout_s."""
        now = time.monotonic()
        pods = self._pods(self.kind.pod_selector)
        if not pods and now - started > self.cfg.schedule_timeout_s:
            events = [e.get("message", "") for e in self._events(self.name)
                      if e.get("type") == "Warning"]
            raise LaunchError(f"{self.kind.kind} {self.namespace}/{self.name}: no pods after "
                              f"{self.cfg.schedule_timeout_s:g}s"
                              + (f" ({events[-1]})" if events else ""))
        for pod in pods:
            name = pod["metadata"]["name"]
            reason = _stuck_reason(pod)
            if reason is None:
                self._stuck_since.pop(name, None)
            else:
                since = self._stuck_since.setdefault(name, now)
                if now - since > self.cfg.schedule_timeout_s:
                    warnings = [e.get("message", "") for e in self._events(name)
                                if e.get("type") == "Warning"]
                    detail = f"; event: {warnings[-1]}" if warnings else ""
                    raise LaunchError(f"pod {name} of {self.kind.kind} {self.name} is stuck: "
                                      f"{reason} (for more than "
                                      f"{self.cfg.schedule_timeout_s:g}s){detail}")
            if self.cfg.stream_logs and pod.get("status", {}).get("phase") in ("Running",
                                                                                  "Succeeded"):
                self._start_log_stream(pod)

    def _start_log_stream(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        labels = pod["metadata"].get("labels", {})
        wanted = dict(kv.split("=", 1) for kv in
                      self.kind.master_selector.format(name=self.name).split(","))
        if name in self._log_threads or any(labels.get(k) != v for k, v in wanted.items()):
            return
        thread = threading.Thread(target=self._copy_log, args=(name,), daemon=True)
        self._log_threads[name] = thread
        thread.start()

    def _copy_log(self, pod: str) -> None:
        """Copy one pod's log to stdout, line by line, until it ends."""
        with contextlib.suppress(Exception):  # a log is a courtesy: never fail the launch
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, follow=True,
                                                     _preload_content=False)
            for raw in resp.stream(4096, decode_content=True):
                if self._stop_logs.is_set():
                    break
                sys.stdout.write(raw.decode("utf-8", "replace"))
                sys.stdout.flush()

    # ------------------------------------------------------------------ the launch

    def run(self) -> LaunchResult:
        """Create or attach, follow to the end, clean up on anything but success."""
        started = time.monotonic()
        job = self._get_job()
        attached = job is not None
        where = f"{self.kind.kind} {self.namespace}/{self.name}"
        if job is None:
            self._create_job()
            print(f"launch: created {where}", file=sys.stderr, flush=True)
        else:
            print(f"launch: attached to existing {where}", file=sys.stderr, flush=True)
        outcome = "failed"
        try:
            with _sigterm_raises():
                self.follow(started)
            outcome = "succeeded"
        except _Cancelled:
            outcome = "cancelled"
            self._delete_job("the launcher was cancelled (SIGTERM)")
            raise LaunchError(f"{where}: cancelled (SIGTERM); the job was deleted") from None
        finally:
            self._stop_logs.set()
            for thread in self._log_threads.values():
                thread.join(timeout=2.0)
            if outcome == "failed":
                self._delete_job("the launch did not succeed")
        out = _train_out(self.cfg.cluster)
        from stablerep.storage import join

        print(f"launch: {where} succeeded; checkpoints in {out}", file=sys.stderr, flush=True)
        return LaunchResult(self.name, self.namespace, self.kind.kind, attached, out,
                            join(out, "latest.json"), join(out, "backbone.pt"),
                            time.monotonic() - started)


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


def _stuck_reason(pod: dict[str, Any]) -> str | None:
    """Why a pod cannot make progress (unschedulable, image pull, crash loop), else None."""
    status = pod.get("status", {})
    if status.get("phase") == "Pending":
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Cancelled` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Cancelled()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def api_client(*, kubeconfig: str = "", context: str = "") -> tuple[Any, str]:
    """(ApiClient, default namespace): in-cluster service account, else a kubeconfig.

    The kubeconfig file and the chosen cluster's server are checked first, and the server is
    asked for its version, so an unusable file or an unreachable server is one line naming it.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    from stablerep.k8s import access

    if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        try:
            with open(SA_NAMESPACE_FILE) as f:
                namespace = f.read().strip()
        except OSError:
            namespace = "default"
        return client.ApiClient(), namespace
    path = access.kubeconfig_path(kubeconfig)
    access.check_kubeconfig(path, LaunchError)
    try:
        contexts, active = config.list_kube_config_contexts(config_file=str(path))
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        if chosen is None:
            raise LaunchError(f"--context {context}: not in the kubeconfig; contexts: "
                              f"{', '.join(c['name'] for c in contexts)}")
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(path), context=chosen["name"],
                                client_configuration=cfg)
    except (ConfigException, OSError, TypeError, AttributeError, KeyError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LaunchError(f"kubeconfig {path}: not usable ({why})") from None
    access.check_server(cfg.host, path, LaunchError)
    api = client.ApiClient(cfg)
    access.probe(api, cfg.host, LaunchError)
    return api, chosen.get("context", {}).get("namespace") or "default"


def launch(cfg: LaunchConfig, *, kubeconfig: str = "", context: str = "",
           client: Any = None) -> LaunchResult:
    """Run one training job on the cluster to its end (see the module docstring).

    Args:
        cfg: what to launch and how to follow it.
        kubeconfig: a kubeconfig file (default: in-cluster, else ~/.kube/config).
        context: a kubeconfig context (default: the current one).
        client: an ApiClient to use instead (tests); the namespace must then be in cfg.
    """
    from stablerep.k8s.render import check_world_size

    check_manifest(training_job(cfg.cluster))  # nothing is sent for an invalid job
    check_world_size(cfg.cluster)
    if client is None:
        client, namespace = api_client(kubeconfig=kubeconfig, context=context)
    else:
        namespace = "default"
    return Launcher(cfg, client, cfg.cluster.namespace or namespace).run()
