"""The training launcher against a stateful API server on loopback (tests/integration/_k8s_fake.py).

The real kubernetes client talks HTTP to the fake; each test plays the operator (status
conditions, pods, logs, events), Kueue (admission) and the pipeline (its Argo Workflow) on a
timeline started when the job is created. Scenarios: success, failure (job kept, reason and
log tail from the previous container run), timeout, unschedulable and image-pull pods, a
missing CRD, 403, 410 Gone mid-run, the API's own trouble mid-run (500, 429 + Retry-After,
a dropped connection, a slow answer; a create that timed out but worked) and an API down past
the bound, SIGTERM to a launcher subprocess (outside a workflow; a cancelled run; an evicted
launcher whose retry attaches), a run terminated through its Workflow, a deleted Workflow
(its job garbage-collected), re-owning on attach, a master that restarts (both runs' logs),
a job queued past the schedule timeout, attaching to an existing job, a namespace that does
not exist. The last test runs enough of them to use every call and checks that the
(verb, resource) pairs the launcher used are exactly what the shipped Role grants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from stablerep.errors import ConfigError
from stablerep.k8s import launcher_rbac
from stablerep.k8s.config import ClusterConfig, PodConfig
from stablerep.k8s.launcher import LaunchConfig, LaunchError, job_name, launch

HERE = Path(__file__).parent
NS = "ml"
PYTORCH = ("kubeflow.org", "v1", "pytorchjobs")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
WORKFLOWS = ("argoproj.io", "v1alpha1", "workflows")
JOB = job_name("run-7f3a", "train", "stablerep-train")


def _load_fake():
    spec = importlib.util.spec_from_file_location("_k8s_fake", HERE / "_k8s_fake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeKube


FakeKube = _load_fake()


@dataclasses.dataclass
class Cluster:
    """A running fake API server, a client for it, and the operator's timeline."""

    kube: object
    url: str
    client: object

    def on_create(self, script: Callable[[str], None]) -> None:
        """Run ``script(job_name)`` in a thread once the launcher creates its job."""
        def start(plural: str, ns: str, obj: dict) -> None:
            threading.Thread(target=script, args=(obj["metadata"]["name"],),
                             daemon=True).start()
        self.kube.on_create.append(start)


def _serve(served: set[tuple[str, str, str]]) -> Iterator[Cluster]:
    from kubernetes import client

    kube = FakeKube(served, {NS})
    url = kube.start()
    cfg = client.Configuration()
    cfg.host = url
    try:
        yield Cluster(kube, url, client.ApiClient(cfg))
    finally:
        kube.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from _serve({PYTORCH, TRAINJOB, WORKFLOWS})


def _config(backend: str = "pytorchjob", queue: str = "", **kwargs) -> LaunchConfig:
    # schedule_timeout_s well above each timeline's length (it holds at half the CPU); the
    # stuck-pod scenarios pass a short one. Backoffs are short so retries stay quick.
    base = dict(schedule_timeout_s=6.0, watch_timeout_s=1, run_id="run-7f3a", task="train",
                backoff_s=0.1, backoff_max_s=0.5, request_timeout_s=5.0)
    base.update(kwargs)
    return LaunchConfig(cluster=ClusterConfig(backend=backend, nodes=2, namespace=NS,
                                              data_root="gs://bucket/run1", queue_name=queue,
                                              pod=PodConfig(gpus=8)), **base)


WF = "stablerep-run-4k2xq"  # the pipeline run's Argo Workflow
LAUNCHER_POD = f"{WF}-system-container-impl-123"


