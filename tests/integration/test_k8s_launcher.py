"""The training launcher against a stateful API server on loopback (tests/integration/_k8s_fake.py).

The real kubernetes client talks HTTP to the fake; each test plays the operator (status
conditions, pods, logs, events) on a timeline started when the job is created. Scenarios:
success, failure with the log tail, timeout, unschedulable and image-pull pods, a missing
CRD, 403, 410 Gone mid-run, SIGTERM to a launcher subprocess, attaching to an existing job,
a namespace that does not exist. The last test runs them all and checks that the
(verb, resource) pairs the launcher used are exactly what the shipped Role grants.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from stablerep.k8s import launcher_rbac
from stablerep.k8s.config import ClusterConfig, PodConfig
from stablerep.k8s.launcher import LaunchConfig, LaunchError, job_name, launch

HERE = Path(__file__).parent
NS = "ml"
PYTORCH = ("kubeflow.org", "v1", "pytorchjobs")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")


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
    yield from _serve({PYTORCH, TRAINJOB})


def _config(backend: str = "pytorchjob", **kwargs) -> LaunchConfig:
    # schedule_timeout_s well above each timeline's length (it holds at half the CPU); the
    # stuck-pod scenarios pass a short one
    base = dict(schedule_timeout_s=6.0, watch_timeout_s=1, run_id="run-7f3a", task="train")
    base.update(kwargs)
    return LaunchConfig(cluster=ClusterConfig(backend=backend, nodes=2, namespace=NS,
                                              data_root="gs://bucket/run1",
                                              pod=PodConfig(gpus=8)), **base)


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


def test_failed_quotes_reason_and_log_tail_and_deletes(cluster):
    message = scenario_failed(cluster)
    assert "failed: PyTorchJobFailed: PyTorchJob ml/x has failed" in message
    assert "RuntimeError: CUDA out of memory" in message
    assert cluster.kube.get("pytorchjobs", NS, job_name("run-7f3a", "train",
                                                        "stablerep-train")) is None


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


def test_sigterm_deletes_the_job(cluster, tmp_path):
    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"nodes": 2, "data_root": "gs://b/r"}}))
    cmd = [sys.executable, "-m", "stablerep.cli", "k8s", "launch", "--config", str(recipe),
           "--kubeconfig", str(_kubeconfig(tmp_path, cluster.url)), "--run-id", "run-sig",
           "--watch-timeout", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = job_name("run-sig", "train", "stablerep-train")
    try:
        cluster.kube.wait_for(lambda: ("pytorchjobs", NS, name) in cluster.kube.objects, 60)
        time.sleep(0.5)  # the launcher is now following the job
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1] == (f"error: PyTorchJob {NS}/{name}: cancelled (SIGTERM);"
                                            " the job was deleted")
    assert cluster.kube.get("pytorchjobs", NS, name) is None


def test_least_privilege_role_equals_what_the_launcher_uses(tmp_path):
    """Every (verb, resource) used across the scenarios == what the shipped Role grants."""
    used: set[tuple[str, str]] = set()
    runs = [lambda c: scenario_success(c), lambda c: scenario_success(c, "trainjob"),
            scenario_failed, scenario_timeout, lambda c: scenario_timeout(c, "trainjob"),
            scenario_watch_expires,
            lambda c: scenario_stuck(c, UNSCHEDULABLE, ("FailedScheduling", "no nodes"))]
    for run in runs:
        for c in _serve({PYTORCH, TRAINJOB}):
            run(c)
            used |= set(c.kube.requests)
    role = next(o for o in launcher_rbac() if o["kind"] == "Role")
    granted = {(verb, resource) for rule in role["rules"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert used == granted, (f"used but not granted: {sorted(used - granted)}; granted but "
                             f"unused: {sorted(granted - used)}")
