"""Manifests as plain dicts: PyTorchJob, TrainJob, the Indexed generation Job, launcher RBAC.

Every function takes a validated config (:mod:`stablerep.k8s.config`) and returns what
``kubectl apply`` or the Kubernetes client accepts. Training pods run ``python -m
stablerep.train_launch -m stablerep.train``: torchrun's launcher, reading the ``PET_*``
variables the Training Operator (and Trainer v2's torch plugin) inject — node count, processes
per node, node rank, master address and port — so the same command serves one node or many,
but exiting with its children's status rather than torchrun's constant 1. The jobs' failure
policies read that status (:mod:`stablerep.errors`): 1-127 (a bug, bad input) fails the job at
once, 128 and up (a lost peer, a preempted or killed pod) restarts it, and the restarted run
resumes from ``latest.json``. Pods run as a non-root user with a
memory-backed ``/dev/shm`` for data-loader workers and no Istio sidecar (it would keep a
finished pod alive and break the rendezvous). Their root filesystem is read-only: what a stage
writes locally (staging, caches under ``HOME``, torchrun's error files) goes to an ``emptyDir``
at ``/tmp``. The checkov checks they fail on purpose carry a ``checkov.io/skipN`` annotation
with the reason (:func:`checkov_skips`).
"""

from __future__ import annotations

from typing import Any

from stablerep.errors import FIRST_RETRYABLE, ConfigError
from stablerep.k8s.config import (
    QUEUE_LABEL,
    RUNTIME_NAME,
    ClusterConfig,
    GenerationJobConfig,
    PodConfig,
)

PYTORCHJOB_API = "kubeflow.org/v1"
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
#: The container name each kind requires (PyTorchJob's webhook; the torch runtime's trainer).
PYTORCH_CONTAINER = "pytorch"
TRAINJOB_CONTAINER = "node"
GENERATE_CONTAINER = "generate"
#: Variables the Trainer v2 torch plugin sets; a TrainJob must not set them itself.
TORCH_PLUGIN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                    "PET_MASTER_PORT")
LAUNCHER = "stablerep-launcher"  # the launcher's ServiceAccount, Role and RoleBinding
_NO_SIDECAR = {"sidecar.istio.io/inject": "false"}
_SHM = "dshm"
#: The pods' writable scratch (an emptyDir) and the HOME inside it (Hugging Face, torch and
#: triton caches), so the root filesystem can be read-only with any image.
_SCRATCH = "tmp"
SCRATCH_PATH = "/tmp"
SCRATCH_HOME = "/tmp/home"
#: The lowest runAsUser checkov's CKV_K8S_40 accepts (the images' user is UID 1000).
_HIGH_UID = 10_000


#: Environment variables carrying the run's recipe and data root; the stage command reads
#: them through Kubernetes' $(VAR) expansion, so a kustomize overlay sets them by name.
RECIPE_ENV = "STABLEREP_RECIPE"
DATA_ROOT_ENV = "STABLEREP_DATA_ROOT"


def stage_args(recipe: str, data_root: str, overrides: list[str]) -> list[str]:
    """The stage command's own flags: --config, --data-root (as $(VAR)), --set, in order."""
    args = ["--config", f"$({RECIPE_ENV})"] if recipe else []
    if data_root:
        args += ["--data-root", f"$({DATA_ROOT_ENV})"]
    for text in overrides:
        args += ["--set", text]
    return args


def _env(recipe: str, data_root: str, pod: PodConfig) -> list[dict[str, str]]:
    """The run variables the args refer to, then the pod's own (sorted)."""
    taken = sorted({RECIPE_ENV, DATA_ROOT_ENV} & set(pod.env))
    if taken:
        raise ConfigError(f"pod.env: {', '.join(taken)} are set from recipe / data_root; "
                          "set those fields instead")
    run = [(RECIPE_ENV, recipe), (DATA_ROOT_ENV, data_root)]
    own = {"HOME": SCRATCH_HOME, **pod.env}  # pod.env may set its own HOME
    return ([{"name": k, "value": v} for k, v in run if v]
            + [{"name": k, "value": v} for k, v in sorted(own.items())])


