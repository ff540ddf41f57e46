"""The Kubeflow pipeline's library side: parameters, validation, compile, submit, local run.

The pipeline (``pipelines/stablerep_pipeline.py``) and its components (``components/``) are
thin: every decision lives here so that the CLI, the components and the tests share it.

- :data:`PARAMS` is the table of pipeline parameters: name, type, default (the paper's CC12M
  recipe), the config field it sets (or the launcher setting it is), and the description the
  Kubeflow UI shows.
- :func:`build_config` turns ``recipe`` + parameters + ``overrides`` into one validated
  :class:`~stablerep.config.Config` (recipe < parameters < overrides); the parameters are
  merged in as typed values. The validate step hands the later steps that one resolved
  config (:func:`resolved`, JSON), which each loads and checks again (:func:`stage_config`).
- :func:`validate` is what the pipeline's first step runs (:func:`validate_step`): every
  stage's resolved config is built and checked, and for a cluster backend every check the
  launcher makes before it sends a job (:func:`check_job`: world size against the batch, the
  rendered PyTorchJob/TrainJob against the webhook rules, image against GPUs, Kubernetes
  names), so a bad value fails in seconds naming the parameter.
- :func:`cluster_config` builds that job: the cluster recipe (``cluster_recipe``) under the
  pipeline's parameters.
- :func:`compile_pipeline`, :func:`submit` (``kfp.Client``) and :func:`run_local`
  (``kfp.local`` with the subprocess runner) are what ``stablerep pipeline ...`` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stablerep.config import (
    CAPTION_SOURCES,
    METHODS,
    SCHEDULERS,
    Config,
    from_dict,
    load_config,
    to_dict,
)
from stablerep.errors import ConfigError, InputError, StablerepError
from stablerep.k8s.config import CUDA_IMAGE
from stablerep.k8s.rules import INT32_MAX

PAPER_EVAL_SETS = ("ImageNet", "CIFAR10", "CIFAR100", "Food101", "OxfordIIITPet", "Flowers102",
                   "StanfordCars", "FGVCAircraft", "DTD", "SUN397", "Caltech101")
"""The paper recipes' ``eval.datasets`` (torchvision names), the ``eval_datasets`` default."""

#: Environment variable that overrides the components' base image at compile time.
IMAGE_ENV = "STABLEREP_IMAGE"
#: Where the pipeline definition and its compiled forms live, relative to the repository.
REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILE = REPO_ROOT / "pipelines" / "stablerep_pipeline.py"
PIPELINE_YAML = REPO_ROOT / "pipelines" / "stablerep_pipeline.yaml"
PIPELINE_K8S = REPO_ROOT / "k8s" / "pipeline" / "stablerep-pipeline.yaml"
PIPELINE_NAME = "stablerep"
#: Shards drawn at the same time by default (KFP fixes a loop's parallelism at compile time).
DEFAULT_PARALLELISM = 64
TRAIN_BACKENDS = ("pytorchjob", "trainjob", "local")
SECTIONS = ("captions", "generate", "train", "eval")


def component_image() -> str:
    """The components' base image: ``$STABLEREP_IMAGE`` when set, else this version's CUDA image."""
    return os.environ.get(IMAGE_ENV) or CUDA_IMAGE


@dataclass(frozen=True)
class Param:
    """One pipeline parameter."""

    name: str
    type: type  # str, int, float, bool, list or dict (the KFP parameter type)
    default: Any  # the CC12M recipe's value
    help: str  # shown in the Kubeflow UI
    field: str = ""  # the dotted config field it sets; "" = a pipeline or launcher setting
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    zero_is_none: bool = False  # 0 sets the config field to null (e.g. "all captions")