def _workflow(c: Cluster, pod: str = LAUNCHER_POD) -> dict:
    """The run's Workflow and the launcher's pod (owned by it, as Argo makes step pods)."""
    wf = c.kube.get("workflows", NS, WF) or c.kube.create(
        "workflows", NS, {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                          "metadata": {"name": WF}, "spec": {}, "status": {"phase": "Running"}})
    c.kube.put_pod(NS, pod, {"workflows.argoproj.io/workflow": WF}, {"phase": "Running"},
                   owners=[{"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                            "name": WF, "uid": wf["metadata"]["uid"], "controller": True}])
    return wf


@contextlib.contextmanager
def _in_pod(pod: str = LAUNCHER_POD) -> Iterator[dict[str, str]]:
    """The downward-API variables of a launcher pod, for this process and its children."""
    env = {"POD_NAME": pod, "POD_NAMESPACE": NS}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield dict(os.environ)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _running(c: Cluster, job: str, **status) -> None:
    c.kube.put_pod(NS, f"{job}-master-0", _master(job), {"phase": "Running", **status})


def _succeed(c: Cluster, job: str) -> None:
    c.kube.put_pod(NS, f"{job}-master-0", _master(job), {"phase": "Succeeded"})
    c.kube.set_status("pytorchjobs", NS, job, ("Succeeded", "JobSucceeded", "finished"))


def _master(job: str, backend: str = "pytorchjob") -> dict[str, str]:
    if backend == "pytorchjob":
        return {"training.kubeflow.org/job-name": job,
                "training.kubeflow.org/replica-type": "master"}
    return {"jobset.sigs.k8s.io/jobset-name": job, "batch.kubernetes.io/job-completion-index": "0"}


def _plural(backend: str) -> str:
    return {"pytorchjob": "pytorchjobs", "trainjob": "trainjobs"}[backend]


# ------------------------------------------------------------------------------ scenarios
# Each returns what the test asserts on; the least-privilege test runs them all.


def scenario_success(c: Cluster, backend: str = "pytorchjob"):
    def operator(job: str) -> None:
        kube, plural = c.kube, _plural(backend)
        time.sleep(0.2)
        kube.set_status(plural, NS, job, ("Created", "JobCreated", "created"))
        kube.put_pod(NS, f"{job}-master-0", _master(job, backend), {"phase": "Running"})
        kube.append_log(NS, f"{job}-master-0", "train: step 10 loss 5.4121 at 812.0 img/s")
        time.sleep(0.6)
        kube.set_status(plural, NS, job, ("Running", "JobRunning", "running"))
        time.sleep(0.6)
        kube.append_log(NS, f"{job}-master-0", "train: 20 steps, final loss 4.1", done=True)
        kube.put_pod(NS, f"{job}-master-0", _master(job, backend), {"phase": "Succeeded"})
        done = "Succeeded" if backend == "pytorchjob" else "Complete"
        kube.set_status(plural, NS, job, (done, "JobSucceeded", "finished"))

    c.on_create(operator)
    return launch(_config(backend), client=c.client)


def scenario_failed(c: Cluster):
    def operator(job: str) -> None:
        time.sleep(0.2)
        c.kube.put_pod(NS, f"{job}-master-0", _master(job), {"phase": "Running"})
        c.kube.append_log(NS, f"{job}-master-0", "Traceback (most recent call last):",
                          "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
                          done=True)
        c.kube.put_pod(NS, f"{job}-master-0", _master(job), {"phase": "Failed"})
        time.sleep(0.3)
        c.kube.set_status("pytorchjobs", NS, job,
                          ("Failed", "PyTorchJobFailed", "PyTorchJob ml/x has failed because "
                                                         "1 Master replica(s) failed."))

    c.on_create(operator)
    with pytest.raises(LaunchError) as e:
        launch(_config(), client=c.client)
    return str(e.value)


def scenario_stuck(c: Cluster, status: dict, event: tuple[str, str] | None = None):
    def operator(job: str) -> None:
        time.sleep(0.1)
        c.kube.put_pod(NS, f"{job}-worker-0", {"training.kubeflow.org/job-name": job}, status)
        if event:
            c.kube.add_event(NS, f"{job}-worker-0", "Warning", *event)

    c.on_create(operator)
    with pytest.raises(LaunchError) as e:
        launch(_config(schedule_timeout_s=1.0), client=c.client)
    return str(e.value)


UNSCHEDULABLE = {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
     "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}
IMAGE_PULL = {"phase": "Pending", "containerStatuses": [{"name": "pytorch", "state": {
    "waiting": {"reason": "ImagePullBackOff",
                "message": 'Back-off pulling image "registry.example/stablerep:nope"'}}}]}


def scenario_timeout(c: Cluster, backend: str = "pytorchjob"):
    c.on_create(lambda job: c.kube.put_pod(NS, f"{job}-master-0", _master(job, backend),
                                           {"phase": "Running"}))
    with pytest.raises(LaunchError) as e:
        launch(_config(backend, timeout_s=2.0), client=c.client)
    return str(e.value)


def scenario_watch_expires(c: Cluster):
    def operator(job: str) -> None:
        c.kube.put_pod(NS, f"{job}-master-0", _master(job), {"phase": "Running"})
        time.sleep(0.3)
        c.kube.expire_watches(2)
        c.kube.set_status("pytorchjobs", NS, job, ("Running", "JobRunning", "running"))
        time.sleep(1.2)
        c.kube.set_status("pytorchjobs", NS, job, ("Succeeded", "JobSucceeded", "finished"))

    c.on_create(operator)
    return launch(_config(stream_logs=False), client=c.client)


# ---------------------------------------------------------------------------------- tests


def test_created_running_succeeded_streams_log_and_keeps_job(cluster, capfd, monkeypatch):
    monkeypatch.setenv("POD_NAME", "pipeline-train-step-pod")
    monkeypatch.setenv("POD_UID", "0b7c4e0e-1111-2222-3333-444455556666")
    result = scenario_success(cluster)
    name = job_name("run-7f3a", "train", "stablerep-train")
    assert (result.name, result.namespace, result.attached) == (name, NS, False)
    assert result.checkpoint == "gs://bucket/run1/train/latest.json"
    assert result.backbone == "gs://bucket/run1/train/backbone.pt"
    job = cluster.kube.get("pytorchjobs", NS, name)
    assert job is not None, "a succeeded job is kept until its TTL"
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "pipeline-train-step-pod",
        "uid": "0b7c4e0e-1111-2222-3333-444455556666", "blockOwnerDeletion": False,
        "controller": False}]
    out = capfd.readouterr()
    assert "train: step 10 loss 5.4121" in out.out
    assert f"launch: created PyTorchJob {NS}/{name}" in out.err


def test_trainjob_succeeds(cluster):
    result = scenario_success(cluster, "trainjob")
    assert result.kind == "TrainJob"
    assert cluster.kube.get("trainjobs", NS, result.name)["spec"]["trainer"]["numNodes"] == 2


def test_failed_quotes_reason_and_log_tail_and_keeps_job(cluster):
    message = scenario_failed(cluster)
    assert "failed: PyTorchJobFailed: PyTorchJob ml/x has failed" in message
    assert "RuntimeError: CUDA out of memory" in message
    assert f"the job is kept until its TTL (kubectl logs {JOB}-master-0 -n ml)" in message
    assert cluster.kube.get("pytorchjobs", NS, JOB) is not None, "a failed job is kept"


def test_timeout_deletes_job(cluster):
    message = scenario_timeout(cluster)
    assert "did not finish within timeout_s=2s" in message
    assert not [k for k in cluster.kube.objects if k[0] == "pytorchjobs"]


@pytest.mark.parametrize("status, event, expected", [
    (UNSCHEDULABLE, ("FailedScheduling", "0/4 nodes are available: 4 Insufficient "
                                         "nvidia.com/gpu."),
     "is stuck: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."),
    (IMAGE_PULL, ("Failed", 'Failed to pull image "registry.example/stablerep:nope"'),
     'is stuck: ImagePullBackOff: Back-off pulling image "registry.example/stablerep:nope"'),
])
def test_stuck_pod_names_reason_and_deletes(cluster, status, event, expected):
    message = scenario_stuck(cluster, status, event)
    name = job_name("run-7f3a", "train", "stablerep-train")
    assert message.startswith(f"pod {name}-worker-0 of PyTorchJob {name} is stuck")
    assert expected in message and "event: " in message
    assert cluster.kube.get("pytorchjobs", NS, name) is None


def test_crd_missing_says_what_to_install():
    for c in _serve({TRAINJOB}):  # the PyTorchJob group is not served
        with pytest.raises(LaunchError, match=r"the Kubeflow Training Operator \(PyTorchJob\) "
                           r"is not installed on this cluster .* use train_backend=trainjob / "
                           r"local"):
            launch(_config(), client=c.client)


def test_forbidden_names_verb_resource_namespace(cluster):
    cluster.kube.forbidden.add(("create", "pytorchjobs"))
    with pytest.raises(LaunchError, match=r"forbidden: cannot create pytorchjobs in namespace "
                                          r"'ml' .*kubectl apply -k k8s/base/rbac"):
        launch(_config(), client=cluster.client)


def test_watch_410_relists_and_finishes(cluster):
    result = scenario_watch_expires(cluster)
    assert result.name
    verbs = [v for v, r in cluster.kube.requests if r == "pytorchjobs"]
    assert verbs.count("list") >= 2, verbs  # re-listed after 410 Gone


def test_attaches_to_existing_job_instead_of_creating(cluster):
    name = job_name("run-7f3a", "train", "stablerep-train")
    cluster.kube.create("pytorchjobs", NS, {"apiVersion": "kubeflow.org/v1",
                                            "kind": "PyTorchJob", "metadata": {"name": name}})
    cluster.kube.set_status("pytorchjobs", NS, name, ("Succeeded", "JobSucceeded", "done"))
    result = launch(_config(), client=cluster.client)
    assert result.attached and result.name == name
    assert ("create", "pytorchjobs") not in cluster.kube.requests


def test_namespace_missing(cluster):
    cfg = _config()
    cfg.cluster.namespace = "nope"
    with pytest.raises(LaunchError, match="namespace 'nope' does not exist"):
        launch(cfg, client=cluster.client)


def test_bad_config_sends_nothing(cluster):
    with pytest.raises(Exception, match="DNS-1035"):
        launch(_config(job_name="Bad_Name"), client=cluster.client)
    cfg = _config()
    cfg.cluster.nodes = 3  # 3 x 8 = 24 ranks do not divide 1376 captions
    cfg.cluster.recipe = str(HERE.parents[1] / "configs" / "cc12m.yaml")
    with pytest.raises(Exception, match="do not divide train.captions_per_batch 1376"):
        launch(cfg, client=cluster.client)
    assert cluster.kube.requests == []


def _kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u",
                                                  "namespace": NS}}]}))
    return path