def checkov_skips(namespace: str, pod: PodConfig | None = None) -> dict[str, str]:
    """``checkov.io/skipN`` annotations: each check an object fails on purpose, with why.

    Only checks the config really fails are listed, so a config that meets one (a namespace,
    a digest, ``Always``, a high UID) drops its skip.

    Args:
        namespace: the object's namespace ("" in the kustomize bases).
        pod: the pod settings of a workload; None for objects without pods (RBAC).
    """
    skips = []
    if not namespace:
        skips.append("CKV_K8S_21=a base has no namespace: the overlay (kustomize namespace) "
                     "or kubectl -n sets it")
    if pod is not None:
        if "@sha256:" not in pod.image:
            skips.append("CKV_K8S_43=the image is the release tag make images writes; an "
                         "overlay pins its digest after the push (kustomize images digest)")
        if pod.image_pull_policy != "Always":
            skips.append("CKV_K8S_15=release tags are never rebuilt, so IfNotPresent spares "
                         "each pod a registry round trip (pod.image_pull_policy sets Always)")
        if pod.run_as_user < _HIGH_UID:
            skips.append(f"CKV_K8S_40=UID {pod.run_as_user} is the user the stablerep images "
                         "are built with (pod.run_as_user)")
    return {f"checkov.io/skip{i}": text for i, text in enumerate(skips, 1)}


def _metadata(name: str, namespace: str, labels: dict[str, str], app: str,
              pod: PodConfig | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name,
                            "labels": {"app.kubernetes.io/name": "stablerep",
                                       "app.kubernetes.io/component": app, **labels}}
    if namespace:
        meta["namespace"] = namespace
    skips = checkov_skips(namespace, pod)
    if skips:
        meta["annotations"] = skips
    return meta


def _resources(pod: PodConfig) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": pod.cpu, "memory": pod.memory}
    if pod.gpus:
        amounts["nvidia.com/gpu"] = pod.gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security(pod: PodConfig) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": pod.run_as_user, "runAsGroup": pod.run_as_user,
            "fsGroup": pod.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}}


def _volumes(pod: PodConfig) -> list[dict[str, Any]]:
    """A memory-backed /dev/shm (data-loader workers, NCCL) and the node-disk scratch."""
    return [{"name": _SHM, "emptyDir": {"medium": "Memory", "sizeLimit": pod.shm_size}},
            {"name": _SCRATCH, "emptyDir": {}}]


def _mounts() -> list[dict[str, Any]]:
    return [{"name": _SHM, "mountPath": "/dev/shm"},
            {"name": _SCRATCH, "mountPath": SCRATCH_PATH}]


