"""`stablerep pipeline ...`: compile the Kubeflow pipeline, submit a run, run it locally."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from stablerep.errors import ConfigError
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
from stablerep.kfp import params as pipeline_params
from stablerep.kfp.compile import DEFAULT_K8S, DEFAULT_OUT, PIPELINE_YAML
from stablerep.kfp.local import RUNNERS

_PARAM_HELP = ("Pipeline parameter name=value (value read as JSON when it parses, else a "
               "string); repeatable. Names: " + ", ".join(pipeline_params.PARAM_NAMES) + ".")


def _params(recipe: str | None, sets: tuple[str, ...], params: tuple[str, ...],
            **fixed: Any) -> dict[str, Any]:
    """--recipe (its values for the parameters) < fixed values < --set < --param."""
    given = dict(pipeline_params.parse_param(text) for text in params)
    pipeline_params.check_names(list(given))  # an unknown name fails before anything else
    out: dict[str, Any] = pipeline_params.recipe_params(recipe) if recipe else {}
    out.update(fixed)
    if sets:
        out["overrides"] = list(sets)
    out.update(given)
    return out


@contextlib.contextmanager
def _package(package: str) -> Iterator[str]:
    """The package a run is made of: the one given; else the checked-in YAML of a checkout;
    else (the package is installed, as in the images) this version's pipeline compiled into a
    temporary file for the run."""
    from stablerep.kfp.compile import IN_CHECKOUT, compile_pipeline

    if package or IN_CHECKOUT:
        yield package or str(PIPELINE_YAML)
        return
    with tempfile.TemporaryDirectory(prefix="stablerep-submit-") as folder:
        (path,) = compile_pipeline(Path(folder) / PIPELINE_YAML.name)
        yield str(path)


@click.group(name="pipeline")
def pipeline() -> None:
    """Kubeflow Pipelines: compile, submit a run, or run the pipeline on this machine."""


@pipeline.command(name="compile")
@click.option("--out", default=DEFAULT_OUT, show_default=True, metavar="FILE",
              help="The compiled pipeline YAML ('-' = standard output).")
@click.option("--kubernetes", "k8s_out", default=None, metavar="FILE",
              help="The Pipeline + PipelineVersion manifests ('' = skip) [default: "
              f"{DEFAULT_K8S or 'skip'}; skip with --out -].")
@click.option("--image", default="", metavar="IMAGE", help="The image of every step (sets "
              "both --cpu-image and --cuda-image).")
@click.option("--cpu-image", default="", metavar="IMAGE", help="The image of the steps that "
              f"need no GPU [default: --image, else {CPU_IMAGE}].")
@click.option("--cuda-image", default="", metavar="IMAGE", help="The image of generation, "
              "training in the step's pod and evaluation; the training job's pods' default "
              f"[default: --image, else {CUDA_IMAGE}].")
@click.option("--parallelism", type=int, default=pipeline_params.DEFAULT_PARALLELISM,
              show_default=True, help="Generation tasks at a time (KFP fixes it at compile time).")
def compile_cmd(out: str, k8s_out: str | None, image: str, cpu_image: str, cuda_image: str,
                parallelism: int) -> None:
    """Compile the pipeline (stablerep.kfp.pipeline; what `make compile` runs).

    \b
    Examples:
      stablerep pipeline compile
      stablerep pipeline compile --image registry.example.com/stablerep:0.1.0-cuda
      stablerep pipeline compile --cpu-image registry.example.com/stablerep:0.1.0-cpu \\
        --cuda-image registry.example.com/stablerep:0.1.0-cuda
      podman run --rm docker.io/stablerep/stablerep:0.1.0-cpu stablerep pipeline compile --out -
    """
    from stablerep.kfp.compile import compile_pipeline

    flags = ("--cpu-image" if cpu_image else "--image", "--cuda-image" if cuda_image else "--image")
    if k8s_out is None:
        k8s_out = "" if out == "-" else DEFAULT_K8S
    for path in compile_pipeline(out, kubernetes=k8s_out or None,
                                 cpu_image=cpu_image or image or CPU_IMAGE,
                                 cuda_image=cuda_image or image or CUDA_IMAGE,
                                 parallelism=parallelism, image_flags=flags):
        click.echo(f"pipeline: wrote {path}", err=out == "-")
    if out == "-":
        click.echo("pipeline: wrote the pipeline YAML to standard output", err=True)


@pipeline.command()
@click.option("--host", required=True, metavar="URL", help="KFP API endpoint, e.g. "
              "http://localhost:8080 (kubectl port-forward svc/ml-pipeline-ui 8080:80).")
@click.option("--experiment", required=True, metavar="NAME", help="Experiment (created when "
              "missing).")
@click.option("--recipe", default=None, metavar="NAME|URI", help="Send this recipe's values "
              "for the parameters (and recipe=it).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe override "
              "(the overrides parameter); repeatable.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help=_PARAM_HELP)
@click.option("--package", default="", metavar="FILE", help="The compiled pipeline "
              f"[default: {PIPELINE_YAML.name} of this checkout; installed (an image): this "
              "version's pipeline, compiled for the run].")
@click.option("--upload", "pipeline_name", default="", metavar="PIPELINE", help="Upload the "
              "package as a version of this pipeline (reused when already uploaded) and run "
              "it [default: send the spec inline with the run].")
@click.option("--run-name", default="", help="Run display name [default: stablerep-<time>].")
@click.option("--namespace", default=None, help="Kubeflow profile namespace (multi-user).")
@click.option("--service-account", default="", metavar="NAME", help="Service account of the "
              "run's pods [default: the KFP server's default].")
def submit(host: str, experiment: str, recipe: str | None, sets: tuple[str, ...],
           params: tuple[str, ...], package: str, pipeline_name: str, run_name: str,
           namespace: str | None, service_account: str) -> None:
    """Create a run of the compiled pipeline on a Kubeflow Pipelines server.

    \b
    Examples:
      stablerep pipeline submit --host http://localhost:8080 --experiment stablerep \\
        --param data_root=gs://my-bucket/stablerep --param shards=1024
    """
    from stablerep.kfp.submit import submit as create_run

    values = _params(recipe, sets, params)
    with _package(package) as compiled:
        run_id, url = create_run(host, experiment, values, package=compiled, run_name=run_name,
                                 namespace=namespace, pipeline=pipeline_name,
                                 service_account=service_account)
    click.echo(f"run {run_id}")
    click.echo(f"url {url}")


@pipeline.command(name="run-local")
@click.option("--recipe", default="demo", show_default=True, metavar="NAME|URI",
              help="Recipe whose values the parameters take.")
@click.option("--data-root", default=None, metavar="URI", help="data_root [default: the "
              "recipe's].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe override; "
              "repeatable.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help=_PARAM_HELP)
@click.option("--pipeline-root", default="", metavar="DIR", help="KFP's own artifacts "
              "[default: <data_root>/kfp].")
@click.option("--runner", default="subprocess", show_default=True, metavar="|".join(RUNNERS),
              help="subprocess: each step a process here; docker: each step in --image "
              "(Docker, or Podman through DOCKER_HOST), as UID 1000 without network.")
@click.option("--image", default="", metavar="IMAGE", help="The image of every step "
              "(--runner docker; required there).")
def run_local(recipe: str, data_root: str | None, sets: tuple[str, ...],
              params: tuple[str, ...], pipeline_root: str, runner: str, image: str) -> None:
    """Run the pipeline on this machine through kfp.local (what `make demo` runs).

    kfp.local runs each step as a subprocess here: resource requests, GPUs, node selectors
    and tolerations are ignored, and training must use train_backend=local.

    \b
    Examples:
      stablerep pipeline run-local
      stablerep pipeline run-local --data-root /tmp/demo --set train.max_steps=10
      stablerep pipeline run-local --runner docker --image docker.io/stablerep/stablerep:0.1.0-cpu
    """
    from stablerep.kfp.local import run_local as run
    from stablerep.kfp.validation import check_run

    _check_runner(runner, image)
    fixed: dict[str, Any] = {"train_backend": "local"}
    if data_root is not None:
        fixed["data_root"] = data_root
    values = _params(recipe, sets, params, **fixed)
    cfg = check_run(values, local=True)  # a bad value fails here, before any step
    start = time.perf_counter()
    run(values, pipeline_root=pipeline_root, runner=runner, image=image)
    click.echo(_summary(cfg, time.perf_counter() - start))


def _check_runner(runner: str, image: str) -> None:
    """--runner is known; --image is given with docker only (and checked there)."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner: got {runner!r}, expected one of {', '.join(RUNNERS)}")
    if runner == "docker" and not image:
        raise ConfigError("--image: got '', expected the image every step runs in "
                          "(--runner docker), e.g. docker.io/stablerep/stablerep:0.1.0-cpu")
    if runner != "docker" and image:
        raise ConfigError(f"--image: got {image!r} with --runner {runner}, which runs the "
                          "steps here; expected --runner docker")


def _summary(cfg: Any, seconds: float) -> str:
    """Where the report is and the headline numbers, trained vs baseline."""
    from stablerep import contracts, storage
    from stablerep.kfp.steps import eval_metric_values
    from stablerep.stages import eval_locations

    out = eval_locations(cfg).out
    metrics = json.loads(storage.read_text(storage.join(out, contracts.EVAL_METRICS)))
    values = eval_metric_values(metrics)
    lines = [f"pipeline: finished in {seconds:.0f} s",
             f"report: {os.path.abspath(storage.join(out, contracts.REPORT_HTML))}"]
    for name in metrics.get("datasets", {}):
        row = [f"{name}:"]
        for key in ("probe_top1", "few_shot_mean", "knn_top1"):
            ours, base = values.get(f"{name}/{key}"), values.get(f"baseline/{name}/{key}")
            if ours is not None:
                row.append(f"{key} {100 * ours:.1f}%"
                           + (f" (baseline {100 * base:.1f}%)" if base is not None else ""))
        lines.append("  ".join(row))
    return "\n".join(lines)