def _sigterm_launcher(cluster: Cluster, tmp_path: Path, run_id: str,
                      before_signal: Callable[[str], None] | None = None,
                      env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``stablerep k8s launch`` in a subprocess, SIGTERM it once it follows its job."""
    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"nodes": 2, "data_root": "gs://b/r"}}))
    cmd = [sys.executable, "-m", "stablerep.cli", "k8s", "launch", "--config", str(recipe),
           "--kubeconfig", str(_kubeconfig(tmp_path, cluster.url)), "--run-id", run_id,
           "--watch-timeout", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    name = job_name(run_id, "train", "stablerep-train")
    try:
        cluster.kube.wait_for(lambda: ("pytorchjobs", NS, name) in cluster.kube.objects, 60)
        time.sleep(0.5)  # the launcher is now following the job
        if before_signal:
            before_signal(name)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, name, err


def test_sigterm_outside_a_workflow_deletes_the_job(cluster, tmp_path):
    code, name, err = _sigterm_launcher(cluster, tmp_path, "run-sig")
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (f"error: PyTorchJob {NS}/{name}: cancelled (SIGTERM);"
                                            " the job was deleted")
    assert cluster.kube.get("pytorchjobs", NS, name) is None


# ------------------------------------------------------------- the API's own trouble


def scenario_fault(c: Cluster, verb: str, resource: str, fault: tuple, **cfg):
    """Inject ``fault`` on (verb, resource) while the job runs; the job then succeeds."""
    def operator(job: str) -> None:
        _running(c, job)
        c.kube.append_log(NS, f"{job}-master-0", "train: step 10 loss 5.41")
        c.kube.inject(verb, resource, fault)
        c.kube.wait_for(lambda: not c.kube.faults[(verb, resource)], 30)
        time.sleep(0.5)
        c.kube.append_log(NS, f"{job}-master-0", "train: done", done=True)
        _succeed(c, job)

    c.on_create(operator)
    return launch(_config(**cfg), client=c.client)


@pytest.mark.parametrize("verb, resource, fault, printed", [
    ("list", "pods", ("status", 500), "API trouble on list pods: HTTP 500"),
    ("watch", "pytorchjobs", ("status", 429, 1), "API trouble on watch pytorchjobs: HTTP 429"),
    ("list", "pods", ("drop",), "API trouble on list pods: ProtocolError"),
    ("list", "pods", ("slow", 3.0), "API trouble on list pods: ReadTimeoutError"),
], ids=["500-on-pod-list", "429-retry-after-on-watch", "dropped-connection", "slow-answer"])
def test_api_trouble_mid_run_is_retried_and_the_job_kept(cluster, capfd, verb, resource,
                                                        fault, printed):
    result = scenario_fault(cluster, verb, resource, fault, request_timeout_s=1.0)
    err = capfd.readouterr().err
    assert result.name == JOB and not result.attached
    assert printed in err, err
    if fault[0] == "status" and fault[1] == 429:
        assert "retrying in 0.5s (Retry-After 1s)" in err  # capped by backoff_max_s
    assert "deleted" not in err
    assert cluster.kube.get("pytorchjobs", NS, JOB) is not None


def test_trouble_on_get_create_and_logs_is_retried_and_the_log_complete(cluster, capfd):
    kube = cluster.kube
    kube.inject("get", "pytorchjobs", ("status", 503))
    kube.inject("create", "pytorchjobs", ("drop",))
    kube.inject("get", "pods/log", ("status", 500), ("drop",))

    def operator(job: str) -> None:
        _running(cluster, job)
        kube.append_log(NS, f"{job}-master-0", "train: step 10 loss 5.41")
        time.sleep(0.8)
        kube.append_log(NS, f"{job}-master-0", "train: step 20 loss 4.97", done=True)
        _succeed(cluster, job)

    cluster.on_create(operator)
    result = launch(_config(), client=cluster.client)
    out, err = capfd.readouterr()
    assert not result.attached
    assert "API trouble on get pytorchjobs: HTTP 503" in err
    assert "API trouble on create pytorchjobs: ProtocolError" in err
    assert not kube.faults[("get", "pods/log")], "both log faults were met"
    lines = out.splitlines()
    assert lines.count("train: step 10 loss 5.41") == 1 and lines.count(
        "train: step 20 loss 4.97") == 1, out


def test_create_that_timed_out_but_worked_attaches(cluster, capfd):
    cluster.kube.inject("create", "pytorchjobs", ("late", 2.0))
    cluster.on_create(lambda job: (time.sleep(2.5), _succeed(cluster, job)))
    result = launch(_config(request_timeout_s=1.0), client=cluster.client)
    err = capfd.readouterr().err
    assert "API trouble on create pytorchjobs: ReadTimeoutError" in err
    assert f"launch: attached to existing PyTorchJob {NS}/{JOB}" in err
    assert result.attached
    assert [r for r in cluster.kube.requests if r == ("create", "pytorchjobs")] == [
        ("create", "pytorchjobs")] * 2  # the retry got 409 AlreadyExists


def test_api_down_past_the_bound_fails_the_step_and_keeps_the_job(cluster):
    def operator(job: str) -> None:
        _running(cluster, job)
        time.sleep(0.3)
        cluster.kube.outage = True

    cluster.on_create(operator)
    with pytest.raises(LaunchError) as e:
        launch(_config(api_unreachable_s=1.5), client=cluster.client)
    cluster.kube.outage = False
    assert "the Kubernetes API failed every call for" in str(e.value)
    assert "(api_unreachable_s=1.5)" in str(e.value)
    assert "left running: a retry of this step attaches to it" in str(e.value)
    assert cluster.kube.get("pytorchjobs", NS, JOB) is not None


# ------------------------------------------------------- the pipeline run and its pods


def test_cancelled_run_sigterm_deletes_the_job(cluster, tmp_path):
    _workflow(cluster)

    def terminate(job: str) -> None:  # `argo terminate`: spec.shutdown
        cluster.kube.patch("workflows", NS, WF, {"spec": {"shutdown": "Terminate"}})

    with _in_pod() as env:
        code, name, err = _sigterm_launcher(cluster, tmp_path, "run-cancel", terminate, env)
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"error: PyTorchJob {NS}/{name}: cancelled (the pipeline run was stopped (shutdown: "
        "Terminate)); the job was deleted")
    assert cluster.kube.get("pytorchjobs", NS, name) is None


def test_evicted_launcher_leaves_the_job_and_the_retry_attaches(cluster, tmp_path, capfd):
    wf = _workflow(cluster)
    with _in_pod() as env:
        code, name, err = _sigterm_launcher(cluster, tmp_path, "run-7f3a", env=env)
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"error: PyTorchJob {NS}/{name}: the launcher pod was stopped (SIGTERM: evicted, "
        f"preempted or drained) while pipeline run {WF} goes on; the job is left running and "
        "a retry of this step attaches to it")
    job = cluster.kube.get("pytorchjobs", NS, name)
    assert job is not None and job["metadata"]["ownerReferences"][0]["uid"] == wf[
        "metadata"]["uid"], "owned by the run's Workflow, not by the evicted pod"
    # the step's retry: a new launcher pod of the same run attaches and follows to the end
    _workflow(cluster, pod=f"{LAUNCHER_POD}-retry")
    threading.Timer(1.0, lambda: (_running(cluster, name), _succeed(cluster, name))).start()
    with _in_pod(f"{LAUNCHER_POD}-retry"):
        result = launch(_config(), client=cluster.client)
    assert result.attached and result.name == name
    assert f"launch: attached to existing PyTorchJob {NS}/{name}" in capfd.readouterr().err


def scenario_reown(c: Cluster, backend: str = "pytorchjob"):
    """A job owned by an older launcher's pod: attaching re-owns it to the run's Workflow."""
    wf = _workflow(c)
    plural = _plural(backend)
    c.kube.create(plural, NS, {"metadata": {"name": JOB, "ownerReferences": [
        {"apiVersion": "v1", "kind": "Pod", "name": "old-launcher", "uid": "0ld"}]}})
    done = "Succeeded" if backend == "pytorchjob" else "Complete"
    threading.Timer(1.0, lambda: c.kube.set_status(plural, NS, JOB, (done, "Done", ""))).start()
    with _in_pod():
        result = launch(_config(backend), client=c.client)
    return result, wf


def test_attach_reowns_the_job_to_the_run(cluster, capfd):
    result, wf = scenario_reown(cluster)
    assert result.attached
    owners = cluster.kube.get("pytorchjobs", NS, JOB)["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [
        ("Workflow", WF, wf["metadata"]["uid"])]
    assert (f"launch: PyTorchJob {NS}/{JOB} is now owned by Workflow {WF} (was: Pod "
            "old-launcher)") in capfd.readouterr().err


def scenario_run_deleted(c: Cluster):
    """Deleting the run's Workflow garbage-collects its job; the launcher says so."""
    _workflow(c)

    def operator(job: str) -> None:
        _running(c, job)
        time.sleep(0.5)
        c.kube.delete("workflows", NS, WF)

    c.on_create(operator)
    with _in_pod(), pytest.raises(LaunchError) as e:
        launch(_config(), client=c.client)
    return str(e.value)


def test_deleting_the_run_garbage_collects_the_job(cluster):
    message = scenario_run_deleted(cluster)
    assert message == (f"PyTorchJob {NS}/{JOB} was garbage-collected: the pipeline run was "
                       "deleted")
    assert cluster.kube.get("pytorchjobs", NS, JOB) is None


def test_run_terminated_through_kfp_deletes_the_job_without_a_signal(cluster, capfd):
    _workflow(cluster)

    def operator(job: str) -> None:  # the KFP API server's terminate: activeDeadlineSeconds 0
        _running(cluster, job)
        cluster.kube.patch("workflows", NS, WF, {"spec": {"activeDeadlineSeconds": 0}})

    cluster.on_create(operator)
    with _in_pod(), pytest.raises(LaunchError) as e:
        launch(_config(workflow_poll_s=0.5), client=cluster.client)
    assert str(e.value) == (f"PyTorchJob {NS}/{JOB}: cancelled (the pipeline run was "
                            "terminated); the job was deleted")
    assert cluster.kube.get("pytorchjobs", NS, JOB) is None
    assert f"launch: deleted PyTorchJob {NS}/{JOB} (the pipeline run was terminated)" in \
        capfd.readouterr().err


def scenario_restarts(c: Cluster):
    """The master's container runs twice; both runs' logs reach the launcher's output."""
    def operator(job: str) -> None:
        pod = f"{job}-master-0"
        run = lambda n, state: {"containerStatuses": [  # noqa: E731
            {"name": "pytorch", "restartCount": n, "state": {state: {}}}]}
        _running(c, job, **run(0, "running"))
        c.kube.append_log(NS, pod, "run one: step 10", "run one: NCCL timeout", done=True)
        time.sleep(0.8)
        _running(c, job, **run(1, "running"))
        c.kube.append_log(NS, pod, "run two: resumed from latest.json")
        time.sleep(0.5)
        c.kube.append_log(NS, pod, "run two: final loss 4.1", done=True)
        time.sleep(0.5)
        c.kube.put_pod(NS, pod, _master(job), {"phase": "Succeeded", **run(1, "terminated")})
        c.kube.set_status("pytorchjobs", NS, job, ("Succeeded", "JobSucceeded", "finished"))

    c.on_create(operator)
    with _in_pod():
        _workflow(c)
        return launch(_config(), client=c.client)


def test_master_restart_streams_both_container_runs(cluster, capfd):
    scenario_restarts(cluster)
    out = capfd.readouterr().out
    pod = f"{JOB}-master-0"
    expected = [f"--- master pod {pod}, container run 1 ---", "run one: step 10",
                "run one: NCCL timeout", f"--- master pod {pod}, container run 2 ---",
                "run two: resumed from latest.json", "run two: final loss 4.1"]
    lines = out.splitlines()
    assert [line for line in lines if line in expected] == expected, out


def scenario_queued(c: Cluster):
    """Kueue holds the job longer than the schedule timeout, then admits it."""
    c.kube.kueue = True

    def operator(job: str) -> None:
        time.sleep(2.5)  # > schedule_timeout_s
        c.kube.admit("pytorchjobs", NS, job)
        time.sleep(0.3)
        _running(c, job)
        _succeed(c, job)

    c.on_create(operator)
    return launch(_config(queue="team-a", schedule_timeout_s=1.0, report_every_s=0.5),
                  client=c.client)


def test_queued_past_the_schedule_timeout_then_admitted_succeeds(cluster, capfd):
    result = scenario_queued(cluster)
    err = capfd.readouterr().err
    assert result.name == JOB
    assert (f"launch: PyTorchJob {NS}/{JOB} is queued in Kueue queue 'team-a' (suspended) for "
            in err), err
    assert f"launch: PyTorchJob {NS}/{JOB} was admitted after" in err
    job = cluster.kube.get("pytorchjobs", NS, JOB)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["runPolicy"]["suspend"] is False


def test_queue_timeout_deletes_the_job(cluster):
    cluster.kube.kueue = True
    with pytest.raises(LaunchError, match=r"was not admitted by Kueue queue 'team-a' within "
                                          r"queue_timeout_s=1s"):
        launch(_config(queue="team-a", queue_timeout_s=1.0), client=cluster.client)
    assert cluster.kube.get("pytorchjobs", NS, JOB) is None


def scenario_failed_after_restart(c: Cluster):
    """The job fails with the master crash-looping: the tail comes from the previous run."""
    def operator(job: str) -> None:
        pod = f"{job}-master-0"
        c.kube.append_log(NS, pod, "Traceback (most recent call last):",
                          "RuntimeError: CUDA error: an illegal memory access", done=True, run=0)
        _running(c, job, containerStatuses=[{
            "name": "pytorch", "restartCount": 1,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}}])
        time.sleep(0.5)
        c.kube.set_status("pytorchjobs", NS, job, ("Failed", "PyTorchJobFailed",
                                                   "1 Master replica(s) failed."))

    c.on_create(operator)
    with pytest.raises(LaunchError) as e:
        launch(_config(), client=c.client)
    return str(e.value)


