"""The training launcher: create (or attach to) a PyTorchJob / TrainJob and follow it.

What a pipeline step or a laptop runs to train on a cluster::

    result = launch(LaunchConfig(cluster=cluster_config, run_id=RUN_ID, task="train"))

- **Idempotent.** The job's name derives from the pipeline run and task (or is given); an
  existing job of that name is attached to, never created twice (a create that timed out but
  succeeded answers 409 and is attached to), and one that already succeeded returns at once.
- **The job lives as long as the run, not the launcher pod.** In a pipeline the job is owned
  by the run's Argo Workflow (:mod:`stablerep.k8s.owner`): deleting the run garbage-collects
  it; an evicted, preempted or drained launcher pod leaves it running and the step's retry
  attaches (re-owning it if needed) and follows it to its end. On SIGTERM the launcher reads
  the Workflow: stopped, terminated or gone -> the job is deleted (cancelled); still running
  -> the job is left for the retry. Outside a workflow (a laptop) SIGTERM / Ctrl-C deletes it.
- **The API's trouble is not the job's.** 5xx, 429, timeouts and dropped connections on any
  call are retried with capped backoff (:mod:`stablerep.k8s.retry`); past
  ``api_unreachable_s`` the launch fails and leaves the job running.
- **Queued is not stuck.** A job a queue holds (suspended by Kueue, scheduling-gated pods) is
  reported as queued and waited for (``queue_timeout_s``, default forever); the schedule and
  run timeouts count from admission.
- **Only real failures delete.** ``timeout_s``, ``queue_timeout_s`` and a pod stuck past
  ``schedule_timeout_s`` after admission (unschedulable, image pull, crash loop) delete the
  job. A job that Failed is kept until its TTL; the operator's reason and the master's last
  log lines are printed. Success keeps it until its TTL.
- **Logs.** The master pod's log is copied to stdout across container restarts
  (:mod:`stablerep.k8s.follow`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stablerep.errors import StablerepError
from stablerep.k8s.api import Api, LaunchError, _reason, say
from stablerep.k8s.config import (
    QUEUE_LABEL,
    ClusterConfig,
    LaunchSettings,
    check_dns_1035,
)
from stablerep.k8s.follow import LogFollower, container_state, gated, restarts, stuck_reason
from stablerep.k8s.manifests import training_job
from stablerep.k8s.owner import WORKFLOW_API, Owner, pod_namespace, stopping, workflow_of
from stablerep.k8s.retry import ApiUnreachable, Retrier, is_transient
from stablerep.k8s.validate import check_manifest

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: The longest the SIGTERM path waits for the API (a pod's grace period is 30 s by default).
SIGTERM_API_S = 15.0


class _Abandon(LaunchError):
    """A real failure of the launch (timeout, stuck pod, queue timeout, cancel): delete the job."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


class _Cancelled(BaseException):
    """SIGTERM arrived: unwind to the clean-up (a BaseException, so nothing swallows it)."""


