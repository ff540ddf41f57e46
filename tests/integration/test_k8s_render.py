"""`stablerep k8s render`: the checked-in k8s/ tree equals a fresh render, and kustomize
renders every base and overlay into manifests that validate offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stablerep.k8s.render import load_recipe, render_files

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "configs/k8s/cc12m_4x8.yaml"


def _tree(folder: Path) -> dict[str, str]:
    """Rendered files under ``folder`` (its hand-written README.md and the compiled pipeline,
    k8s/pipeline/, which tests/unit/test_pipeline_compile.py keeps in sync, aside)."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder) != Path("README.md")
            and p.relative_to(folder).parts[0] != "pipeline"}


def test_k8s_tree_equals_a_fresh_render():
    fresh = render_files(load_recipe(str(ROOT / RECIPE)), config=RECIPE)
    checked_in = _tree(ROOT / "k8s")
    stale = [p for p in sorted(set(fresh) | set(checked_in)) if fresh.get(p) != checked_in.get(p)]
    assert not stale, f"k8s/ differs from a fresh render in {stale}: run `make k8s` and commit"


def _kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "kubectl is not installed (it renders kustomize trees offline)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("folder", sorted(str(p.relative_to(ROOT / "k8s"))
                                          for p in (ROOT / "k8s").glob("*/*") if p.is_dir()))
def test_kustomize_renders_valid_manifests(folder, k8s_check):
    docs = _kustomize(ROOT / "k8s" / folder)
    assert docs
    for doc in docs:
        k8s_check(doc)


def test_example_overlay_sets_namespace_image_bucket_and_size():
    docs = {d["kind"]: d for d in _kustomize(ROOT / "k8s" / "overlays" / "example")}
    job = docs["PyTorchJob"]
    assert job["metadata"]["namespace"] == "ml-training"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Worker"]["replicas"] == 3
    for rs in specs.values():
        c = rs["template"]["spec"]["containers"][0]
        assert c["image"].startswith("us-docker.pkg.dev/YOUR_PROJECT/stablerep/stablerep:")
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["STABLEREP_DATA_ROOT"] == "gs://YOUR_BUCKET/stablerep/run1"
    assert docs["RoleBinding"]["subjects"][0]["namespace"] == "ml-training"


def _render(tmp_path: Path, cluster: dict) -> subprocess.CompletedProcess:
    recipe = tmp_path / "cluster.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": cluster}))
    return subprocess.run([sys.executable, "-m", "stablerep.cli", "k8s", "render", "--config",
                           str(recipe), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT)


@pytest.mark.parametrize("cluster, message", [
    ({"nodes": 3, "recipe": "configs/cc12m.yaml"},
     "3 x 8 = 24 processes .* do not divide train.captions_per_batch 1376"),
    ({"nodes": 0}, "cluster.nodes: got 0, expected >= 1"),
    ({"name": "Run_1"}, "cluster.name: got 'Run_1', expected a DNS-1035 label"),
    ({"pod": {"image": "docker.io/stablerep/stablerep:0.1.0-cpu"}}, "CPU-only image"),
])
def test_render_bad_config_writes_nothing(tmp_path, cluster, message):
    run = _render(tmp_path, cluster)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_render_writes_the_tree(tmp_path):
    run = _render(tmp_path, {"nodes": 2, "recipe": "configs/cc12m.yaml"})
    assert run.returncode == 0, run.stderr
    assert "11 files written" in run.stdout
    assert (tmp_path / "out" / "base" / "training-pytorchjob" / "pytorchjob.yaml").exists()
