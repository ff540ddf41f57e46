"""Typed cluster settings: where and how big a training or generation job runs.

The stage configs (:mod:`stablerep.config`) say *what* a stage computes; these say where its
pods run: image, nodes, GPUs per node, resources, scheduling (node selector, tolerations,
priority class) and the job's lifetime policy. Validation names the field and what was
expected, before any manifest is built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from stablerep import __version__
from stablerep.errors import ConfigError
from stablerep.k8s import rules

#: Image repository the project's Dockerfiles are tagged into (``make images``).
IMAGE_REPOSITORY = "docker.io/stablerep/stablerep"
#: The CUDA image (generation, training, evaluation) and the CPU image of this version.
CUDA_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cuda"
CPU_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"

Backend = Literal["pytorchjob", "trainjob"]
CleanPodPolicy = Literal["None", "Running", "All"]

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: The label Kueue reads a workload's LocalQueue from.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: The project's ClusterTrainingRuntime (k8s/base/training-runtime): TrainJobs run on it by
#: default, so their failure policy follows the exit statuses (stock torch-distributed has none).
RUNTIME_NAME = "stablerep-torch"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def check_dns_1035(where: str, value: str) -> None:
    """A Kubernetes object name that must be a DNS-1035 label (the operators' rule)."""
    if not value or len(value) > 63 or not DNS_1035.match(value):
        raise ConfigError(f"{where}: got {value!r}, expected a DNS-1035 label (at most 63 "
                          "lower-case letters, digits and '-', starting with a letter, not "
                          "ending with '-')")


def _check_quantity(where: str, value: str) -> None:
    if not _QUANTITY.match(str(value)):
        raise ConfigError(f"{where}: got {value!r}, expected a Kubernetes quantity such as "
                          "16, 500m, 64Gi")


def _check_image(where: str, image: str, gpus: int) -> None:
    rules.check_image(where, image)
    tag = image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]
    if gpus > 0 and (tag == "cpu" or tag.endswith("-cpu")):
        raise ConfigError(f"{where}: {image!r} is the CPU-only image but {gpus} GPU(s) per "
                          f"pod are requested; use the CUDA image (e.g. {CUDA_IMAGE}) or "
                          "request 0 GPUs")


@dataclass
class PodConfig:
    """What every pod of a job gets: image, resources and scheduling."""

    image: str = CUDA_IMAGE  # the project's CUDA image (make images), or yours
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    gpus: int = 8  # nvidia.com/gpu per pod (per node for training)
    cpu: str = "32"  # CPU request and limit per pod
    memory: str = "256Gi"  # memory request and limit per pod
    shm_size: str = "64Gi"  # size of the memory-backed /dev/shm (data-loader workers)
    node_selector: dict[str, str] = field(default_factory=dict)  # e.g. {cloud.google.com/gke-accelerator: nvidia-h100-80gb}
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    priority_class: str = ""  # priorityClassName of the pods ("" = the cluster default)
    service_account: str = ""  # service account of the pods (needs access to data_root)
    run_as_user: int = 1000  # non-root UID (the images' user)
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables

    def validate(self, where: str) -> None:
        """Check every field as the API server would, naming it under ``where``."""
        _check_image(f"{where}.image", self.image, self.gpus)
        if self.gpus < 0:
            raise ConfigError(f"{where}.gpus: got {self.gpus}, expected >= 0")
        for name in ("cpu", "memory", "shm_size"):
            _check_quantity(f"{where}.{name}", getattr(self, name))
        if self.run_as_user < 1:
            raise ConfigError(f"{where}.run_as_user: got {self.run_as_user}, expected a "
                              "non-root UID (>= 1)")
        rules.check_int32(f"{where}.gpus", self.gpus)
        rules.check_tolerations(f"{where}.tolerations", self.tolerations)
        rules.check_labels(f"{where}.node_selector", self.node_selector)
        rules.check_env_names(f"{where}.env", self.env)
        if self.priority_class and not _DNS_1123.match(self.priority_class):
            raise ConfigError(f"{where}.priority_class: got {self.priority_class!r}, "
                              "expected a DNS-1123 name")
        if self.service_account:
            rules.check_subdomain(f"{where}.service_account", self.service_account)