def test_failed_after_restart_keeps_job_and_quotes_previous_run(cluster, capfd):
    message = scenario_failed_after_restart(cluster)
    assert message.startswith(f"PyTorchJob {NS}/{JOB} failed: PyTorchJobFailed: 1 Master "
                              "replica(s) failed.; last log line: RuntimeError: CUDA error")
    assert cluster.kube.get("pytorchjobs", NS, JOB) is not None
    tails = [q for v, r, q in cluster.kube.queries if r == "pods/log" and "tailLines" in q]
    assert tails and tails[-1].get("previous", "").lower() == "true", tails
    err = capfd.readouterr().err
    assert "restarted 1 time(s); its last log lines are from the previous container run" in err
    assert "deleted" not in err


@pytest.mark.parametrize("field, value, expected", [
    ("api_unreachable_s", 0, "api_unreachable_s: got 0, expected a number of seconds > 0"),
    ("queue_timeout_s", -5, "queue_timeout_s: got -5, expected a number of seconds > 0 or "
                            "None"),
    ("request_timeout_s", "fast", "request_timeout_s: got 'fast', expected"),
])
def test_bad_launch_fields_name_themselves(cluster, field, value, expected):
    with pytest.raises(ConfigError, match=re.escape(f"launch.{expected}")):
        _config(**{field: value})
    assert cluster.kube.requests == []