def _container(name: str, pod: PodConfig, command: list[str], args: list[str],
               env: list[dict[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "image": pod.image,
                           "imagePullPolicy": pod.image_pull_policy, "command": list(command),
                           "args": list(args), "resources": _resources(pod),
                           "volumeMounts": _mounts(),
                           "securityContext": _container_security()}
    if env:
        out["env"] = [dict(e) for e in env]
    return out


def _pod_spec(pod: PodConfig, container: dict[str, Any], restart_policy: str
              ) -> dict[str, Any]:
    # no API token: the stages never call the Kubernetes API (storage credentials come from
    # Workload Identity / IRSA, which do not need it)
    spec: dict[str, Any] = {"restartPolicy": restart_policy, "containers": [container],
                            "volumes": _volumes(pod), "automountServiceAccountToken": False,
                            "securityContext": _pod_security(pod), **_scheduling(pod)}
    if pod.priority_class:
        spec["priorityClassName"] = pod.priority_class
    return spec


def _scheduling(pod: PodConfig) -> dict[str, Any]:
    """Node selector, tolerations and service account: the pod-spec fields set when given."""
    fields: dict[str, Any] = {}
    if pod.node_selector:
        fields["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        fields["tolerations"] = [dict(t) for t in pod.tolerations]
    if pod.service_account:
        fields["serviceAccountName"] = pod.service_account
    return fields


def _template(cfg: ClusterConfig | GenerationJobConfig, container: dict[str, Any],
              restart_policy: str, app: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "stablerep", "app.kubernetes.io/component": app,
              **cfg.labels}
    return {"metadata": {"labels": labels, "annotations": dict(_NO_SIDECAR)},
            "spec": _pod_spec(cfg.pod, container, restart_policy)}


#: The training pods' entry point: torchrun that exits with its children's status.
TRAIN_COMMAND = ["python", "-m", "stablerep.train_launch"]
#: The exit statuses a restart cannot fix (a bug, bad input, a command that cannot run).
PERMANENT_EXIT_CODES = list(range(1, FIRST_RETRYABLE))


def _job_labels(cfg: ClusterConfig) -> dict[str, str]:
    """The training job's own labels: the config's, and Kueue's queue label when queued."""
    return {**cfg.labels, QUEUE_LABEL: cfg.queue_name} if cfg.queue_name else dict(cfg.labels)


def _train_command(cfg: ClusterConfig) -> tuple[list[str], list[str]]:
    return list(TRAIN_COMMAND), ["-m", "stablerep.train",
                                 *stage_args(cfg.recipe, cfg.data_root, cfg.overrides)]


def pytorchjob(cfg: ClusterConfig) -> dict[str, Any]:
    """A ``kubeflow.org/v1`` PyTorchJob: Master x1 (+ Worker x nodes-1), or elastic Workers.

    Replicas restart by exit status (``restartPolicy: ExitCode``): the operator recreates a pod
    that exited with 128 or more (up to ``runPolicy.backoffLimit`` times) and fails the job on
    any other non-zero status. An elastic job must keep its size (min = max nodes): a run
    resumes only at the world size that wrote its checkpoint.

    Args:
        cfg: the cluster config (backend is not consulted: this always builds a PyTorchJob).
    """
    command, args = _train_command(cfg)

    def replicas(n: int) -> dict[str, Any]:  # a fresh copy each: no YAML aliases
        container = _container(PYTORCH_CONTAINER, cfg.pod, command, args,
                               _env(cfg.recipe, cfg.data_root, cfg.pod))
        # ExitCode: the operator reads the status and recreates the pod (so the pod's own
        # policy is Never); 1-127 fail the job, 128-255 restart it
        return {"replicas": n, "restartPolicy": "ExitCode",
                "template": _template(cfg, container, "Never", "train")}

    run_policy: dict[str, Any] = {"cleanPodPolicy": cfg.clean_pod_policy,
                                  "backoffLimit": cfg.backoff_limit,
                                  "ttlSecondsAfterFinished": cfg.ttl_after_finished_s}
    if cfg.active_deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = cfg.active_deadline_s
    spec: dict[str, Any] = {"nprocPerNode": str(max(cfg.pod.gpus, 1)), "runPolicy": run_policy}
    if cfg.elastic_min_nodes is not None:
        if cfg.elastic_min_nodes != cfg.elastic_max_nodes:
            raise ConfigError(
                f"cluster.elastic_min_nodes/elastic_max_nodes: got {cfg.elastic_min_nodes}/"
                f"{cfg.elastic_max_nodes}, expected equal values: a run resumes only at the world "
                "size that wrote its checkpoint; use a fixed node count (its restarts resume "
                "from latest.json)")
        # elastic: every pod is a Worker and torchrun's c10d rendezvous admits min..max of them
        spec["elasticPolicy"] = {"rdzvBackend": "c10d", "minReplicas": cfg.elastic_min_nodes,
                                 "maxReplicas": cfg.elastic_max_nodes,
                                 "maxRestarts": cfg.elastic_max_restarts}
        spec["pytorchReplicaSpecs"] = {"Worker": replicas(cfg.nodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replicas(1)}
        if cfg.nodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = replicas(cfg.nodes - 1)
    return {"apiVersion": PYTORCHJOB_API, "kind": "PyTorchJob",
            "metadata": _metadata(cfg.name, cfg.namespace, _job_labels(cfg), "train", cfg.pod),
            "spec": spec}


def trainjob(cfg: ClusterConfig) -> dict[str, Any]:
    """A ``trainer.kubeflow.org/v1alpha1`` TrainJob on a ClusterTrainingRuntime.

    Image, command, node count, processes and resources go in ``spec.trainer``; what the
    trainer section has no field for (node selector, tolerations, ``/dev/shm``, security
    context, the sidecar annotation) goes in a runtime patch of the runtime's ``node`` job.

    Args:
        cfg: the cluster config.
    """
    pod = cfg.pod
    if pod.priority_class:
        raise ConfigError("cluster.pod.priority_class: a TrainJob cannot set it (runtime "
                          "patches do not allow priorityClassName); set it in the "
                          f"ClusterTrainingRuntime {cfg.runtime!r} or use backend pytorchjob")
    clash = sorted(set(pod.env) & set(TORCH_PLUGIN_ENV))
    if clash:
        raise ConfigError(f"cluster.pod.env: {', '.join(clash)} are set by the TrainJob's "
                          "torch plugin; remove them")
    command, args = _train_command(cfg)
    trainer: dict[str, Any] = {"image": pod.image, "command": command, "args": args,
                               "numNodes": cfg.nodes, "numProcPerNode": max(pod.gpus, 1),
                               "resourcesPerNode": _resources(pod)}
    env = _env(cfg.recipe, cfg.data_root, pod)
    if env:
        trainer["env"] = env
    node_spec: dict[str, Any] = {
        "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": _mounts(),
                        "securityContext": _container_security()}],
        "volumes": _volumes(pod), "securityContext": _pod_security(pod), **_scheduling(pod)}
    patch = {"manager": "stablerep", "trainingRuntimeSpec": {"template": {"spec": {
        "replicatedJobs": [{"name": TRAINJOB_CONTAINER, "template": {"spec": {"template": {
            "metadata": {"annotations": dict(_NO_SIDECAR)}, "spec": node_spec}}}}]}}}}
    spec: dict[str, Any] = {"runtimeRef": {"apiGroup": "trainer.kubeflow.org",
                                           "kind": "ClusterTrainingRuntime",
                                           "name": cfg.runtime},
                            "trainer": trainer, "runtimePatches": [patch]}
    if cfg.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = cfg.active_deadline_s
    return {"apiVersion": TRAINJOB_API, "kind": "TrainJob",
            "metadata": _metadata(cfg.name, cfg.namespace, _job_labels(cfg), "train", cfg.pod),
            "spec": spec}


#: The label by which Kubeflow Trainer finds the replicated job its ``trainer`` section fills.
_TRAINER_STEP = {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}


def _restart_rules(container: str, action: str) -> list[dict[str, Any]]:
    """Pod failure rules: a disruption (preemption, eviction) is not counted; a status of
    1-127 (a bug, bad input) ends with ``action`` at once; anything else counts as usual."""
    return [{"action": "Ignore",  # first: a preempted pod may also show a status of 1-127
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": action,
             "onExitCodes": {"containerName": container, "operator": "In",
                             "values": list(PERMANENT_EXIT_CODES)}}]


def training_runtime(cfg: ClusterConfig) -> dict[str, Any]:
    """A Kubeflow Trainer v2 ClusterTrainingRuntime whose JobSet restarts by exit status.

    A TrainJob's ``runtimePatches`` may change only pod templates, so the failure policy lives
    here (``cluster.runtime``, :data:`RUNTIME_NAME` by default, names it): the ``node`` Job fails at
    once (``FailJob``, reason ``PodFailurePolicy``) when a pod exits 1-127, and the JobSet then
    fails too; any other failure of a pod (128 and up: a lost peer, a kill, a stop) fails the
    Job (``backoffLimit: 0``) and the JobSet restarts all of them, up to
    ``cluster.backoff_limit`` times, resuming from ``latest.json``. An evicted or preempted pod
    is replaced without counting.

    Args:
        cfg: the cluster config (``backoff_limit``; ``pod.image`` as the runtime's default).
    """
    pod_spec = {"restartPolicy": "Never",
                "containers": [{"name": TRAINJOB_CONTAINER, "image": cfg.pod.image}]}
    node = {"name": TRAINJOB_CONTAINER, "template": {
        "metadata": {"labels": dict(_TRAINER_STEP)},
        "spec": {"backoffLimit": 0,
                 "podFailurePolicy": {"rules": _restart_rules(TRAINJOB_CONTAINER, "FailJob")},
                 "template": {"spec": pod_spec}}}}
    failure = {"maxRestarts": cfg.backoff_limit,
               "rules": [{"name": "permanent-exit-status", "action": "FailJobSet",
                          "onJobFailureReasons": ["PodFailurePolicy"]}]}
    return {"apiVersion": TRAINJOB_API, "kind": "ClusterTrainingRuntime",
            "metadata": {"name": RUNTIME_NAME,
                         "labels": {"app.kubernetes.io/name": "stablerep",
                                    "app.kubernetes.io/component": "train"}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}},  # the torch plugin: PET_*
                     "template": {"spec": {"failurePolicy": failure,
                                           "replicatedJobs": [node]}}}}