@dataclass
class ClusterConfig:
    """A distributed training job: PyTorchJob (Training Operator v1) or TrainJob (Trainer v2)."""

    backend: Backend = "pytorchjob"  # pytorchjob (kubeflow.org/v1) or trainjob (trainer v2)
    name: str = "stablerep-train"  # job name (DNS-1035 label)
    namespace: str = ""  # "" = the service account's (in a pod) or the kubeconfig context's
    nodes: int = 1  # pods (one per node); 1 = a master-only PyTorchJob
    recipe: str = ""  # --config of the training command (a built-in recipe name or a URI)
    data_root: str = ""  # --data-root of the training command ("" = the recipe's)
    overrides: list[str] = field(default_factory=list)  # --set key.path=value for the recipe
    pod: PodConfig = field(default_factory=PodConfig)
    runtime: str = RUNTIME_NAME  # trainjob: the ClusterTrainingRuntime to run on
    clean_pod_policy: CleanPodPolicy = "Running"  # pytorchjob: pods removed when it ends
    backoff_limit: int = 3  # pod restarts before the job fails (each resumes from latest.json)
    active_deadline_s: int | None = None  # job wall-clock limit (None = none)
    ttl_after_finished_s: int = 259_200  # finished jobs are garbage-collected after this (3 days)
    elastic_min_nodes: int | None = None  # pytorchjob: set both for an elastic job
    elastic_max_nodes: int | None = None
    elastic_max_restarts: int = 3  # elastic: restarts of the worker group
    labels: dict[str, str] = field(default_factory=dict)  # extra labels on the job and pods
    queue_name: str = ""  # Kueue LocalQueue (label kueue.x-k8s.io/queue-name); "" = none

    def __post_init__(self) -> None:
        check_dns_1035("cluster.name", self.name)
        if self.queue_name and (len(self.queue_name) > 63
                                or not _DNS_1123.match(str(self.queue_name))):
            raise ConfigError(f"cluster.queue_name: got {self.queue_name!r}, expected the name "
                              "of a Kueue LocalQueue (a DNS-1123 label: at most 63 lower-case "
                              "letters, digits and '-')")
        if self.namespace and (len(self.namespace) > 63 or not _DNS_1123.match(self.namespace)):
            raise ConfigError(f"cluster.namespace: got {self.namespace!r}, expected a DNS-1123 "
                              "label")
        if self.nodes < 1:
            raise ConfigError(f"cluster.nodes: got {self.nodes}, expected >= 1")
        self.pod.validate("cluster.pod")
        if self.backend == "trainjob" and not _DNS_1123.match(self.runtime):
            raise ConfigError(f"cluster.runtime: got {self.runtime!r}, expected the name of a "
                              f"ClusterTrainingRuntime such as {RUNTIME_NAME}")
        for name in ("backoff_limit", "ttl_after_finished_s", "elastic_max_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster.{name}: got {getattr(self, name)}, expected >= 0")
        if self.active_deadline_s is not None and self.active_deadline_s < 1:
            raise ConfigError(f"cluster.active_deadline_s: got {self.active_deadline_s}, "
                              "expected >= 1 or null")
        self._check_elastic()
        for name in ("nodes", "backoff_limit", "ttl_after_finished_s", "elastic_max_restarts"):
            rules.check_int32(f"cluster.{name}", getattr(self, name))
        rules.check_labels("cluster.labels", self.labels)

    def _check_elastic(self) -> None:
        lo, hi = self.elastic_min_nodes, self.elastic_max_nodes
        if lo is None and hi is None:
            return
        if self.backend != "pytorchjob":
            raise ConfigError("cluster.elastic_min_nodes: elastic training needs backend "
                              "pytorchjob")
        if lo is None or hi is None or not 1 <= lo <= self.nodes <= hi:
            raise ConfigError(f"cluster.elastic_min_nodes/elastic_max_nodes: got {lo}/{hi}, "
                              f"expected 1 <= min <= nodes ({self.nodes}) <= max")
        if hi < 2:
            raise ConfigError("cluster.elastic_max_nodes: an elastic job needs a Worker role, "
                              "so at least 2 nodes")

    @property
    def world_size(self) -> int:
        """Training processes: nodes x GPUs per node (one process on a CPU-only pod)."""
        return self.nodes * max(self.pod.gpus, 1)