PARAMS: tuple[Param, ...] = (
    Param("data_root", str, "gs://YOUR_BUCKET/stablerep/cc12m",
          "Folder URI every stage reads and writes under (gs://, s3:// or a local folder).",
          field="data_root"),
    Param("recipe", str, "cc12m", "Built-in recipe name (demo, cc12m, cc3m, ...) or a recipe "
          "URI; it supplies every setting that is not a parameter."),
    Param("overrides", list, [], "Extra recipe overrides, a list of section.key=value "
          "(as --set on the command line); they win over the parameters."),
    Param("caption_source", str, "files", "Where captions come from: files, synthetic or "
          "procedural.", field="captions.source", choices=CAPTION_SOURCES),
    Param("caption_inputs", list, ["gs://YOUR_BUCKET/raw/cc12m/cc12m.tsv"],
          "Caption files (URIs, globs or folders) for the files source.",
          field="captions.inputs"),
    Param("num_captions", int, 0, "Captions to sample (0 = all captions of the files source).",
          field="captions.num_captions", minimum=0, zero_is_none=True),
    Param("shards", int, 8192, "Caption shards (one tar of images each).",
          field="captions.num_shards", minimum=1),
    Param("workers", int, DEFAULT_PARALLELISM, "Generation tasks, one GPU each (at most "
          "shards): task w draws shards w, w + workers, ... with one model load.", minimum=1),
    Param("images_per_caption", int, 10, "Images generated per caption (the paper: 10).",
          field="generate.images_per_caption", minimum=1),
    Param("guidance_scale", float, 2.0, "Classifier-free guidance scale (the paper: 2.0).",
          field="generate.guidance_scale", minimum=0),
    Param("scheduler", str, "ddim", "Diffusion scheduler: ddim, dpmsolver++ or default.",
          field="generate.scheduler", choices=SCHEDULERS),
    Param("inference_steps", int, 50, "Denoising steps per image (the paper: DDIM 50).",
          field="generate.num_inference_steps", minimum=1),
    Param("model", str, "stable-diffusion-v1-5/stable-diffusion-v1-5",
          "Text-to-image model: hub id, local folder or URI.", field="generate.model"),
    Param("backbone", str, "vit_base_patch16_224", "timm ViT trained (e.g. "
          "vit_small_patch16_224, vit_base_patch16_224).", field="train.model"),
    Param("method", str, "stablerep", "Training objective: stablerep, stablerep_plus, simclr "
          "or clip.", field="train.method", choices=METHODS),
    Param("captions_per_batch", int, 1376, "Captions per step over all GPUs (the paper: 1376).",
          field="train.captions_per_batch", minimum=1),
    Param("epochs", float, 15.0, "Training epochs (the paper: 15 = 1x, 46 = 3x).",
          field="train.epochs", minimum=0),
    Param("eval_datasets", list, [f"torchvision:{n}" for n in PAPER_EVAL_SETS],
          "Evaluation data sets (e.g. torchvision:CIFAR10, sklearn:digits); the default: "
          "the paper's linear-probe sets, read from eval.data_cache.",
          field="eval.datasets"),
    Param("train_backend", str, "pytorchjob", "Where training runs: pytorchjob (Training "
          "Operator), trainjob (Kubeflow Trainer v2) or local (torchrun in the step's pod).",
          choices=TRAIN_BACKENDS),
    Param("nodes", int, 4, "Training nodes (pods) of the cluster backends.", minimum=1),
    Param("gpus_per_node", int, 8, "GPUs per training node (processes per node).", minimum=0),
    Param("node_selector", dict, {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
          "Node selector (JSON object) of the GPU steps and the training job's pods."),
    Param("tolerations", list,
          [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
          "Tolerations (JSON list) of the GPU steps and the training job's pods."),
    Param("image", str, CUDA_IMAGE, "Image of the training job's pods (cluster backends); "
          "default: the image the pipeline was compiled with."),
    Param("cluster_recipe", str, "", "Cluster recipe URI (a YAML with a cluster: section, as "
          "configs/k8s/cc12m_4x8.yaml) for the training job's other settings: CPU, memory, "
          "/dev/shm, backoff, deadline, runtime, labels ... The pipeline's parameters win over "
          "it. \"\" = the built-in job settings."),
    Param("service_account", str, "", "Service account of the training job's pods (needs "
          "access to data_root); \"\" = the cluster recipe's, else the namespace default."),
    Param("queue_name", str, "", "Kueue LocalQueue that admits the training job; \"\" = the "
          "cluster recipe's, else none."),
    Param("priority_class", str, "", "PriorityClass of the training job's pods; \"\" = the "
          "cluster recipe's, else the cluster default."),
)
#: The training job's settings: what :func:`cluster_config` reads (with the stage params).
JOB_PARAMS = ("train_backend", "nodes", "gpus_per_node", "node_selector", "tolerations",
              "image", "cluster_recipe", "service_account", "queue_name", "priority_class")
PARAM_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)
_BY_NAME = {p.name: p for p in PARAMS}
_BY_FIELD = {p.field: p for p in PARAMS if p.field}


def param_table() -> str:
    """:data:`PARAMS` as the Markdown table the README shows (a test holds them equal)."""
    rows = ["| parameter | type | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{p.name}` | {p.type.__name__} | `{json.dumps(p.default)}` | {p.help} |"
             for p in PARAMS]
    return "\n".join(rows) + "\n"


def defaults() -> dict[str, Any]:
    """Every parameter's default value (fresh copies of lists and dicts)."""
    return {p.name: json.loads(json.dumps(p.default, sort_keys=True)) for p in PARAMS}


# ---------------------------------------------------------------------------- checking


def check_names(names: Sequence[str]) -> None:
    """Refuse a parameter name the pipeline does not have, listing the real ones."""
    for name in names:
        if name not in _BY_NAME:
            raise ConfigError(f"parameter {name!r}: the pipeline has no such parameter; its "
                              f"parameters: {', '.join(PARAM_NAMES)}")


def _check_type(p: Param, value: Any) -> None:
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          bool: isinstance(value, bool), str: isinstance(value, str),
          list: isinstance(value, list), dict: isinstance(value, dict)}[p.type]
    if not ok:
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                list: "a JSON list", dict: "a JSON object"}[p.type]
        raise ConfigError(f"parameter {p.name}: got {value!r}, expected {kind}")