def training_job(cfg: ClusterConfig) -> dict[str, Any]:
    """The job of ``cfg.backend``: a PyTorchJob or a TrainJob."""
    return pytorchjob(cfg) if cfg.backend == "pytorchjob" else trainjob(cfg)


def generation_job(cfg: GenerationJobConfig) -> dict[str, Any]:
    """A ``batch/v1`` Indexed Job: completion index i draws captions shard i.

    A pod evicted or preempted (condition DisruptionTarget) is retried without counting against
    ``backoff_limit_per_index``; a pod that exits 1-127 (a bug or bad input: retrying cannot
    help) fails its index at once; other failures (128 and up: killed, stopped) are retried up
    to that limit. Each pod runs
    ``stablerep generate --shard-from-env``, which reads ``JOB_COMPLETION_INDEX``.
    """
    args = ["generate", *stage_args(cfg.recipe, cfg.data_root, cfg.overrides),
            "--shard-from-env"]
    container = _container(GENERATE_CONTAINER, cfg.pod, ["stablerep"], args,
                           _env(cfg.recipe, cfg.data_root, cfg.pod))
    spec = {"completionMode": "Indexed", "completions": cfg.shards,
            "parallelism": min(cfg.parallelism, cfg.shards),
            "backoffLimitPerIndex": cfg.backoff_limit_per_index,
            "podFailurePolicy": {"rules": _restart_rules(GENERATE_CONTAINER, "FailIndex")},
            "ttlSecondsAfterFinished": cfg.ttl_after_finished_s,
            "template": _template(cfg, container, "Never", "generate")}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _metadata(cfg.name, cfg.namespace, cfg.labels, "generate", cfg.pod),
            "spec": spec}


