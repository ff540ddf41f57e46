"""What the pipeline's validate step checks, and the configs the later steps run.

- :func:`build_config` turns ``recipe`` + parameters + ``overrides`` into one validated
  :class:`~stablerep.config.Config` (recipe < parameters < overrides); the parameters are
  merged in as typed values. The validate step hands the later steps that one resolved
  config (:func:`resolved`, JSON), which each loads and checks again (:func:`stage_config`).
- :func:`check_run` checks every stage's resolved config and, for a cluster backend, every
  check the launcher makes before it sends a job (:func:`check_job`: world size against the
  batch, the rendered PyTorchJob/TrainJob against the webhook rules, image against GPUs,
  Kubernetes names), so a bad value fails in seconds naming the parameter.
- :func:`cluster_config` builds that job: the cluster recipe (``cluster_recipe``) under the
  pipeline's parameters.
- :func:`check_data_root` is the ``data_root`` rule of every surface.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from stablerep.config import Config, from_dict, load_config, to_dict
from stablerep.errors import ConfigError, StablerepError
from stablerep.kfp.params import BY_FIELD, PARAMS, SECTIONS, check_params


def param_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields the parameters set: dotted field -> the parameter's typed value."""
    out = {}
    for p in PARAMS:
        if p.field and p.name in values:
            value = values[p.name]
            out[p.field] = None if p.zero_is_none and value == 0 else value
    return out


def _name_parameter(e: ConfigError) -> ConfigError:
    """Prefix a config error with the parameter that sets the field it names."""
    text = str(e)
    field = text.split(":", 1)[0].strip()
    p = BY_FIELD.get(field)
    return ConfigError(f"parameter {p.name} ({text})") if p else e


def build_config(recipe: str, overrides: Sequence[str] = (),
                 params: Mapping[str, Any] | None = None) -> Config:
    """The validated config of a run: recipe < parameters < overrides.

    The parameters are merged into the recipe as typed values (:func:`param_values`); only
    the user's ``overrides`` are text.

    Args:
        recipe: a built-in recipe name or a recipe URI.
        overrides: ``section.key=value`` strings (the ``overrides`` parameter).
        params: pipeline parameters that set config fields (others are ignored here).
    """
    try:
        return load_config(recipe, list(overrides), require=SECTIONS,
                           values=param_values(dict(params or {})))
    except ConfigError as e:
        raise _name_parameter(e) from None


def resolved(cfg: Config) -> str:
    """The resolved config as JSON text: what the validate step hands every later step."""
    return json.dumps(to_dict(cfg), sort_keys=True)


def stage_config(config: str) -> Config:
    """A step's config: the validate step's resolved config (JSON), checked again on load."""
    return from_dict(Config, json.loads(config))


def config_sets(cfg: Config) -> list[str]:
    """The resolved config as ``--set`` values for a command line: one ``field=<JSON>`` each.

    Every top-level field is set whole, so the recipe a command also reads adds nothing.
    """
    return [f"{name}={json.dumps(value, sort_keys=True)}" for name, value in to_dict(cfg).items()]


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def check_backend(backend: str, *, local: bool) -> None:
    """A run outside a cluster (kfp.local) can only train with the local backend."""
    if local and backend != "local":
        raise ConfigError(f"parameter train_backend: got {backend!r}; local runs (kfp.local) "
                          "need train_backend=local (the cluster backends start a "
                          "PyTorchJob/TrainJob)")


#: Cluster config fields the pipeline's own parameters set (errors name the parameter).
_JOB_FIELDS = {"cluster.pod.gpus": "gpus_per_node", "cluster.pod.image": "image",
               "cluster.pod.node_selector": "node_selector",
               "cluster.pod.tolerations": "tolerations",
               "cluster.pod.service_account": "service_account",
               "cluster.pod.priority_class": "priority_class", "cluster.queue_name": "queue_name",
               "cluster.nodes": "nodes", "cluster.backend": "train_backend"}


def _job_error(e: ConfigError, uri: str) -> ConfigError:
    """A cluster config error as one line naming the parameter (or the cluster recipe)."""
    text = " ".join(str(e).split())
    field, _, rest = text.partition(":")
    if field in _JOB_FIELDS:
        return ConfigError(f"parameter {_JOB_FIELDS[field]}:{rest}")
    if uri:
        return ConfigError(f"parameter cluster_recipe ({uri}): {text}")
    return ConfigError(f"parameter {text.replace('cluster.pod.', '').replace('cluster.', '')}")


def cluster_recipe(uri: str) -> Any:
    """The cluster recipe at ``uri`` (:class:`stablerep.k8s.render.K8sRecipe`; defaults for "")."""
    from stablerep.k8s.render import K8sRecipe, load_recipe

    if not uri:
        return K8sRecipe()
    try:
        return load_recipe(uri)
    except StablerepError as e:
        text = " ".join(str(e).split())
        raise ConfigError(f"parameter cluster_recipe: {text if uri in text else f'{uri}: {text}'}"
                          ) from None