def _check_value(p: Param, value: Any) -> None:
    _check_type(p, value)
    if p.choices and value not in p.choices:
        raise ConfigError(f"parameter {p.name}: got {value!r}, expected one of "
                          f"{', '.join(map(str, p.choices))}")
    if p.minimum is not None and value < p.minimum:
        raise ConfigError(f"parameter {p.name}: got {value!r}, expected a value >= "
                          f"{p.minimum:g}")


def _check_scheduling(values: Mapping[str, Any]) -> None:
    for key, val in values["node_selector"].items():
        if not isinstance(val, str):
            raise ConfigError(f"parameter node_selector: {key}: got {val!r}, expected a string "
                              "label value")
    from stablerep.k8s.rules import check_tolerations

    check_tolerations("parameter tolerations", values["tolerations"])
    for i, text in enumerate(values["overrides"]):
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(f"parameter overrides[{i}]: got {text!r}, expected "
                              "section.key=value")


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Names, types, choices and ranges of pipeline parameters; returns all of them, filled.

    Args:
        params: parameter name -> value (missing ones take their defaults).
    """
    check_names(list(params))
    values = {**defaults(), **params}
    for p in PARAMS:
        _check_value(p, values[p.name])
    _check_scheduling(values)
    return values


# ---------------------------------------------------------------------------- config


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
    p = _BY_FIELD.get(field)
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


def validate(params: Mapping[str, Any], *, local: bool | None = None,
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


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A step's bad input ends it with one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except StablerepError as e:
        sys.stdout.flush()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def validate_step(params: Mapping[str, Any]) -> str:
    """The validate component: :func:`validate`; bad input ends it with one line, exit 2.

    Args:
        params: every pipeline parameter.

    Returns:
        The resolved config (:func:`resolved`), the one config every later step runs.
    """
    try:
        return resolved(validate(params))
    except StablerepError as e:
        sys.stdout.flush()
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------- components


def write_dataset(artifact: Any, meta: Mapping[str, Any]) -> None:
    """A small Dataset artifact: ``meta`` as its metadata and as a JSON file at its path."""
    artifact.metadata.update(dict(meta))
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")


def log_metrics(artifact: Any, values: Mapping[str, float]) -> None:
    """Every value onto a KFP Metrics artifact."""
    for name, value in values.items():
        artifact.log_metric(name, value)


def captions_step(config: str, *, workers: int, dataset: Any) -> list[int]:
    """The captions component: run the stage, describe it; returns the worker indices.

    Args:
        config: the resolved config the validate step returned (JSON).
        workers: generation tasks (the ``workers`` parameter, at most the shards written).
        dataset: the KFP Dataset artifact to describe the captions with.

    Returns:
        ``[0, ..., workers - 1]``: the generation loop's items (one task each, whatever the
        number of shards).
    """
    from stablerep.stages import check_workers, run_captions

    cfg = stage_config(config)
    with user_errors():
        check_workers(0, workers, cfg.captions.num_shards)  # before any caption is written
        result = run_captions(cfg)
        check_workers(0, workers, result.num_shards)
    write_dataset(dataset, {"uri": result.uri, "manifest": result.manifest,
                            "count": result.count, "num_shards": result.num_shards,
                            "workers": workers})
    return list(range(workers))


def model_step(config: str) -> str:
    """The stage_model component: copy the text-to-image model once into the run.

    Args:
        config: the resolved config the validate step returned (JSON).

    Returns:
        The run-level folder of the model ("" when the backend has none).
    """
    from stablerep.stages import run_stage_model

    with user_errors():
        return run_stage_model(stage_config(config))


def generate_step(params: Mapping[str, Any], *, worker: int, workers: int,
                  dataset: Any) -> None:
    """The generate component: draw worker ``worker``'s shards (committed ones are skipped).

    The model is loaded once, from the run's copy the stage_model step made.

    Args:
        params: the generation's pipeline parameters (data_root, recipe, overrides and the
            generate.* ones); the recipe with them is the same config the validate step built.
        worker: this task's index (0 .. workers - 1).
        workers: the number of generation tasks.
        dataset: the KFP Dataset artifact to describe the worker's shards with.
    """
    from stablerep.stages import run_generate

    cfg = build_config(params["recipe"], params["overrides"], params)
    with user_errors():
        result = run_generate(cfg, worker=(worker, workers), staged_model=True)
    write_dataset(dataset, {"uri": result.uri, "worker": worker, "workers": workers,
                            "images": result.images, "shards_written": result.shards_written,
                            "shards_skipped": result.shards_skipped,
                            "images_per_s": result.images_per_s,
                            "failed_captions": result.failed_captions})


def manifest_step(config: str, *, dataset: Any) -> None:
    """The images_manifest component: the images manifest, once every worker is done.

    Args:
        config: the resolved config the validate step returned (JSON).
        dataset: the KFP Dataset artifact to describe the images with.
    """
    from stablerep import storage
    from stablerep.stages import run_images_manifest

    with user_errors():
        uri = run_images_manifest(stage_config(config))
    doc = storage.read_json(uri)
    write_dataset(dataset, {"uri": uri.rsplit("/", 1)[0], "manifest": uri,
                            "num_shards": doc["num_shards"], "num_samples": doc["num_samples"],
                            "failed_captions": doc["failed_captions"]})


def train_step(values: Mapping[str, Any], *, run_id: str, task: str, dataset: Any,
               metrics: Any) -> None:
    """The train component: train (see :func:`train`), describe the output, log metrics.

    Args:
        values: the step's parameters (config, recipe, backend and cluster settings).
        run_id: the pipeline run id.
        task: the pipeline task name.
        dataset: the KFP Dataset artifact to describe the training output with.
        metrics: the KFP Metrics artifact (final loss, images/s, steps).
    """
    result = train(values, run_id=run_id, task=task)
    describe_training(result, dataset=dataset, metrics=metrics)


def describe_training(result: Any, *, dataset: Any, metrics: Any) -> None:
    """The train step's artifacts from a :class:`~stablerep.contracts.TrainResult`.

    Args:
        result: the run's result.
        dataset: the KFP Dataset artifact: the output URIs, steps and world size.
        metrics: the KFP Metrics artifact: final loss, images/s (last logged window), steps.
    """
    from stablerep import storage
    from stablerep.contracts import TRAIN_RESULT

    write_dataset(dataset, {"uri": result.out, "checkpoint": result.checkpoint,
                            "latest": result.latest, "backbone": result.backbone,
                            "metrics": result.metrics,
                            "result": storage.join(result.out, TRAIN_RESULT),
                            "steps": result.steps, "world_size": result.world_size})
    log_metrics(metrics, {"final_loss": float(result.final_loss),
                          "images_per_s": float(result.images_per_s),
                          "steps": float(result.steps)})


def eval_step(config: str, *, metrics: Any, report_html: Any, report_md: Any,
              dataset: Any) -> None:
    """The evaluate component: evaluate, then copy the report into the UI's artifacts.

    Args:
        config: the resolved config the validate step returned (JSON).
        metrics: the KFP Metrics artifact (see :func:`eval_metric_values`).
        report_html: the KFP HTML artifact.
        report_md: the KFP Markdown artifact.
        dataset: the KFP Dataset artifact to describe the eval output with.
    """
    from stablerep import storage
    from stablerep.stages import run_eval

    result = run_eval(stage_config(config))
    for artifact, uri in ((report_html, result.report_html), (report_md, result.report_md)):
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        Path(artifact.path).write_text(storage.read_text(uri))
        artifact.metadata["uri"] = uri
    log_metrics(metrics, eval_metric_values(result.metrics))
    write_dataset(dataset, {"uri": result.out, "metrics": result.metrics_uri,
                            "report_html": result.report_html, "report_md": result.report_md})


def eval_metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline numbers of ``eval/metrics.json``, flat (``<data set>/<metric>``).

    Per data set: probe top-1, few-shot mean and 95% CI, kNN top-1; the baseline's under
    ``baseline/``.
    """
    picks = {"probe_top1": ("linear_probe", "top1"), "few_shot_mean": ("few_shot", "mean"),
             "few_shot_ci95": ("few_shot", "ci95"), "knn_top1": ("knn", "top1")}
    out: dict[str, float] = {}
    for prefix, block in (("", metrics), ("baseline/", metrics.get("baseline") or {})):
        for name, ds in (block.get("datasets") or {}).items():
            for key, (part, leaf) in picks.items():
                value = (ds.get(part) or {}).get(leaf)
                if isinstance(value, (int, float)):
                    out[f"{prefix}{name}/{key}"] = float(value)
    return out


