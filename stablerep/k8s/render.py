"""``stablerep k8s render``: a cluster recipe -> the ready-to-apply kustomize tree in ``k8s/``.

A cluster recipe is a YAML mapping with a ``cluster`` section (:class:`ClusterConfig`, the
training job) and a ``generation`` section (:class:`GenerationJobConfig`). Rendering writes one
kustomize base per workload and an example overlay::

    <out>/base/training-pytorchjob/   PyTorchJob (Training Operator v1)
    <out>/base/training-trainjob/     TrainJob (Kubeflow Trainer v2, on stablerep-torch)
    <out>/base/training-runtime/      ClusterTrainingRuntime stablerep-torch: restarts by exit
                                      status (cluster-scoped; cluster.runtime selects it)
    <out>/base/generation/            Indexed Job, one completion per captions shard (and a
                                      NetworkPolicy admitting no ingress to its pods)
    <out>/base/rbac/                  the launcher's ServiceAccount, Role, RoleBinding
    <out>/overlays/example/           namespace, image, bucket and size set without editing a base

Before anything is written the training recipe named by the cluster config is loaded and its
batch checked against the job's world size (nodes x GPUs per node).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stablerep.config import from_dict, load_config
from stablerep.errors import ConfigError
from stablerep.k8s.config import (
    IMAGE_REPOSITORY,
    ClusterConfig,
    GenerationJobConfig,
    LaunchSettings,
)
from stablerep.k8s.manifests import (
    DATA_ROOT_ENV,
    generation_job,
    generation_network_policy,
    launcher_rbac,
    pytorchjob,
    training_runtime,
    trainjob,
)
from stablerep.k8s.validate import check_manifest

HEADER = "# Rendered by `stablerep k8s render --config {config}`; edit that config, not this file.\n"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"


@dataclass
class K8sRecipe:
    """A cluster recipe: the training job and the generation job of one run."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    generation: GenerationJobConfig = field(default_factory=GenerationJobConfig)
    launch: LaunchSettings = field(default_factory=LaunchSettings)  # how the launcher follows


def load_recipe(uri: str) -> K8sRecipe:
    """Read and validate a cluster recipe (any storage URI)."""
    from stablerep.config import load_yaml

    return from_dict(K8sRecipe, load_yaml(uri))


def check_world_size(cluster: ClusterConfig) -> None:
    """The training recipe's batch must split evenly over the job's processes.

    Args:
        cluster: names the training recipe and its overrides (a local path or URI; skipped
            when the recipe is empty, i.e. the image's defaults).
    """
    if not cluster.recipe:
        return
    train = load_config(cluster.recipe, cluster.overrides, require=("train",)).train
    assert train is not None
    ranks = cluster.world_size * train.grad_accum_steps
    if train.captions_per_batch % ranks:
        raise ConfigError(
            f"cluster.nodes x cluster.pod.gpus: {cluster.nodes} x {max(cluster.pod.gpus, 1)} = "
            f"{cluster.world_size} processes (x {train.grad_accum_steps} accumulation steps) do "
            f"not divide train.captions_per_batch {train.captions_per_batch} of "
            f"{cluster.recipe}; choose sizes whose product divides it")


def _dump(docs: list[dict[str, Any]], config: str) -> str:
    return HEADER.format(config=config) + "---\n".join(
        yaml.safe_dump(d, sort_keys=False, default_flow_style=False) for d in docs)


def _kustomization(resources: list[str], **extra: Any) -> dict[str, Any]:
    return {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization", **extra,
            "resources": resources}


