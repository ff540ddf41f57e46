"""``stablerep pipeline run-local``: the pipeline function run on this machine by ``kfp.local``.

Two runners: ``subprocess`` (``SubprocessRunner(use_venv=False)``: each step a Python
process here, what ``make demo`` runs) and ``docker`` (each step in the project's image,
see :mod:`stablerep.kfp.containers`). Everything is checked before the first step.

A step that fails with a user error (a :class:`StablerepError` in its process, or its own
``error:`` line) ends the run with :class:`StepError`: that error's one line, naming the
step (:class:`_StepOutput` reads the steps' output as kfp echoes it).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stablerep.errors import ConfigError, InputError, StablerepError
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
from stablerep.kfp.params import DEFAULT_PARALLELISM, check_params
from stablerep.kfp.validation import check_backend, check_data_root

RUNNERS = ("subprocess", "docker")


def run_local(params: Mapping[str, Any], *, pipeline_root: str = "", runner: str = "subprocess",
              image: str = "") -> Any:
    """Run the pipeline function on this machine through ``kfp.local``.

    Args:
        params: runtime parameters; ``train_backend`` must be ``local``.
        pipeline_root: folder for KFP's own artifacts (default ``<data_root>/kfp``; local
            only: the runner does not upload to gs://).
        runner: ``subprocess`` or ``docker``.
        image: the image every step runs in (``docker``; both the CPU and the CUDA steps).
    """
    values = check_params(params)
    check_backend(values["train_backend"], local=True)
    check_data_root(values["data_root"], local=True)
    if runner not in RUNNERS:
        raise ConfigError(f"--runner: got {runner!r}, expected one of {', '.join(RUNNERS)}")
    try:
        import kfp.local
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError(f"{e.name}: not installed; run `make venv` (or pip install -e "
                         "'.[dev]')") from None
    root = Path(os.path.abspath(_pipeline_root(values["data_root"], pipeline_root)))
    if runner == "docker":
        kfp_runner, images = _docker_runner(values["data_root"], root, image)
        # the steps see the data root at its own absolute path (their working directory is
        # the image's, so a relative one would land inside the container)
        params = {**params, "data_root": str(Path(os.path.abspath(
            _local_root(values["data_root"]))))}
    else:
        kfp_runner, images = kfp.local.SubprocessRunner(use_venv=False), (CPU_IMAGE, CUDA_IMAGE)
    from stablerep.kfp.pipeline import build_pipeline

    fn = build_pipeline(cpu_image=images[0], cuda_image=images[1],
                        parallelism=DEFAULT_PARALLELISM)
    kfp.local.init(runner=kfp_runner, pipeline_root=str(root))
    loop = contextlib.nullcontext()
    if runner == "docker":
        from stablerep.kfp.containers import own_container_loop

        loop = own_container_loop()
    with loop:
        return _run(fn, params)


def _pipeline_root(data_root: str, pipeline_root: str) -> str:
    """The folder of kfp's own artifacts: ``--pipeline-root``, else ``<data_root>/kfp``."""
    from stablerep import storage

    if pipeline_root:
        if "://" in pipeline_root:
            raise ConfigError(f"--pipeline-root {pipeline_root}: local runs need a local "
                              "folder")
        storage.check_output_folder(pipeline_root, field="--pipeline-root")
        return pipeline_root
    if "://" in data_root and not data_root.startswith("file://"):
        raise ConfigError(f"parameter data_root: got {data_root!r}; a local run keeps "
                          "kfp's own artifacts under <data_root>/kfp, which must be a local "
                          "folder: pass --pipeline-root DIR, or a local data_root")
    return os.path.join(str(_local_root(data_root)), "kfp")


def _docker_runner(data_root: str, root: Path, image: str) -> tuple[Any, tuple[str, str]]:
    """The DockerRunner of a run, after every check: (runner, (CPU image, CUDA image)).

    The data root must be a local folder UID 1000 can write (it is mounted into every step),
    and so must the pipeline root; a container engine must answer. Missing folders are made
    last, once everything passed.
    """
    from stablerep.k8s.rules import check_image
    from stablerep.kfp import containers

    check_image("--image", image)
    if "://" in data_root and not data_root.startswith("file://"):
        raise ConfigError(f"parameter data_root: got {data_root!r}; --runner docker mounts the "
                          "data root into every step, so it must be a local folder")
    folder = Path(os.path.abspath(_local_root(data_root)))
    containers.check_folder("parameter data_root", folder)
    containers.check_folder("--pipeline-root", root)
    containers.check_engine()
    containers.make_folder(folder)
    containers.make_folder(root)
    return containers.make_runner(folder), (image, image)


def _run(fn: Any, params: Mapping[str, Any]) -> Any:
    """Call the pipeline; a step's user error becomes :class:`StepError` (one line)."""
    steps = _StepOutput(sys.stdout)
    try:
        with contextlib.redirect_stdout(steps):  # kfp echoes each step's output by print()
            return fn(**dict(params))
    except RuntimeError as e:
        failed = _failed_task(str(e))
        steps.flush_pending()
        if failed and steps.user_error:
            raise StepError(f"step {failed}: {steps.user_error}") from None
        raise


def _local_root(uri: str) -> Path:
    from stablerep import storage

    return storage.local_path(uri)


class StepError(StablerepError):
    """A step of a local run failed with a user error; the message is that error's line."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_USER_ERROR = re.compile(r"^(stablerep(?:\.\w+)*)\.(\w+): (.+)$")


def _failed_task(message: str) -> str:
    """The innermost failed task of kfp.local's 'Inner task failed: a inside b.' message."""
    text = _ANSI.sub("", message)
    _, sep, chain = text.partition("Inner task failed: ")
    return chain.split(" inside ")[0].strip().rstrip(".").strip("'") if sep else ""


def _is_user_error(module: str, name: str) -> bool:
    """Whether ``module.name`` is a :class:`StablerepError` subclass."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, StablerepError)


class _StepOutput:
    """Echo what kfp.local prints of its steps; remember a step's own ``error:`` line (the
    components print one for bad input and exit 2), hold back a traceback that ends in a user
    error (remembering that error's line), and print any other traceback as it was."""

    def __init__(self, out: Any):
        self._out = out
        self._line = ""
        self._held: list[str] | None = None  # the lines of a traceback being read
        self._indent = ""  # kfp indents a step's output
        self.user_error = ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            self._take(line + "\n")
        return len(text)

    def _take(self, line: str) -> None:
        plain = _ANSI.sub("", line).rstrip("\n")
        if plain.lstrip().startswith("Traceback (most recent call last):"):
            self.flush_pending()
            self._held, self._indent = [line], plain[:len(plain) - len(plain.lstrip())]
            return
        if self._held is None:
            own = plain.strip()
            if own.startswith("error: ") and not own.startswith("error: internal error:"):
                self.user_error = own.removeprefix("error: ")  # a step's own one-line error
            self._out.write(line)
            return
        self._held.append(line)
        plain = plain.removeprefix(self._indent)
        if not plain or plain.startswith((" ", "\t", "During ", "The above exception")):
            return  # a frame, a blank line, or the link to a chained exception
        found = _USER_ERROR.match(plain.strip())
        if found and _is_user_error(found.group(1), found.group(2)):
            self.user_error = found.group(3)
            self._held = None
        else:
            self.flush_pending()

    def flush_pending(self) -> None:
        """Print a held traceback (it did not end in a user error)."""
        if self._held:
            self._out.write("".join(self._held))
        self._held = None

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return False