def _torchrun(cfg: Config, recipe: str, nproc: int) -> Any:
    """Train with torchrun over ``nproc`` processes of this pod; its ``result.json``.

    The processes get the resolved config whole (:func:`config_sets`) on their command line.
    """
    import subprocess

    from stablerep.contracts import read_train_result
    from stablerep.stages import train_locations

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "-m", "stablerep.cli", "train", "--config", recipe, "--data-root", cfg.data_root]
    for text in config_sets(cfg):
        cmd += ["--set", text]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise StablerepError(f"training (torchrun, {nproc} processes) failed; see its log above")
    return read_train_result(train_locations(cfg)[1])


def train(values: Mapping[str, Any], *, run_id: str = "", task: str = "train") -> Any:
    """The train step: local (in this process, or torchrun over this pod's GPUs) or a job.

    Returns the run's :class:`~stablerep.contracts.TrainResult`: what training returned in
    this process, else the ``result.json`` that rank 0 of torchrun or of the job published.

    Args:
        values: config (the validate step's resolved config, JSON), recipe and the job's
            parameters (:data:`JOB_PARAMS`).
        run_id: the pipeline run id (the cluster job's name derives from it and ``task``).
        task: the pipeline task name.
    """
    cfg = stage_config(values["config"])
    if values["train_backend"] == "local":
        import torch

        nproc = min(values["gpus_per_node"], torch.cuda.device_count())
        if nproc > 1:
            return _torchrun(cfg, values["recipe"], nproc)
        from stablerep.stages import run_training

        return run_training(cfg)
    from stablerep.contracts import read_train_result
    from stablerep.k8s.launcher import LaunchConfig, launch

    recipe = cluster_recipe(values.get("cluster_recipe", ""))
    follow = dataclasses.asdict(recipe.launch)  # how to follow the job: the recipe's launch:
    done = launch(LaunchConfig(cluster=cluster_config(values, recipe, cfg), run_id=run_id,
                               task=task, **follow))
    return read_train_result(done.train_out)