def _example_overlay(recipe: K8sRecipe) -> dict[str, Any]:
    """Namespace, image, bucket and node count set on top of the PyTorchJob base."""
    roles = ["Master"] + (["Worker"] if recipe.cluster.nodes > 1 else [])
    paths = [f"spec.pytorchReplicaSpecs.{r}.template.spec.containers.[name=pytorch]."
             f"env.[name={DATA_ROOT_ENV}].value" for r in roles]
    overlay = _kustomization(
        ["../../base/rbac", "../../base/training-pytorchjob"],
        namespace="ml-training",
        images=[{"name": IMAGE_REPOSITORY,
                 "newName": "us-docker.pkg.dev/YOUR_PROJECT/stablerep/stablerep"}],
        configMapGenerator=[{"name": "stablerep-run",
                             "literals": [f"{DATA_ROOT_ENV}=gs://YOUR_BUCKET/stablerep/run1"]}],
        generatorOptions={"disableNameSuffixHash": True},
        replacements=[{"source": {"kind": "ConfigMap", "name": "stablerep-run",
                                  "fieldPath": f"data.{DATA_ROOT_ENV}"},
                       "targets": [{"select": {"kind": "PyTorchJob"}, "fieldPaths": paths}]}])
    if recipe.cluster.nodes > 1:
        overlay["patches"] = [{"target": {"kind": "PyTorchJob", "name": recipe.cluster.name},
                               "patch": "- op: replace\n"
                                        "  path: /spec/pytorchReplicaSpecs/Worker/replicas\n"
                                        f"  value: {recipe.cluster.nodes - 1}\n"}]
    return overlay


def render_files(recipe: K8sRecipe, *, config: str) -> dict[str, str]:
    """Relative path -> text of every file ``render`` writes (checked, nothing written).

    Args:
        recipe: the validated cluster recipe.
        config: how the header names the recipe (its path as the user gave it).
    """
    check_world_size(recipe.cluster)
    jobs = {"training-pytorchjob": ("pytorchjob.yaml", [pytorchjob(recipe.cluster)]),
            "training-trainjob": ("trainjob.yaml", [trainjob(recipe.cluster)]),
            "training-runtime": ("clustertrainingruntime.yaml",
                                 [training_runtime(recipe.cluster)]),
            "generation": ("job.yaml", [generation_job(recipe.generation),
                                        generation_network_policy(recipe.generation)]),
            "rbac": ("launcher-rbac.yaml", launcher_rbac())}
    files = {}
    for folder, (name, docs) in jobs.items():
        for doc in docs:
            check_manifest(doc)
        files[f"base/{folder}/{name}"] = _dump(docs, config)
        files[f"base/{folder}/kustomization.yaml"] = _dump([_kustomization([name])], config)
    files["overlays/example/kustomization.yaml"] = _dump([_example_overlay(recipe)], config)
    return files


def render(config: str, out: str) -> list[str]:
    """Render the cluster recipe at ``config`` into the folder ``out``; returns the paths.

    Every file is built and checked, and every destination checked, before the first is
    written; the files are written under temporary names and renamed into place last, so a
    failed render leaves the previous tree as it was and no temporary file behind.
    """
    files = render_files(load_recipe(config), config=config)
    root = Path(out)
    if not out:
        raise ConfigError("--out: got '', expected a folder")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {out}: is a file, expected a folder")
    for rel in sorted(files):
        _check_destination(root, rel, out)
    return [str(p) for p in _publish(root, files)]


def _check_destination(root: Path, rel: str, out: str) -> None:
    """``root/rel`` can be written: no file on its way, not a folder itself."""
    path = root
    for part in Path(rel).parts[:-1]:
        path = path / part
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {out}: {path} is a file, expected a folder (it would "
                              f"hold {rel})")
    if (root / rel).is_dir():
        raise ConfigError(f"--out {out}: {root / rel} is a folder, expected a file")


def _publish(root: Path, files: dict[str, str]) -> list[Path]:
    """Write every file to a temporary name, then rename them all into place."""
    made: list[Path] = []  # folders this call created, outermost first
    staged: list[tuple[Path, Path]] = []
    try:
        for rel, text in sorted(files.items()):
            target = root / rel
            for folder in reversed([target.parent, *target.parent.parents]):
                if not folder.exists():
                    folder.mkdir()
                    made.append(folder)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            staged.append((tmp, target))
            tmp.write_text(text)
        for tmp, target in staged:
            tmp.replace(target)
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise ConfigError(f"--out {root}: cannot write the manifests ({e.strerror or e})") from None
    return [target for _, target in staged]
