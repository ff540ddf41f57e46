"""The pipeline's steps: what each component's body calls inside its container.

A component (:mod:`stablerep.kfp.components`) hands its inputs to one function here, which
runs one stage (:mod:`stablerep.stages`) and describes the result on the step's output
artifacts. The artifacts are small: metadata and a JSON file pointing at the data_root URIs
(the data itself moves through data_root), and each step takes the artifact of the step
whose output it reads, so a run's lineage shows captions -> images -> checkpoint -> report.
A step's bad input ends it with one ``error:`` line and exit status 2 (:func:`user_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stablerep.config import Config
from stablerep.errors import StablerepError
from stablerep.kfp.validation import (
    build_config,
    check_run,
    cluster_config,
    cluster_recipe,
    config_sets,
    resolved,
    stage_config,
)


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
    """The validate component: :func:`~stablerep.kfp.validation.check_run`; bad input ends it with one line, exit 2.

    Args:
        params: every pipeline parameter.

    Returns:
        The resolved config (:func:`resolved`), the one config every later step runs.
    """
    with user_errors():
        return resolved(check_run(params))


# ---------------------------------------------------------------------------- artifacts


def write_dataset(artifact: Any, meta: Mapping[str, Any]) -> None:
    """A small Dataset artifact: ``meta`` as its metadata and as a JSON file at its path."""
    artifact.metadata.update(dict(meta))
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")


def log_metrics(artifact: Any, values: Mapping[str, float]) -> None:
    """Every value onto a KFP Metrics artifact."""
    for name, value in values.items():
        artifact.log_metric(name, value)


def captions_step(config: str, *, workers: int, captions: Any) -> list[int]:
    """The captions component: run the stage, describe it; returns the worker indices.

    Args:
        config: the resolved config the validate step returned (JSON).
        workers: generation tasks (the ``workers`` parameter, at most the shards written).
        captions: the KFP Dataset artifact to describe the captions with.

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
    write_dataset(captions, {"uri": result.uri, "manifest": result.manifest,
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
                  shards: Any) -> None:
    """The generate component: draw worker ``worker``'s shards (committed ones are skipped).

    The model is loaded once, from the run's copy the stage_model step made.

    Args:
        params: the generation's pipeline parameters (data_root, recipe, overrides and the
            generate.* ones); the recipe with them is the same config the validate step built.
        worker: this task's index (0 .. workers - 1).
        workers: the number of generation tasks.
        shards: the KFP Dataset artifact to describe the worker's shards with.
    """
    from stablerep.stages import run_generate

    cfg = build_config(params["recipe"], params["overrides"], params)
    with user_errors():
        result = run_generate(cfg, worker=(worker, workers), staged_model=True)
    write_dataset(shards, {"uri": result.uri, "worker": worker, "workers": workers,
                            "images": result.images, "shards_written": result.shards_written,
                            "shards_skipped": result.shards_skipped,
                            "images_per_s": result.images_per_s,
                            "failed_captions": result.failed_captions})


def manifest_step(config: str, *, captions: Any, images: Any) -> None:
    """The images_manifest component: the images manifest, once every worker is done.

    Args:
        config: the resolved config the validate step returned (JSON).
        captions: the captions step's Dataset artifact (the captions the images show).
        images: the KFP Dataset artifact to describe the images with.
    """
    from stablerep import storage
    from stablerep.stages import run_images_manifest

    with user_errors():
        uri = run_images_manifest(stage_config(config))
    doc = storage.read_json(uri)
    write_dataset(images, {"uri": uri.rsplit("/", 1)[0], "manifest": uri,
                           "captions": captions.metadata.get("manifest", ""),
                           "num_shards": doc["num_shards"], "num_samples": doc["num_samples"],
                           "failed_captions": doc["failed_captions"]})


def train_step(values: Mapping[str, Any], *, run_id: str, task: str, images: Any,
               checkpoint: Any, metrics: Any) -> None:
    """The train components: train (see :func:`train_model`), describe the output, log metrics.

    Args:
        values: the step's parameters (config, recipe, backend and cluster settings).
        run_id: the pipeline run id.
        task: the pipeline task name.
        images: the images_manifest step's Dataset artifact (the images trained on).
        checkpoint: the KFP Model artifact to describe the trained model with.
        metrics: the KFP Metrics artifact (final loss, images/s, steps).
    """
    result = train_model(values, run_id=run_id, task=task)
    describe_training(result, images=images, checkpoint=checkpoint, metrics=metrics)


def train_component(inputs: dict[str, Any]) -> None:
    """The body of both train components (in this pod, or the job launcher): their inputs
    as they arrive, the run id, task name and artifacts taken out for :func:`train_step`.

    Args:
        inputs: every input of the component by name (its ``locals()``).
    """
    values = dict(inputs)
    train_step(values, run_id=values.pop("run_id"), task=values.pop("task_name"),
               images=values.pop("images"), checkpoint=values.pop("checkpoint"),
               metrics=values.pop("metrics"))


def describe_training(result: Any, *, images: Any, checkpoint: Any, metrics: Any) -> None:
    """The train step's artifacts from a :class:`~stablerep.contracts.TrainResult`.

    Args:
        result: the run's result.
        images: the Dataset artifact of the images trained on (its manifest is recorded).
        checkpoint: the KFP Model artifact: the output URIs, steps and world size.
        metrics: the KFP Metrics artifact: final loss, images/s (last logged window), steps.
    """
    from stablerep import storage
    from stablerep.contracts import TRAIN_RESULT

    write_dataset(checkpoint, {"uri": result.out, "checkpoint": result.checkpoint,
                               "latest": result.latest, "backbone": result.backbone,
                               "metrics": result.metrics,
                               "images": images.metadata.get("manifest", ""),
                               "result": storage.join(result.out, TRAIN_RESULT),
                               "steps": result.steps, "world_size": result.world_size})
    log_metrics(metrics, {"final_loss": float(result.final_loss),
                          "images_per_s": float(result.images_per_s),
                          "steps": float(result.steps)})


def eval_step(config: str, *, checkpoint: Any, metrics: Any, report_html: Any, report_md: Any,
              results: Any) -> None:
    """The evaluate component: evaluate, then copy the report into the UI's artifacts.

    Args:
        config: the resolved config the validate step returned (JSON).
        checkpoint: the train step's Model artifact (the model evaluated).
        metrics: the KFP Metrics artifact (see :func:`eval_metric_values`).
        report_html: the KFP HTML artifact.
        report_md: the KFP Markdown artifact.
        results: the KFP Dataset artifact to describe the eval output with.
    """
    from stablerep import storage
    from stablerep.stages import run_eval

    result = run_eval(stage_config(config))
    for artifact, uri in ((report_html, result.report_html), (report_md, result.report_md)):
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        Path(artifact.path).write_text(storage.read_text(uri))
        artifact.metadata["uri"] = uri
    log_metrics(metrics, eval_metric_values(result.metrics))
    write_dataset(results, {"uri": result.out, "metrics": result.metrics_uri,
                            "backbone": checkpoint.metadata.get("backbone", ""),
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


def train_model(values: Mapping[str, Any], *, run_id: str = "", task: str = "train") -> Any:
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

