"""The pipeline's parameters: the table (:data:`PARAMS`), their defaults and their checks.

Each :class:`Param` has a name, a KFP type, a default (the paper's CC12M recipe), the config
field it sets (or none: a pipeline or launcher setting) and the description the Kubeflow UI
shows. The pipeline's signature, the validate component's inputs, the CLI's ``--param`` names
and the README's table are all read from this one table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stablerep.config import CAPTION_SOURCES, METHODS, SCHEDULERS, load_config, to_dict
from stablerep.errors import ConfigError
from stablerep.k8s.config import CUDA_IMAGE

PAPER_EVAL_SETS = ("ImageNet", "CIFAR10", "CIFAR100", "Food101", "OxfordIIITPet", "Flowers102",
                   "StanfordCars", "FGVCAircraft", "DTD", "SUN397", "Caltech101")
"""The paper recipes' ``eval.datasets`` (torchvision names), the ``eval_datasets`` default."""

PIPELINE_NAME = "stablerep"
#: Shards drawn at the same time by default (KFP fixes a loop's parallelism at compile time).
DEFAULT_PARALLELISM = 64
TRAIN_BACKENDS = ("pytorchjob", "trainjob", "local")
SECTIONS = ("captions", "generate", "train", "eval")


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
          "default: the CUDA image the pipeline was compiled with."),
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
BY_NAME = {p.name: p for p in PARAMS}
BY_FIELD = {p.field: p for p in PARAMS if p.field}


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
        if name not in BY_NAME:
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


# ---------------------------------------------------------------------------- reading


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
    data = to_dict(load_config(recipe, require=SECTIONS))
    out: dict[str, Any] = {"recipe": recipe}
    for p in PARAMS:
        if not p.field:
            continue
        node: Any = data
        for part in p.field.split("."):
            node = node[part]
        out[p.name] = 0 if node is None and p.zero_is_none else node
    out["workers"] = min(BY_NAME["workers"].default, out["shards"])  # <= shards
    return out

