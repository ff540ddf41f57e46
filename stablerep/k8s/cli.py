"""`stablerep k8s ...`: render the Kubernetes manifests (the launcher joins here)."""

from __future__ import annotations

import click


@click.group(name="k8s")
def k8s() -> None:
    """Kubernetes: ready-to-apply manifests for training and generation."""


@k8s.command()
@click.option("--config", "config", required=True, metavar="URI",
              help="Cluster recipe (YAML with cluster: and generation: sections).")
@click.option("--out", default="k8s", show_default=True, metavar="DIR",
              help="Folder to write the kustomize tree into.")
def render(config: str, out: str) -> None:
    """Render PyTorchJob, TrainJob, the Indexed generation Job and RBAC as kustomize bases.

    \b
    Examples:
      stablerep k8s render --config configs/k8s/cc12m_4x8.yaml --out k8s
      kubectl apply -k k8s/overlays/example
    """
    from stablerep.k8s.render import render as run_render

    paths = run_render(config, out)
    click.echo(f"k8s: {len(paths)} files written under {out}")


@k8s.command()
@click.option("--config", "config", required=True, metavar="URI",
              help="Cluster recipe (its cluster: section is the job).")
@click.option("--backend", type=click.Choice(["pytorchjob", "trainjob"]),
              help="Job kind [default: the recipe's cluster.backend].")
@click.option("--name", "job_name", metavar="NAME", help="Job name (DNS-1035) [default: "
              "derived from --run-id and --task, else cluster.name].")
@click.option("--run-id", default="", metavar="ID", help="Pipeline run id (with --task, the "
              "job name: a retried step attaches to its job instead of starting another).")
@click.option("--task", default="train", show_default=True, help="Pipeline task name.")
@click.option("--namespace", metavar="NS", help="[default: the recipe's, else the service "
              "account's or the kubeconfig context's].")
@click.option("--kubeconfig", default="", metavar="PATH", help="kubeconfig file.")
@click.option("--context", default="", metavar="NAME", help="kubeconfig context.")
@click.option("--schedule-timeout", type=float, metavar="S",
              help="Seconds a pod may stay stuck after admission (unschedulable, image pull, "
              "crash loop) [default: the recipe's launch.schedule_timeout_s, 900].")
@click.option("--timeout", type=float, metavar="S", help="Seconds the run may take from "
              "admission [default: the recipe's launch.timeout_s, none].")
@click.option("--queue-timeout", type=float, metavar="S", help="Seconds a queue (Kueue) may "
              "hold the job before it is given up [default: launch.queue_timeout_s, none].")
@click.option("--api-unreachable", type=float, metavar="S", help="Seconds the API may fail "
              "every call before the launch stops, leaving the job running "
              "[default: launch.api_unreachable_s, 600].")
@click.option("--watch-timeout", type=int, metavar="S", help="Seconds of one watch request "
              "(the launcher re-watches) [default: launch.watch_timeout_s, 30].")
@click.option("--no-logs", is_flag=True, help="Do not stream the master pod's log.")
def launch(config, backend, job_name, run_id, task, namespace, kubeconfig, context,
           schedule_timeout, timeout, queue_timeout, api_unreachable, watch_timeout,
           no_logs) -> None:
    """Create (or attach to) a training job and follow it to the end.

    How it follows the job (timeouts, retries) is the recipe's launch: section; the flags
    override it. See README "Training on a cluster" for what cancel, eviction and queues do.

    \b
    Examples:
      stablerep k8s launch --config configs/k8s/cc12m_4x8.yaml --context my-gke --namespace ml
      stablerep k8s launch --config configs/k8s/cc12m_4x8.yaml --backend trainjob
    """
    import dataclasses

    from stablerep.k8s.launcher import LaunchConfig
    from stablerep.k8s.launcher import launch as run_launch
    from stablerep.k8s.render import load_recipe

    recipe = load_recipe(config)
    cluster = recipe.cluster
    changes = {k: v for k, v in (("backend", backend), ("namespace", namespace)) if v}
    if changes:
        cluster = dataclasses.replace(cluster, **changes)
    follow = dataclasses.asdict(recipe.launch)
    flags = {"schedule_timeout_s": schedule_timeout, "timeout_s": timeout,
             "queue_timeout_s": queue_timeout, "api_unreachable_s": api_unreachable,
             "watch_timeout_s": watch_timeout}
    follow.update({k: v for k, v in flags.items() if v is not None})
    if no_logs:
        follow["stream_logs"] = False
    cfg = LaunchConfig(cluster=cluster, run_id=run_id, task=task, job_name=job_name or "",
                       **follow)
    result = run_launch(cfg, kubeconfig=kubeconfig, context=context)
    click.echo(f"launch: {result.kind} {result.namespace}/{result.name} succeeded in "
               f"{result.seconds:,.0f}s; checkpoint {result.checkpoint}; backbone "
               f"{result.backbone}")
