"""Exit statuses: which errors are peer failures, what status each failure ends in, and which
status the torchrun wrapper reports for a set of failed children.

The classification cases are the messages measured from torch 2.14's gloo (a peer killed: a
read error from ``gloo/transport/tcp/pair.cc``; a peer hung: a recv timeout from
``gloo/transport/tcp/unbound_buffer.cc``) against errors that are bugs (a shape mismatch, a
CUDA error) and must keep their own type.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from stablerep import cli
from stablerep.distributed import CollectiveError, DistEnv, collectives, is_peer_failure
from stablerep.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_KILLED,
    EXIT_PEER_LOST,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    PeerLostError,
    is_retryable,
)
from stablerep.train_launch import child_status, job_exit_code

GLOO_RESET = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
              "[127.0.0.1]:44165: Connection reset by peer. This is typically caused by a remote "
              "worker hanging or bugs in the application.")
GLOO_TIMEOUT = ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
                "waiting 5000ms for recv operation to complete")
SHAPE = "mat1 and mat2 shapes cannot be multiplied (16x192 and 191x64)"
CUDA = "CUDA error: an illegal memory access was encountered"
TWO = DistEnv(rank=1, world_size=2)


@pytest.mark.parametrize(("error", "peer"), [
    (RuntimeError(GLOO_RESET), True),
    (RuntimeError(GLOO_TIMEOUT), True),
    (RuntimeError("Application timeout caused pair closure"), True),  # DDP broadcast, hung peer
    (dist.DistBackendError("NCCL communicator was aborted"), True),
    (dist.DistNetworkError("connection to the store closed"), True),
    (dist.DistStoreError("wait timeout"), True),
    (RuntimeError(SHAPE), False),
    (RuntimeError(CUDA), False),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), False),
    (torch.OutOfMemoryError("CUDA out of memory"), False),
    (ValueError(GLOO_RESET), False),  # only RuntimeErrors come from gloo's transport
], ids=["gloo-reset", "gloo-timeout", "gloo-pair-closure", "nccl", "network", "store", "shape", "cuda", "cudnn",
        "oom", "not-runtime"])
def test_only_collective_failures_are_peer_failures(error: BaseException, peer: bool) -> None:
    assert is_peer_failure(error) is peer
    if peer:
        with pytest.raises(CollectiveError) as info, collectives(TWO):
            raise error
        assert info.value.__cause__ is error and info.value.exit_code == EXIT_PEER_LOST
    else:  # the very exception, with its traceback, not a copy or a wrapper
        with pytest.raises(type(error)) as info, collectives(TWO):
            raise error
        assert info.value is error


def _exit(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> tuple[int, str]:
    """Run `stablerep train` with the stage raising ``error``; (status, stderr)."""
    def fail(cfg):
        raise error

    monkeypatch.setattr(cli.stages, "run_training", fail)
    result = CliRunner().invoke(cli.main, ["train", "--data", "/nowhere", "--out", "/tmp/x"],
                                standalone_mode=True)
    return result.exit_code, result.stderr


def test_each_kind_of_failure_exits_with_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    status, err = _exit(monkeypatch, PeerLostError("rank 0: a peer process failed"))
    assert status == EXIT_PEER_LOST and err == "error: rank 0: a peer process failed\n"
    status, err = _exit(monkeypatch, RuntimeError(SHAPE))
    assert status == EXIT_BUG
    assert "Traceback (most recent call last)" in err and f"RuntimeError: {SHAPE}" in err
    assert err.strip().splitlines()[-1].startswith(f"error: internal error: RuntimeError: {SHAPE}")
    from stablerep.errors import ConfigError

    status, err = _exit(monkeypatch, ConfigError("train.lr: got -1, expected > 0"))
    assert status == EXIT_USER_ERROR and err == "error: train.lr: got -1, expected > 0\n"
    status, err = _exit(monkeypatch, KeyboardInterrupt())
    assert status == EXIT_INTERRUPTED and err.endswith("error: interrupted\n")


def test_statuses_split_into_permanent_and_retryable() -> None:
    assert [s for s in (EXIT_BUG, EXIT_USER_ERROR) if is_retryable(s)] == []
    assert all(is_retryable(s) for s in (130, EXIT_KILLED, EXIT_PEER_LOST, EXIT_TERMINATED))
    assert not is_retryable(0) and not is_retryable(256)


@dataclass
class Failure:
    """What the wrapper reads of torchrun's ProcessFailure."""

    exitcode: int
    timestamp: int = 100


