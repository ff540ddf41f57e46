"""``stablerep pipeline compile``: the pipeline to its YAML and its Kubernetes form.

The YAML (:data:`PIPELINE_YAML`) and the Pipeline + PipelineVersion manifests
(:data:`PIPELINE_K8S`) are checked in; a test holds them equal to a fresh compile, which is
reproducible (:func:`_stable_header`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from stablerep.errors import ConfigError
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
from stablerep.kfp.params import DEFAULT_PARALLELISM, PIPELINE_NAME

#: Where the compiled forms live in a checkout of the repository.
REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_YAML = REPO_ROOT / "pipelines" / "stablerep_pipeline.yaml"
PIPELINE_K8S = REPO_ROOT / "k8s" / "pipeline" / "stablerep-pipeline.yaml"
#: Whether the package runs from a checkout (the compiled files' home) or is installed
#: (an image, a wheel): then the YAML goes to the working directory or standard output.
IN_CHECKOUT = (REPO_ROOT / "pipelines").is_dir()
DEFAULT_OUT = str(PIPELINE_YAML) if IN_CHECKOUT else "stablerep_pipeline.yaml"
DEFAULT_K8S = str(PIPELINE_K8S) if IN_CHECKOUT else ""
STDOUT = "-"


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
        hint = "; --out - writes to standard output" if flag == "--out" else ""
        raise ConfigError(f"{flag}: {text}: {existing} is not writable{hint}")
    return path


def compile_pipeline(out: str | Path = PIPELINE_YAML, *, kubernetes: str | Path | None = None,
                     cpu_image: str = CPU_IMAGE, cuda_image: str = CUDA_IMAGE,
                     parallelism: int = DEFAULT_PARALLELISM,
                     image_flags: tuple[str, str] = ("--cpu-image", "--cuda-image")
                     ) -> list[Path]:
    """Compile the pipeline to its YAML (and, optionally, the Kubernetes-manifest form).

    Every destination and image is checked first; both files are compiled under temporary
    names and renamed into place last, so a failure publishes neither.

    Args:
        out: the pipeline YAML to write; ``-`` = standard output (e.g. from the image).
        kubernetes: the Pipeline + PipelineVersion manifest file to write (None = skip).
        cpu_image: the image of the steps that need no GPU.
        cuda_image: the image of the GPU steps (and the training job's pods by default).
        parallelism: generation tasks at a time.
        image_flags: the options that gave the two images, for messages.
    """
    from stablerep.k8s.rules import check_image
    from stablerep.kfp.pipeline import build_pipeline

    to_stdout = str(out) == STDOUT
    targets = [] if to_stdout else [(check_output_file("--out", out), False)]
    if kubernetes:
        if str(kubernetes) == STDOUT:
            raise ConfigError("--kubernetes: got '-'; only --out can go to standard output")
        targets.append((check_output_file("--kubernetes", kubernetes), True))
    if len({t.resolve() for t, _ in targets}) < len(targets):
        raise ConfigError(f"--kubernetes: {kubernetes} is also --out; expected another file")
    check_image(image_flags[0], cpu_image)
    check_image(image_flags[1], cuda_image)
    fn = build_pipeline(cpu_image=cpu_image, cuda_image=cuda_image, parallelism=parallelism)
    staged: list[tuple[Path, Path]] = []
    with tempfile.TemporaryDirectory(prefix="stablerep-compile-") as scratch:
        try:
            for target, k8s in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
                staged.append((tmp, target))
                _compile_to(fn, tmp, k8s=k8s)
            if to_stdout:  # compiled last of all, printed once the files are in place
                printed = Path(scratch) / "stablerep_pipeline.yaml"
                _compile_to(fn, printed, k8s=False)
            for tmp, target in staged:
                tmp.replace(target)
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
        if to_stdout:
            sys.stdout.write(printed.read_text())
            sys.stdout.flush()
    return [target for _, target in staged]


def _compile_to(fn: Any, path: Path, *, k8s: bool) -> None:
    """One compiled form of ``fn`` at ``path``, with a reproducible header."""
    from kfp import compiler

    kwargs = {"kubernetes_manifest_format": True,
              "kubernetes_manifest_options": compiler.KubernetesManifestOptions(
                  pipeline_name=PIPELINE_NAME, pipeline_display_name=PIPELINE_NAME,
                  pipeline_version_name=f"{PIPELINE_NAME}-{_version_label()}",
                  include_pipeline_manifest=True)} if k8s else {}
    compiler.Compiler().compile(fn, str(path), **kwargs)
    path.write_text(_stable_header(path.read_text()))