def cluster_config(values: Mapping[str, Any], recipe: Any = None, cfg: Config | None = None
                   ) -> Any:
    """The training job of a cluster backend (:class:`stablerep.k8s.config.ClusterConfig`).

    The cluster recipe (``cluster_recipe``) supplies the job's settings; the pipeline's
    parameters win over it: backend, nodes, GPUs, image, node selector and tolerations
    always, service account, queue and priority class when not empty. The job runs the
    pipeline's resolved config (:func:`config_sets`).

    Args:
        values: the checked parameters (:data:`JOB_PARAMS`, recipe; data_root and overrides
            when ``cfg`` is not given).
        recipe: the cluster recipe, when the caller has read it already.
        cfg: the resolved stage config (default: built from ``values``).
    """
    uri = values.get("cluster_recipe", "")
    base = (recipe if recipe is not None else cluster_recipe(uri)).cluster
    if cfg is None:
        cfg = build_config(values["recipe"], values["overrides"], values)
    pod = {"image": values["image"], "gpus": values["gpus_per_node"],
           "node_selector": dict(values["node_selector"]),
           "tolerations": list(values["tolerations"])}
    pod.update({k: values[k] for k in ("service_account", "priority_class") if values.get(k)})
    job = {"backend": values["train_backend"], "nodes": values["nodes"],
           "recipe": values["recipe"], "data_root": cfg.data_root,
           "overrides": config_sets(cfg)}
    if values.get("queue_name"):
        job["queue_name"] = values["queue_name"]
    try:
        return dataclasses.replace(base, pod=dataclasses.replace(base.pod, **pod), **job)
    except ConfigError as e:
        raise _job_error(e, uri) from None


def _image_tag(image: str) -> str:
    return image.rsplit("/", 1)[-1].partition(":")[2].partition("@")[0]


def check_job(cluster: Any, uri: str = "") -> None:
    """Every check the launcher makes before it sends a job, naming the parameter.

    The image matches the GPUs (a CUDA image on GPU-less pods is refused here, the reverse
    by the cluster config), the recipe's batch splits over nodes x GPUs, and the rendered
    PyTorchJob / TrainJob passes the operator's webhook rules.

    Args:
        cluster: the job (:func:`cluster_config`).
        uri: the cluster recipe it came from ("" = none), for messages.
    """
    from stablerep.k8s.config import CPU_IMAGE
    from stablerep.k8s.manifests import training_job
    from stablerep.k8s.render import check_world_size
    from stablerep.k8s.validate import check_manifest

    tag = _image_tag(cluster.pod.image)
    if cluster.pod.gpus == 0 and (tag == "cuda" or tag.endswith("-cuda")):
        raise ConfigError(f"parameter image: {cluster.pod.image!r} is the CUDA image but "
                          f"gpus_per_node is 0; use the CPU image (e.g. {CPU_IMAGE}) or "
                          "request GPUs")
    try:
        check_world_size(cluster)
    except ConfigError as e:
        raise ConfigError(f"parameters nodes, gpus_per_node: {e}") from None
    try:
        check_manifest(training_job(cluster))
    except ConfigError as e:
        if str(e).startswith("cluster."):
            raise _job_error(e, uri) from None
        where = f"cluster_recipe ({uri})" if uri else "train_backend"
        raise ConfigError(f"parameter {where}: the {cluster.backend} job is refused: {e}"
                          ) from None


def check_run(params: Mapping[str, Any], *, local: bool | None = None,
             data: bool = True) -> Config:
    """Everything the first pipeline step checks; returns the resolved config.

    Args:
        params: every pipeline parameter (missing ones take their defaults).
        local: whether the run is outside a cluster (default: no Kubernetes service in the
            environment).
        data: check that the evaluation data sets are in ``eval.data_cache`` (the pipeline's
            own step, whose pod sees the cache; not ``submit`` on a workstation).
    """
    values = check_params(params)
    cfg = build_config(values["recipe"], values["overrides"], values)
    if cfg.train.images_read_per_caption > cfg.generate.images_per_caption:
        raise ConfigError(f"parameter images_per_caption: got "
                          f"{cfg.generate.images_per_caption}, but train.images_per_caption "
                          f"reads {cfg.train.images_read_per_caption} per caption")
    if values["workers"] > cfg.captions.num_shards:
        raise ConfigError(f"parameter workers: got {values['workers']}, expected at most the "
                          f"{cfg.captions.num_shards} caption shards (parameter shards)")
    _check_model(cfg)
    check_backend(values["train_backend"], local=not _in_cluster() if local is None else local)
    recipe = cluster_recipe(values["cluster_recipe"])  # read and checked even when unused
    if values["train_backend"] != "local":
        check_job(cluster_config(values, recipe, cfg), values["cluster_recipe"])
    if data and cfg.eval is not None:  # the evaluation data sets are there (or downloadable)
        from stablerep.stages import check_eval_data

        check_eval_data(cfg)
    return cfg


def _check_model(cfg: Config) -> None:
    """A model given as a folder or URI must hold a diffusers pipeline (model_index.json)."""
    from stablerep.stages import check_model_source

    try:
        check_model_source(cfg)
    except ConfigError as e:
        raise _name_parameter(e) from None


def check_data_root(uri: Any, *, local: bool) -> None:
    """``data_root``: gs://bucket[/prefix], s3://bucket[/prefix], file:// or a local folder.

    Args:
        uri: the value.
        local: the run is on this machine (kfp.local): a local folder must not run through a
            file and must be writable (or creatable).
    """
    from stablerep import storage

    where = "parameter data_root"
    expected = "expected gs://bucket/prefix, s3://bucket/prefix, file:///path or a local folder"
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{where}: got {uri!r}, {expected}")
    proto = storage.protocol(uri)
    if proto not in ("gs", "s3", "file"):
        raise ConfigError(f"{where}: got {uri!r} (scheme {proto}://), {expected}")
    if proto != "file":
        if not uri.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(f"{where}: got {uri!r}, which names no bucket; {expected}")
        return
    path = storage.local_path(uri)
    raw = uri.split("://", 1)[1] if "://" in uri else uri
    if not raw.strip() or str(path) == "/":
        raise ConfigError(f"{where}: got {uri!r}, expected a folder of its own (every stage "
                          "writes its outputs directly under it)")
    if local:
        storage.check_output_folder(uri, field=where)
        existing = next(p for p in [path, *path.parents] if p.exists() or p == p.parent)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: {uri}: {existing} is not writable")