def test_signal_deaths_read_as_128_plus_the_signal() -> None:
    assert [child_status(c) for c in (-9, -15, -2, 2, 138)] == [137, 143, 130, 2, 138]


@pytest.mark.parametrize(("failures", "status"), [
    # rank 1 has a bug; torchrun then stops rank 0 with SIGTERM: the bug is the status
    ({0: Failure(-15, 101), 1: Failure(1, 100)}, 1),
    # the bug's rank failed after its peer saw it go: the bug still wins
    ({0: Failure(EXIT_PEER_LOST, 100), 1: Failure(1, 101)}, 1),
    ({0: Failure(2), 1: Failure(2)}, 2),
    # rank 1 killed (OOM): its 137, not its peer's SIGTERM from torchrun
    ({0: Failure(-15, 100), 1: Failure(-9, 101)}, 137),
    ({0: Failure(EXIT_PEER_LOST, 100), 1: Failure(-15, 100)}, EXIT_PEER_LOST),
    ({0: Failure(-15), 1: Failure(-15)}, 143),
    ({}, 1),
], ids=["bug-then-sigterm", "bug-after-peer-lost", "bad-config", "killed", "peer-lost",
        "preempted", "none"])
def test_the_wrapper_reports_the_most_telling_child_status(failures: dict, status: int) -> None:
    assert job_exit_code(failures) == status


# ---------------------------------------------------------------------------- job policies

PERMANENT = list(range(1, 128))
DISRUPTION = {"action": "Ignore",
              "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_pytorchjob_restarts_by_exit_status(k8s_check) -> None:
    from stablerep.k8s import ClusterConfig, pytorchjob

    job = pytorchjob(ClusterConfig(nodes=3, backoff_limit=5))
    k8s_check(job)
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        # the operator restarts a pod that exited 128-255 and fails the job on 1-127
        assert spec["restartPolicy"] == "ExitCode"
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        container = spec["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "stablerep.train_launch"]
    assert job["spec"]["runPolicy"]["backoffLimit"] == 5


def test_training_runtime_fails_on_permanent_status_and_restarts_otherwise(k8s_check) -> None:
    from stablerep.k8s import ClusterConfig
    from stablerep.k8s.manifests import RUNTIME_NAME, training_runtime, trainjob

    cfg = ClusterConfig(nodes=2, backend="trainjob", runtime=RUNTIME_NAME, backoff_limit=4)
    runtime = training_runtime(cfg)
    k8s_check(runtime)
    assert runtime["kind"] == "ClusterTrainingRuntime"
    assert runtime["metadata"]["name"] == RUNTIME_NAME and "namespace" not in runtime["metadata"]
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"] == {
        "maxRestarts": 4, "rules": [{"name": "permanent-exit-status", "action": "FailJobSet",
                                     "onJobFailureReasons": ["PodFailurePolicy"]}]}
    [node] = jobset["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    job = node["template"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["podFailurePolicy"]["rules"] == [
        DISRUPTION, {"action": "FailJob", "onExitCodes": {
            "containerName": "node", "operator": "In", "values": PERMANENT}}]
    train = trainjob(cfg)
    k8s_check(train)
    assert train["spec"]["runtimeRef"]["name"] == RUNTIME_NAME
    assert train["spec"]["trainer"]["command"] == ["python", "-m", "stablerep.train_launch"]


def test_generation_job_fails_an_index_on_a_permanent_status(k8s_check) -> None:
    from stablerep.k8s import GenerationJobConfig, generation_job

    job = generation_job(GenerationJobConfig(shards=4, parallelism=2))
    k8s_check(job)
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        DISRUPTION, {"action": "FailIndex", "onExitCodes": {
            "containerName": "generate", "operator": "In", "values": PERMANENT}}]
