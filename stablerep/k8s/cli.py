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
      stablerep k8s render --config configs/k8s_cc12m.yaml --out k8s
      kubectl apply -k k8s/overlays/example
    """
    from stablerep.k8s.render import render as run_render

    paths = run_render(config, out)
    click.echo(f"k8s: {len(paths)} files written under {out}")