# ---------------------------------------------------------------------------- compile


def load_pipeline(path: str | Path = PIPELINE_FILE, *, image: str = "",
                  parallelism: int = DEFAULT_PARALLELISM) -> Any:
    """Import the pipeline definition afresh (its components pick up ``image``).

    Args:
        path: the pipeline module file.
        image: the components' base image ("" = :func:`component_image`).
        parallelism: generation tasks at a time (fixed at compile time by KFP).
    """
    if not 1 <= parallelism <= INT32_MAX:
        raise ConfigError(f"--parallelism: got {parallelism}, expected 1 to {INT32_MAX}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no pipeline definition there (run from a checkout of "
                         "the repository)")
    root = str(path.resolve().parent.parent)
    with _env(IMAGE_ENV, image), _env("STABLEREP_PARALLELISM", str(parallelism)):
        if root not in sys.path:
            sys.path.insert(0, root)
        for name in [m for m in sys.modules if m == "components" or m.startswith("components.")]:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location("stablerep_pipeline_def", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.stablerep_pipeline


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _version_label() -> str:
    from stablerep import __version__

    return "v" + "".join(c if c.isalnum() else "-" for c in __version__.lower())


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _stable_header(text: str) -> str:
    """The compiler's header comment lists defaults in protobuf map order, which changes from
    one process to the next; list mapping keys sorted instead, so compiles are reproducible."""
    import ast

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        head, sep, rest = line.partition("[Default: ")
        if sep and rest.endswith("]"):
            with contextlib.suppress(ValueError, SyntaxError):
                lines[i] = f"{head}{sep}{_sorted(ast.literal_eval(rest[:-1]))!r}]"
    return "\n".join(lines)


def check_output_file(flag: str, target: str | Path) -> Path:
    """A local YAML file a command will write: named .yaml/.yml, not a folder, not through a
    file, in a folder that can be written; returns it as a Path. Nothing is created."""
    text = str(target)
    path = Path(text)
    if not text.strip() or not path.name.endswith((".yaml", ".yml")):
        raise ConfigError(f"{flag}: got {text!r}, expected a file name ending in .yaml or .yml")
    if path.is_dir():
        raise ConfigError(f"{flag}: {text} is a folder, expected a file")
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag}: {text} runs through {parent}, a regular file, "
                              "expected a folder")
    existing = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: {text}: {existing} is not writable")
    return path