@dataclass
class LaunchConfig(LaunchSettings):
    """One launch: the job to run (and, inherited, how to follow it)."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run_id: str = ""  # the pipeline run (the job name derives from run_id + task)
    task: str = "train"  # the pipeline task
    job_name: str = ""  # explicit job name (wins over run_id/task)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.job_name:
            check_dns_1035("job_name", self.job_name)


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


class Launcher(Api):
    """Creates one training job and follows it to its end. See the module docstring."""

    def __init__(self, cfg: LaunchConfig, api_client: Any, namespace: str):
        super().__init__(cfg, api_client, namespace,
                         cfg.job_name or job_name(cfg.run_id, cfg.task, cfg.cluster.name))
        self.where = f"{self.kind.kind} {namespace}/{self.name}"
        self.owner: Owner | None = None  # what the job is (to be) owned by
        self.run_ref: tuple[str, str] | None = None  # (namespace, name) of the Workflow
        self._stuck_since: dict[str, float] = {}
        self._followers: dict[str, LogFollower] = {}
        self._admitted: float | None = None  # when the queue let the job run
        self._queued_since: float | None = None
        self._reported = 0.0
        self._polled = time.monotonic()

    # ------------------------------------------------------------------ ownership

    def find_owner(self) -> None:
        """The run's Workflow (from the launcher pod), else that pod; nothing outside a pod."""
        pod_name, pod_uid = os.environ.get("POD_NAME", ""), os.environ.get("POD_UID", "")
        if not pod_name:
            return
        pod_ns = pod_namespace(self.namespace)
        pod = self.get_json("pods", self.core.read_namespaced_pod, pod_name, pod_ns)
        wf_name, wf_uid = workflow_of(pod or {})
        if wf_name:
            self.run_ref = (pod_ns, wf_name)
            if not wf_uid:
                wf_uid = ((self.workflow(pod_ns, wf_name) or {}).get("metadata") or {}).get(
                    "uid", "")
        if pod_ns != self.namespace:  # owners must live in the job's namespace
            say(f"launch: the launcher runs in namespace {pod_ns!r}, the job in "
                 f"{self.namespace!r}: the job has no owner (deleting the run does not "
                 "collect it)")
        elif wf_name and wf_uid:
            self.owner = Owner("Workflow", "/".join(WORKFLOW_API[:2]), wf_name, wf_uid)
        elif pod_uid or pod:
            uid = pod_uid or pod["metadata"].get("uid", "")
            self.owner = Owner("Pod", "v1", pod_name, uid) if uid else None

    def reown(self, job: dict[str, Any]) -> None:
        """Make the run's Workflow the job's owner when it is not (an attach after a retry)."""
        if self.owner is None or not self.owner.workflow:
            return
        refs = job.get("metadata", {}).get("ownerReferences") or []
        if any(r.get("uid") == self.owner.uid for r in refs):
            return
        kept = [r for r in refs if r.get("kind") not in ("Pod", "Workflow")]
        self.job_call("patch", self.custom.patch_namespaced_custom_object, self.name,
                      {"metadata": {"ownerReferences": kept + [self.owner.reference()]}})
        was = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in refs) or "no owner"
        say(f"launch: {self.where} is now owned by Workflow {self.owner.name} (was: {was})")

    def run_stopping(self) -> str:
        """Why the pipeline run is being stopped, "" while it runs (or outside a workflow)."""
        if self.run_ref is None:
            return ""
        return stopping(self.workflow(*self.run_ref))

    # ------------------------------------------------------------------ create, delete

    def create_job(self) -> bool:
        """Create the job; False when it already exists (a retried create that had worked)."""
        from kubernetes.client.rest import ApiException

        manifest = training_job(self.cfg.cluster)
        manifest["metadata"].update(name=self.name, namespace=self.namespace)
        labels = manifest["metadata"]["labels"]
        if self.cfg.run_id:
            labels["stablerep.dev/run-hash"] = hashlib.sha256(
                self.cfg.run_id.encode()).hexdigest()[:16]
        if self.owner is not None:
            manifest["metadata"]["ownerReferences"] = [self.owner.reference()]
        check_manifest(manifest)
        try:
            self.job_call("create", self.custom.create_namespaced_custom_object, manifest)
        except ApiException as e:
            if e.status == 409:
                return False
            if e.status == 404 and "namespace" in (e.body or "").lower():
                raise LaunchError(f"namespace {self.namespace!r} does not exist on this "
                                  "cluster; create it or pass another --namespace") from None
            if e.status == 422:
                raise LaunchError(f"the cluster refused {self.where}: {_reason(e)}") from None
            raise
        return True

    def delete_job(self, why: str) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.job_call("delete", self.custom.delete_namespaced_custom_object, self.name,
                          body={"propagationPolicy": "Background"})
            say(f"launch: deleted {self.where} ({why})")
        except (ApiException, StablerepError) as e:
            say(f"launch: could not delete {self.where}: {e}")

    # ------------------------------------------------------------------ following

    def follow(self) -> dict[str, Any]:
        """Follow the job until it succeeds (returned) or fails/stalls (LaunchError)."""
        job, rv = self.list_job()
        while True:
            if job is None:
                raise LaunchError(self._gone())
            if self._finished(job):
                return job
            self._check_progress(job)
            job, rv = self._next(job, rv)

    def _next(self, job: dict[str, Any], rv: str) -> tuple[dict[str, Any] | None, str]:
        """The job after its next change (or after one watch's length), and the version."""
        from kubernetes.client.rest import ApiException

        try:
            for event in self.watch(rv):
                self.retrier.ok()
                obj = event["raw_object"]
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                return (None if event["type"] == "DELETED" else obj), rv
            return job, rv
        except ApiException as e:
            if e.status != 410 and not is_transient(e):
                raise
            if e.status == 410:
                log.info("launch: watch expired (410 Gone); re-listing")
            else:
                self.retrier.failed(e, f"watch {self.kind.plural}")
        except Exception as e:  # noqa: BLE001 (dropped connections, timeouts)
            if not is_transient(e):
                raise
            self.retrier.failed(e, f"watch {self.kind.plural}")
        return self.list_job()

    def _gone(self) -> str:
        why = self.run_stopping()
        if why:
            return f"{self.where} was garbage-collected: {why}"
        return f"{self.where} was deleted by someone else while it ran"

    def _finished(self, job: dict[str, Any]) -> bool:
        """True on success; raises LaunchError on failure (the job is kept); False meanwhile."""
        conditions = {c.get("type"): c for c in job.get("status", {}).get("conditions") or []
                      if c.get("status") == "True"}
        if any(t in conditions for t in self.kind.done):
            return True
        if "Failed" not in conditions:
            return False
        c = conditions["Failed"]
        pod, tail = self._log_tail()
        for line in tail:
            print(f"[{self.name} master] {line}", file=sys.stderr)
        last = f"; last log line: {tail[-1].strip()}" if tail else ""
        keep = f"; the job is kept until its TTL (kubectl logs {pod} -n {self.namespace})" \
            if pod else "; the job is kept until its TTL"
        raise LaunchError(f"{self.where} failed: {c.get('reason', 'Failed')}: "
                          f"{c.get('message', '')}".rstrip(": ") + last + keep)

    def _log_tail(self) -> tuple[str, list[str]]:
        """(master pod, its last log lines): the previous container's when it restarted."""
        with contextlib.suppress(Exception):  # the tail illustrates the failure; never fatal
            for pod in self.pods(self.kind.master_selector)[:1]:
                name = pod["metadata"]["name"]
                previous = restarts(pod) > 0 and container_state(pod) != "terminated"
                text = self.call("get", "pods/log", self.core.read_namespaced_pod_log, name,
                                 self.namespace, tail_lines=self.cfg.log_tail_lines,
                                 previous=previous)
                if previous:
                    say(f"launch: {name} restarted {restarts(pod)} time(s); its last log "
                         "lines are from the previous container run")
                return name, str(text).splitlines()
        return "", []

    def _check_progress(self, job: dict[str, Any]) -> None:
        """Queue, pods, deadline and the pipeline run: raise when the launch cannot go on."""
        now = time.monotonic()
        if self.kind.suspended(job):
            return self._queued(job, now, "suspended")
        pods = self.pods(self.kind.pod_selector)
        if pods and all(gated(p) for p in pods):
            return self._queued(job, now, "pods scheduling-gated")
        if self._admitted is None:
            if self._queued_since is not None:
                say(f"launch: {self.where} was admitted after "
                     f"{now - self._queued_since:.0f}s in the queue")
            self._admitted, self._queued_since = now, None
        self._check_pods(pods, now)
        limit = self.cfg.timeout_s
        if limit is not None and now - self._admitted > limit:
            raise _Abandon(f"{self.where} did not finish within timeout_s={limit:g}s",
                           "timeout_s exceeded")
        self._poll_run(now)

    def _queued(self, job: dict[str, Any], now: float, how: str) -> None:
        """A queue holds the job: report it now and then; fail past queue_timeout_s."""
        self._admitted, self._stuck_since = None, {}
        since = self._queued_since = self._queued_since or now
        queue = (job.get("metadata", {}).get("labels") or {}).get(QUEUE_LABEL, "")
        where = f"Kueue queue {queue!r}" if queue else "a queue"
        if now - self._reported >= self.cfg.report_every_s:
            self._reported = now
            say(f"launch: {self.where} is queued in {where} ({how}) for {now - since:.0f}s; "
                 "waiting for admission")
        limit = self.cfg.queue_timeout_s
        if limit is not None and now - since > limit:
            raise _Abandon(f"{self.where} was not admitted by {where} within "
                           f"queue_timeout_s={limit:g}s", "queue_timeout_s exceeded")
        self._poll_run(now)

    def _poll_run(self, now: float) -> None:
        """Every workflow_poll_s: a stopped or deleted pipeline run cancels the launch."""
        if self.run_ref is None or now - self._polled < self.cfg.workflow_poll_s:
            return
        self._polled = now
        why = self.run_stopping()
        if why:
            raise _Abandon(f"{self.where}: cancelled ({why}); the job was deleted", why)

    def _check_pods(self, pods: list[dict[str, Any]], now: float) -> None:
        """Stream the master's log; fail when a pod stays stuck past schedule_timeout_s."""
        admitted, limit = self._admitted or now, self.cfg.schedule_timeout_s
        if not pods and now - admitted > limit:
            events = self.warnings(self.name)
            raise _Abandon(f"{self.where}: no pods {limit:g}s after admission"
                           + (f" ({events[-1]})" if events else ""), "no pods")
        for pod in pods:
            name = pod["metadata"]["name"]
            reason = stuck_reason(pod)
            if reason is None:
                self._stuck_since.pop(name, None)
            elif now - self._stuck_since.setdefault(name, now) > limit:
                warnings = self.warnings(name)
                detail = f"; event: {warnings[-1]}" if warnings else ""
                raise _Abandon(f"pod {name} of {self.kind.kind} {self.name} is stuck: {reason} "
                               f"(for more than {limit:g}s){detail}", "a pod is stuck")
            if self.cfg.stream_logs and pod.get("status", {}).get("phase") in (
                    "Running", "Succeeded", "Failed"):
                self._start_log(pod)

    def _start_log(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        labels = pod["metadata"].get("labels", {})
        wanted = dict(kv.split("=", 1) for kv in
                      self.kind.master_selector.format(name=self.name).split(","))
        if name in self._followers or any(labels.get(k) != v for k, v in wanted.items()):
            return
        self._followers[name] = LogFollower(self.core, self.retrier, self.namespace, name,
                                            self.cfg.request_timeout_s)
        self._followers[name].start()

    # ------------------------------------------------------------------ the launch

    def start(self) -> bool:
        """Create the job, or attach to it (re-owning it); True when it existed."""
        self.find_owner()
        job = self.get_job()
        if job is None and self.create_job():
            say(f"launch: created {self.where}"
                 + (f" (owned by {self.owner.kind} {self.owner.name})" if self.owner else ""))
            return False
        job = job or self.get_job()
        if job is None:
            raise LaunchError(f"{self.where} was deleted while the launcher attached to it")
        say(f"launch: attached to existing {self.where}")
        self.reown(job)
        return True

    def run(self) -> LaunchResult:
        """Create or attach, follow to the end; delete the job only on a real failure."""
        started = time.monotonic()
        attached = False
        try:
            with _sigterm_raises():
                attached = self.start()
                self.follow()
        except (_Cancelled, KeyboardInterrupt) as e:
            self._stop_logs()
            self._stopped("SIGTERM" if isinstance(e, _Cancelled) else "Ctrl-C")
        except _Abandon as e:
            self._stop_logs()
            self.delete_job(e.why)
            raise
        except ApiUnreachable as e:
            raise LaunchError(f"{self.where}: {e}; the job (if created) is left running: a "
                              "retry of this step attaches to it") from None
        finally:
            self._stop_logs()
        out = _train_out(self.cfg.cluster)
        from stablerep import contracts, storage

        say(f"launch: {self.where} succeeded; checkpoints in {out}")
        return LaunchResult(self.name, self.namespace, self.kind.kind, attached, out,
                            storage.join(out, contracts.LATEST),
                            storage.join(out, contracts.BACKBONE),
                            time.monotonic() - started)

    def _stopped(self, signal_name: str) -> None:
        """The launcher is being stopped: delete the job for a cancel, keep it for an evict."""
        if self.run_ref is None:  # a laptop or a plain pod: stopping the launcher cancels
            self.delete_job(f"the launcher was cancelled ({signal_name})")
            raise LaunchError(f"{self.where}: cancelled ({signal_name}); the job was deleted")
        self.retrier = Retrier(min(SIGTERM_API_S, self.cfg.api_unreachable_s),
                               self.cfg.backoff_s, self.cfg.backoff_max_s, say)
        try:
            why = self.run_stopping()
        except Exception as e:  # noqa: BLE001 (the run's state is unknown: keep the job)
            why = ""
            say(f"launch: could not read pipeline run {self.run_ref[1]} ({e}); keeping the "
                 "job")
        if why:
            self.delete_job(why)
            raise LaunchError(f"{self.where}: cancelled ({why}); the job was deleted")
        raise LaunchError(f"{self.where}: the launcher pod was stopped ({signal_name}: evicted, "
                          f"preempted or drained) while pipeline run {self.run_ref[1]} goes "
                          "on; the job is left running and a retry of this step attaches to it")

    def _stop_logs(self) -> None:
        for follower in self._followers.values():
            follower.stop(wait_s=2.0)
        self._followers.clear()


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