def test_bad_queue_name_exits_2_naming_it_and_creates_nothing(cluster, tmp_path):
    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"nodes": 2, "queue_name": "Team_A"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "stablerep.cli", "k8s", "launch", "--config", str(recipe),
         "--kubeconfig", str(_kubeconfig(tmp_path, cluster.url))],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cluster.queue_name: got 'Team_A', expected the name of a Kueue LocalQueue (a "
        "DNS-1123 label: at most 63 lower-case letters, digits and '-')"]
    assert cluster.kube.requests == []


def test_least_privilege_role_equals_what_the_launcher_uses(tmp_path):
    """Every (verb, resource) used across the scenarios == what the shipped Role grants."""
    used: set[tuple[str, str]] = set()
    # one scenario per (verb, resource) at least: each kind's success, a failure (logs), a
    # stuck pod (events, delete), a TrainJob timeout (delete), re-owning each kind (patch, get
    # pods) and a deleted run (get workflows)
    runs = [lambda c: scenario_success(c), lambda c: scenario_success(c, "trainjob"),
            scenario_failed, lambda c: scenario_timeout(c, "trainjob"),
            lambda c: scenario_stuck(c, UNSCHEDULABLE, ("FailedScheduling", "no nodes")),
            scenario_reown, lambda c: scenario_reown(c, "trainjob"), scenario_run_deleted]
    for run in runs:
        for c in _serve({PYTORCH, TRAINJOB, WORKFLOWS}):
            run(c)
            used |= set(c.kube.requests)
    role = next(o for o in launcher_rbac() if o["kind"] == "Role")
    granted = {(verb, resource) for rule in role["rules"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert used == granted, (f"used but not granted: {sorted(used - granted)}; granted but "
                             f"unused: {sorted(granted - used)}")


@pytest.mark.parametrize("flag, recipe_launch, expected", [
    (["--queue-timeout", "0"], {}, "error: launch.queue_timeout_s: got 0.0, expected a number of "
                                   "seconds > 0 or None"),
    ([], {"api_unreachable_s": -1}, "launch.api_unreachable_s: got -1.0, expected a number of "
                                    "seconds > 0"),
])
def test_bad_follow_settings_exit_2_and_create_nothing(cluster, tmp_path, flag, recipe_launch,
                                                       expected):
    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"nodes": 2}, "launch": recipe_launch}))
    proc = subprocess.run(
        [sys.executable, "-m", "stablerep.cli", "k8s", "launch", "--config", str(recipe),
         "--kubeconfig", str(_kubeconfig(tmp_path, cluster.url)), *flag],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert cluster.kube.requests == []