@dataclass
class GenerationJobConfig:
    """An Indexed Job drawing one captions shard per completion index."""

    name: str = "stablerep-generate"  # job name (DNS-1035 label)
    namespace: str = ""  # as ClusterConfig.namespace
    shards: int = 1  # completions: one per captions shard
    parallelism: int = 8  # pods at a time (GPUs in use)
    backoff_limit_per_index: int = 3  # retries of one shard (preemptions do not count)
    recipe: str = ""  # --config of the generate command
    data_root: str = ""  # --data-root of the generate command
    overrides: list[str] = field(default_factory=list)  # --set key.path=value
    pod: PodConfig = field(default_factory=lambda: PodConfig(gpus=1, cpu="8", memory="48Gi",
                                                             shm_size="8Gi"))
    ttl_after_finished_s: int = 259_200  # finished jobs are garbage-collected after this
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_dns_1035("generation.name", self.name)
        if self.shards < 1:
            raise ConfigError(f"generation.shards: got {self.shards}, expected >= 1")
        if self.parallelism < 1:
            raise ConfigError(f"generation.parallelism: got {self.parallelism}, expected >= 1")
        if self.backoff_limit_per_index < 0:
            raise ConfigError(f"generation.backoff_limit_per_index: got "
                              f"{self.backoff_limit_per_index}, expected >= 0")
        self.pod.validate("generation.pod")
        if self.namespace:
            rules.check_dns_label("generation.namespace", self.namespace)
        for name in ("shards", "parallelism", "backoff_limit_per_index", "ttl_after_finished_s"):
            rules.check_int32(f"generation.{name}", getattr(self, name))
        if self.ttl_after_finished_s < 0:
            raise ConfigError(f"generation.ttl_after_finished_s: got "
                              f"{self.ttl_after_finished_s}, expected >= 0")
        rules.check_labels("generation.labels", self.labels)


def _check_seconds(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"launch.{name}: got {value!r}, expected a number of seconds > 0"
                          + (" or None" if optional else ""))


@dataclass
class LaunchSettings:
    """How the training launcher follows its job: the cluster recipe's ``launch:`` section.

    Every limit but ``timeout_s`` and ``queue_timeout_s`` is required; those two are off by
    default (a job may queue and run as long as it needs).
    """

    schedule_timeout_s: float = 900.0  # how long pods may stay stuck after admission
    timeout_s: float | None = None  # run limit from admission (None = none)
    queue_timeout_s: float | None = None  # how long a queue may hold the job (None = forever)
    watch_timeout_s: int = 30  # one watch request's length (the loop re-watches)
    log_tail_lines: int = 30  # master log lines quoted when the job fails
    stream_logs: bool = True  # copy the master pod's log to this process's stdout
    api_unreachable_s: float = 600.0  # API failing this long: fail the step, keep the job
    request_timeout_s: float = 60.0  # one API request's connect/read limit
    backoff_s: float = 1.0  # first wait after an API failure (doubles, capped)
    backoff_max_s: float = 30.0  # longest wait between retries
    report_every_s: float = 60.0  # how often a queued job is reported
    workflow_poll_s: float = 30.0  # how often the pipeline run is checked for a cancel

    def __post_init__(self) -> None:
        for name in ("schedule_timeout_s", "api_unreachable_s", "request_timeout_s",
                     "backoff_s", "backoff_max_s", "report_every_s", "workflow_poll_s"):
            _check_seconds(name, getattr(self, name))
        for name in ("timeout_s", "queue_timeout_s"):
            _check_seconds(name, getattr(self, name), optional=True)
        for name in ("watch_timeout_s", "log_tail_lines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"launch.{name}: got {value!r}, expected an integer >= 1")
