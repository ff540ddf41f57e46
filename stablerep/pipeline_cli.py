"""`stablerep pipeline ...`: compile the Kubeflow pipeline, submit a run, run it locally."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from stablerep import pipeline as lib

_PARAM_HELP = ("Pipeline parameter name=value (value read as JSON when it parses, else a "
               "string); repeatable. Names: " + ", ".join(lib.PARAM_NAMES) + ".")


def _params(recipe: str | None, sets: tuple[str, ...], params: tuple[str, ...],
            **fixed: Any) -> dict[str, Any]:
    """--recipe (its values for the parameters) < fixed values < --set < --param."""
    given = dict(lib.parse_param(text) for text in params)
    lib.check_names(list(given))  # an unknown name fails before anything else
    out: dict[str, Any] = lib.recipe_params(recipe) if recipe else {}
    out.update(fixed)
    if sets:
        out["overrides"] = list(sets)
    out.update(given)
    return out


@click.group(name="pipeline")
def pipeline() -> None:
    """Kubeflow Pipelines: compile, submit a run, or run the pipeline on this machine."""


@pipeline.command(name="compile")
@click.option("--out", default=str(lib.PIPELINE_YAML), show_default=True, metavar="FILE",
              help="The compiled pipeline YAML.")
@click.option("--kubernetes", "k8s_out", default=str(lib.PIPELINE_K8S), show_default=True,
              metavar="FILE", help="The Pipeline + PipelineVersion manifests ('' = skip).")
@click.option("--image", default="", metavar="IMAGE", help="The components' base image "
              f"[default: ${lib.IMAGE_ENV}, else {lib.component_image()}].")
@click.option("--parallelism", type=int, default=lib.DEFAULT_PARALLELISM, show_default=True,
              help="Generation tasks at a time (KFP fixes it at compile time).")
def compile_cmd(out: str, k8s_out: str, image: str, parallelism: int) -> None:
    """Compile pipelines/stablerep_pipeline.py (what `make compile` runs).

    \b
    Examples:
      stablerep pipeline compile
      stablerep pipeline compile --image registry.example.com/stablerep:0.1.0-cuda
    """
    for path in lib.compile_pipeline(out, kubernetes=k8s_out or None, image=image,
                                     parallelism=parallelism):
        click.echo(f"pipeline: wrote {path}")


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
@click.option("--package", default=str(lib.PIPELINE_YAML), show_default=True, metavar="FILE",
              help="The compiled pipeline.")
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
    values = _params(recipe, sets, params)
    run_id, url = lib.submit(host, experiment, values, package=package, run_name=run_name,
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
def run_local(recipe: str, data_root: str | None, sets: tuple[str, ...],
              params: tuple[str, ...], pipeline_root: str) -> None:
    """Run the pipeline on this machine through kfp.local (what `make demo` runs).

    kfp.local runs each step as a subprocess here: resource requests, GPUs, node selectors
    and tolerations are ignored, and training must use train_backend=local.

    \b
    Examples:
      stablerep pipeline run-local
      stablerep pipeline run-local --data-root /tmp/demo --set train.max_steps=10
    """
    fixed: dict[str, Any] = {"train_backend": "local"}
    if data_root is not None:
        fixed["data_root"] = data_root
    values = _params(recipe, sets, params, **fixed)
    cfg = lib.validate(values, local=True)  # a bad value fails here, before any step
    start = time.perf_counter()
    lib.run_local(values, pipeline_root=pipeline_root)
    click.echo(_summary(cfg, time.perf_counter() - start))


def _summary(cfg: Any, seconds: float) -> str:
    """Where the report is and the headline numbers, trained vs baseline."""
    from stablerep import contracts, storage
    from stablerep.stages import eval_locations

    out = eval_locations(cfg).out
    metrics = json.loads(storage.read_text(storage.join(out, contracts.EVAL_METRICS)))
    values = lib.eval_metric_values(metrics)
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