def compile_pipeline(out: str | Path = PIPELINE_YAML, *, kubernetes: str | Path | None = None,
                     image: str = "", parallelism: int = DEFAULT_PARALLELISM) -> list[Path]:
    """Compile the pipeline to its YAML (and, optionally, the Kubernetes-manifest form).

    Every destination and the image are checked first; both files are compiled under
    temporary names and renamed into place last, so a failure publishes neither.

    Args:
        out: the pipeline YAML to write.
        kubernetes: the Pipeline + PipelineVersion manifest file to write (None = skip).
        image: the components' base image ("" = :func:`component_image`).
        parallelism: generation tasks at a time.
    """
    from kfp import compiler

    from stablerep.k8s.rules import check_image

    targets = [(check_output_file("--out", out), False)]
    if kubernetes:
        targets.append((check_output_file("--kubernetes", kubernetes), True))
    if len({t.resolve() for t, _ in targets}) < len(targets):
        raise ConfigError(f"--kubernetes: {kubernetes} is also --out; expected another file")
    check_image("--image" if image else IMAGE_ENV, image or component_image())
    fn = load_pipeline(image=image, parallelism=parallelism)
    staged: list[tuple[Path, Path]] = []
    try:
        for target, k8s in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
            staged.append((tmp, target))
            kwargs = {"kubernetes_manifest_format": True,
                      "kubernetes_manifest_options": compiler.KubernetesManifestOptions(
                          pipeline_name=PIPELINE_NAME, pipeline_display_name=PIPELINE_NAME,
                          pipeline_version_name=f"{PIPELINE_NAME}-{_version_label()}",
                          include_pipeline_manifest=True)} if k8s else {}
            compiler.Compiler().compile(fn, str(tmp), **kwargs)
            tmp.write_text(_stable_header(tmp.read_text()))
        for tmp, target in staged:
            tmp.replace(target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [target for _, target in staged]


# ---------------------------------------------------------------------------- submit


def parse_param(text: str) -> tuple[str, Any]:
    """``name=value`` with the value read as JSON when it parses, else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--param {text!r}: expected name=value")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def recipe_params(recipe: str) -> dict[str, Any]:
    """The parameter values a recipe implies (the fields the parameters set, read from it)."""
    from stablerep.config import to_dict

    data = to_dict(load_config(recipe, require=SECTIONS))
    out: dict[str, Any] = {"recipe": recipe}
    for p in PARAMS:
        if not p.field:
            continue
        node: Any = data
        for part in p.field.split("."):
            node = node[part]
        out[p.name] = 0 if node is None and p.zero_is_none else node
    out["workers"] = min(_BY_NAME["workers"].default, out["shards"])  # <= shards
    return out


def _uploaded_version(client: Any, package: Path, pipeline: str) -> tuple[str, str]:
    """(pipeline id, version id) of ``package`` under ``pipeline``: uploaded when new.

    A version is named after the package's content (``<pipeline>-<sha256[:12]>``), so
    submitting the same compiled file again reuses it.
    """
    import hashlib

    version = f"{pipeline}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"
    pipeline_id = client.get_pipeline_id(pipeline)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline).pipeline_id
    by_name = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS",
                                          "string_value": version}]})
    found = client.list_pipeline_versions(pipeline_id, filter=by_name).pipeline_versions or []
    if found:
        return pipeline_id, found[0].pipeline_version_id
    made = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id)
    return pipeline_id, made.pipeline_version_id


def submit(host: str, experiment: str, params: Mapping[str, Any], *,
           package: str | Path = PIPELINE_YAML, run_name: str = "",
           namespace: str | None = None, pipeline: str = "",
           service_account: str = "") -> tuple[str, str]:
    """Create a run of the compiled pipeline; returns (run id, its UI URL).

    Everything is checked before the endpoint is contacted: the parameters by the rules the
    pipeline's validate step applies (:func:`validate`), the training job's pod settings,
    data_root, the package and the endpoint URL. An endpoint that refuses, times out or
    answers with an error is a :class:`ConfigError` naming it.

    Args:
        host: the KFP API endpoint, e.g. http://localhost:8080.
        experiment: experiment name (created when missing).
        params: runtime parameters (name -> value); unset ones keep the pipeline defaults.
        package: the compiled pipeline YAML.
        run_name: the run's display name (default: stablerep-<timestamp>).
        namespace: the Kubeflow profile namespace (multi-user installs).
        pipeline: upload the package as a version of this pipeline (reused when the same
            package was uploaded before) and run that version; "" = send the spec inline.
        service_account: the Kubernetes service account the run's pods use ("" = the KFP
            server's default); the launcher step creates the training job through it.
    """
    check_submission(host, params, package)
    if namespace is not None:
        from stablerep.k8s.rules import check_dns_label

        check_dns_label("--namespace", namespace)
    if service_account:
        from stablerep.k8s.rules import check_subdomain

        check_subdomain("--service-account", service_account)
    if not experiment.strip():
        raise ConfigError("--experiment: got '', expected an experiment name")
    package = Path(package)
    with _endpoint_errors(host):
        return _create_run(host, experiment, params, package=package, run_name=run_name,
                           namespace=namespace, pipeline=pipeline,
                           service_account=service_account)


def check_submission(host: str, params: Mapping[str, Any], package: str | Path) -> None:
    """Every local check of :func:`submit`, in the order a user would fix them."""
    values = check_params(params)
    validate(values, local=False, data=False)  # the data cache is the pods', checked there
    cluster_config(values)  # the pods' image, node selector and tolerations, every backend
    check_data_root(values["data_root"], local=False)
    package = Path(package)
    if not package.is_file():
        raise InputError(f"--package {package}: no compiled pipeline there; run `make compile`")
    check_endpoint("--host", host)


def check_endpoint(flag: str, url: str) -> None:
    """An http(s) URL with a host (nothing is contacted)."""
    from urllib.parse import urlparse

    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{flag}: got {url!r}, expected an http(s) URL of the Kubeflow "
                          "Pipelines API, e.g. http://localhost:8080")


#: Seconds the connect, and then the answer, of the KFP API's health check may take.
ENDPOINT_TIMEOUT_S = 30.0


@contextlib.contextmanager
def _endpoint_errors(host: str) -> Iterator[None]:
    """An endpoint that cannot be reached or answers with an error: one line naming it."""
    import urllib3

    try:
        from kfp_server_api.exceptions import ApiException
    except ImportError:  # pragma: no cover - kfp brings it
        ApiException = urllib3.exceptions.HTTPError  # noqa: N806
    try:
        _probe(host)  # the kfp client waits forever on a silent endpoint
        yield
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"--host {host}: cannot reach the Kubeflow Pipelines API "
                          f"({_first_line(reason)}); check the URL, that the server runs and "
                          "that a port-forward to it is open") from None
    except ApiException as e:
        raise ConfigError(f"--host {host}: the Kubeflow Pipelines API answered {e.status} "
                          f"{e.reason}; check the URL, --namespace and your access") from None
    except TimeoutError as e:  # kfp's health check gave up after its retries
        raise ConfigError(f"--host {host}: the Kubeflow Pipelines API is not healthy "
                          f"({_first_line(e)}); check the URL and the server") from None


def _probe(host: str) -> None:
    """GET the health endpoint once, with timeouts; any HTTP answer counts as reachable."""
    import urllib3

    timeout = urllib3.Timeout(connect=ENDPOINT_TIMEOUT_S, read=ENDPOINT_TIMEOUT_S)
    urllib3.PoolManager().request("GET", f"{host.rstrip('/')}/apis/v2beta1/healthz",
                                  timeout=timeout, retries=False, redirect=False)


def _first_line(value: Any) -> str:
    text = str(value).strip().splitlines()
    return text[0] if text else type(value).__name__


def _create_run(host: str, experiment: str, params: Mapping[str, Any], *, package: Path,
                run_name: str, namespace: str | None, pipeline: str,
                service_account: str) -> tuple[str, str]:
    import kfp

    client = kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)
    try:
        exp = client.create_experiment(experiment, namespace=namespace)
    except Exception:  # noqa: BLE001 - the experiment exists already (a race)
        exp = client.get_experiment(experiment_name=experiment, namespace=namespace)
    name = run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"
    if pipeline:
        pipeline_id, version_id = _uploaded_version(client, package, pipeline)
        run = client.run_pipeline(exp.experiment_id, name, params=dict(params),
                                  pipeline_id=pipeline_id, version_id=version_id,
                                  service_account=service_account or None)
    else:
        run = client.create_run_from_pipeline_package(
            str(package), arguments=dict(params), run_name=name,
            experiment_id=exp.experiment_id, service_account=service_account or None)
    return run.run_id, f"{host.rstrip('/')}/#/runs/details/{run.run_id}"


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


# ---------------------------------------------------------------------------- local run


def run_local(params: Mapping[str, Any], *, pipeline_root: str = "",
              image: str = "") -> Any:
    """Run the pipeline function on this machine through ``kfp.local`` (subprocess runner).

    A step that fails with a user error (a :class:`StablerepError` in its process) raises
    :class:`StepError` with that error's one line, naming the step; the step's traceback is
    then left out of the echoed step output. Any other failure keeps kfp's error.

    Args:
        params: runtime parameters; ``train_backend`` must be ``local``.
        pipeline_root: folder for KFP's own artifacts (default ``<data_root>/kfp``; local
            only: the runner does not upload to gs://).
        image: the components' base image (unused locally; recorded in the components).
    """
    values = check_params(params)
    check_backend(values["train_backend"], local=True)
    check_data_root(values["data_root"], local=True)
    try:
        import kfp.local
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError(f"{e.name}: not installed; run `make venv` (or pip install -e "
                         "'.[dev]')") from None
    if pipeline_root:
        if "://" in pipeline_root:
            raise ConfigError(f"--pipeline-root {pipeline_root}: local runs need a local "
                              "folder")
        from stablerep import storage

        storage.check_output_folder(pipeline_root, field="--pipeline-root")
    elif "://" in values["data_root"] and not values["data_root"].startswith("file://"):
        raise ConfigError(f"parameter data_root: got {values['data_root']!r}; a local run keeps "
                          "kfp's own artifacts under <data_root>/kfp, which must be a local "
                          "folder: pass --pipeline-root DIR, or a local data_root")
    root = pipeline_root or os.path.join(str(_local_root(values["data_root"])), "kfp")
    fn = load_pipeline(image=image, parallelism=DEFAULT_PARALLELISM)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=os.path.abspath(root))
    steps = _StepOutput(sys.stdout)
    try:
        with contextlib.redirect_stdout(steps):  # kfp echoes each step's output by print()
            return fn(**dict(params))
    except RuntimeError as e:
        failed = _failed_task(str(e))
        steps.flush_pending()
        if failed and steps.user_error:
            raise StepError(f"step {failed}: {steps.user_error}") from None
        raise


def _local_root(uri: str) -> Path:
    from stablerep import storage

    return storage.local_path(uri)


class StepError(StablerepError):
    """A step of a local run failed with a user error; the message is that error's line."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_USER_ERROR = re.compile(r"^(stablerep(?:\.\w+)*)\.(\w+): (.+)$")


def _failed_task(message: str) -> str:
    """The innermost failed task of kfp.local's 'Inner task failed: a inside b.' message."""
    text = _ANSI.sub("", message)
    _, sep, chain = text.partition("Inner task failed: ")
    return chain.split(" inside ")[0].strip().rstrip(".").strip("'") if sep else ""


def _is_user_error(module: str, name: str) -> bool:
    """Whether ``module.name`` is a :class:`StablerepError` subclass."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, StablerepError)


class _StepOutput:
    """Echo what kfp.local prints of its steps; remember a step's own ``error:`` line (the
    components print one for bad input and exit 2), hold back a traceback that ends in a user
    error (remembering that error's line), and print any other traceback as it was."""

    def __init__(self, out: Any):
        self._out = out
        self._line = ""
        self._held: list[str] | None = None  # the lines of a traceback being read
        self._indent = ""  # kfp indents a step's output
        self.user_error = ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            self._take(line + "\n")
        return len(text)

    def _take(self, line: str) -> None:
        plain = _ANSI.sub("", line).rstrip("\n")
        if plain.lstrip().startswith("Traceback (most recent call last):"):
            self.flush_pending()
            self._held, self._indent = [line], plain[:len(plain) - len(plain.lstrip())]
            return
        if self._held is None:
            own = plain.strip()
            if own.startswith("error: ") and not own.startswith("error: internal error:"):
                self.user_error = own.removeprefix("error: ")  # a step's own one-line error
            self._out.write(line)
            return
        self._held.append(line)
        plain = plain.removeprefix(self._indent)
        if not plain or plain.startswith((" ", "\t", "During ", "The above exception")):
            return  # a frame, a blank line, or the link to a chained exception
        found = _USER_ERROR.match(plain.strip())
        if found and _is_user_error(found.group(1), found.group(2)):
            self.user_error = found.group(3)
            self._held = None
        else:
            self.flush_pending()

    def flush_pending(self) -> None:
        """Print a held traceback (it did not end in a user error)."""
        if self._held:
            self._out.write("".join(self._held))
        self._held = None

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return False