def generation_network_policy(cfg: GenerationJobConfig) -> dict[str, Any]:
    """A NetworkPolicy admitting no ingress to generation pods (they serve nothing).

    Egress stays open: the pods read captions and the model and write shards over the network.

    Args:
        cfg: the generation job config (name, namespace and labels of the job).
    """
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(f"{cfg.name}-no-ingress", cfg.namespace, cfg.labels,
                                  "generate"),
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "stablerep",
                                                     "app.kubernetes.io/component": "generate"}},
                     "policyTypes": ["Ingress"]}}


def launcher_rbac(namespace: str = "") -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding for the training launcher in one namespace.

    The Role grants exactly what the launcher does (a test records its calls against a live
    fake API server): create, get, list, watch, patch (re-own on attach) and delete training
    jobs of both kinds; get and list pods (its own pod names the pipeline run's Workflow; the
    master's restarts), get their logs and list events, to stream the log and say why a job
    is stuck; get Argo ``workflows``, to tell a cancelled run from an evicted launcher.
    """
    meta = _metadata(LAUNCHER, namespace, {}, "launcher")
    job_verbs = ["create", "get", "list", "watch", "patch", "delete"]
    rules = [
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": job_verbs},
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": job_verbs},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
        {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["get"]},
    ]
    subject = {"kind": "ServiceAccount", "name": LAUNCHER}
    if namespace:
        subject["namespace"] = namespace
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER},
         "subjects": [subject]},
    ]
