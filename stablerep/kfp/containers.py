"""Local runs in containers: ``stablerep pipeline run-local --runner docker``.

Each step runs in the project's image through ``kfp.local.DockerRunner`` under the
constraints the Kubernetes manifests set: UID/GID 1000, a read-only root file system with
a ``/tmp`` tmpfs (``HOME`` under it), no network. The data root (a local folder) is mounted
at the same path, so the URIs the steps write mean the same inside and outside.

kfp's own container loop (``kfp.local.docker_task_handler.run_docker_container``) starts
containers with ``auto_remove=True`` and then inspects them; Podman may have removed the
finished container by then ("container ... does not exist in database"). While a run is
under way :func:`own_container_loop` puts :func:`run_container` in its place: the
container is kept until its exit status is read, then removed here.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stablerep.errors import ConfigError, InputError

#: The images' user and group (the manifests' runAsUser/runAsGroup).
RUN_AS = 1000
#: The environment of every step: a writable home on the tmpfs, unbuffered output.
STEP_ENV = {"HOME": "/tmp/home", "PYTHONUNBUFFERED": "1",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def runner_args(data_root: Path) -> dict[str, Any]:
    """The ``docker run`` arguments of every step (what ``DockerRunner`` passes on).

    Args:
        data_root: the run's data root, an absolute local folder (mounted at its own path).
    """
    from docker.types import Mount

    return {"user": f"{RUN_AS}:{RUN_AS}", "read_only": True, "tmpfs": {"/tmp": ""},
            "environment": dict(STEP_ENV), "network_mode": "none",
            "mounts": [Mount(target=str(data_root), source=str(data_root), type="bind",
                             read_only=False)]}


def make_runner(data_root: Path) -> Any:
    """A ``kfp.local.DockerRunner`` with :func:`runner_args`."""
    import kfp.local

    return kfp.local.DockerRunner(**runner_args(data_root))


def writable_by(path: Path, uid: int = RUN_AS, gid: int = RUN_AS) -> bool:
    """Whether the folder ``path`` lets ``uid``/``gid`` create files (by its mode bits)."""
    info = path.stat()
    if uid == 0:
        return True
    if info.st_uid == uid:
        need = stat.S_IWUSR | stat.S_IXUSR
    elif info.st_gid == gid:
        need = stat.S_IWGRP | stat.S_IXGRP
    else:
        need = stat.S_IWOTH | stat.S_IXOTH
    return info.st_mode & need == need


def check_folder(flag: str, path: Path) -> None:
    """``path`` is (or will be made by :func:`make_folder`) a folder UID 1000 can write.

    A folder that does not exist yet is made by this process and handed to UID 1000, which
    only root or UID 1000 itself can do.
    """
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{flag}: got {str(path)!r}, a file; expected a folder")
        if writable_by(path):
            return
        raise ConfigError(f"{flag}: {path} is not writable by UID {RUN_AS} (the images' "
                          f"user); run `chown -R {RUN_AS}:{RUN_AS} {path}` or pick another "
                          "folder")
    if os.getuid() not in (0, RUN_AS):
        raise ConfigError(f"{flag}: {path} does not exist, and a folder this user makes is "
                          f"not writable by UID {RUN_AS} (the images' user); create it and "
                          f"`chown {RUN_AS}:{RUN_AS}` it first")


def make_folder(path: Path) -> None:
    """Make ``path`` (and missing parents) and hand what was made to UID/GID 1000."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        for made in missing:
            os.chown(made, RUN_AS, RUN_AS)


def check_engine() -> None:
    """A container engine answers at DOCKER_HOST (or the default socket)."""
    try:
        import docker
    except ImportError:  # pragma: no cover - in the lock
        raise InputError("--runner docker: the docker package is not installed; run "
                         "`make venv`") from None
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        client = docker.from_env(timeout=30)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - every way of not answering is the same to a user
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"--runner docker: no container engine answers at {where} "
                          f"({reason}); start Docker or Podman, or set DOCKER_HOST") from None


def run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                  **run_args: Any) -> int:
    """Run one step's container to its end; its exit status. The container is removed here.

    Args:
        client: the docker client.
        image: the step's image (pulled when missing).
        command: the step's command.
        volumes: kfp's mount of the pipeline root.
        **run_args: the runner's arguments (:func:`runner_args`).
    """
    import docker
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    image = add_latest_tag_if_not_present(image)
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        print(f"Pulling image {image!r}")
        client.images.pull(image)
    run_args.pop("auto_remove", None)
    container = client.containers.run(image=image, command=command, detach=True, stdout=True,
                                      stderr=True, volumes=volumes, auto_remove=False,
                                      **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


@contextlib.contextmanager
def own_container_loop() -> Iterator[None]:
    """kfp's docker task handler runs containers through :func:`run_container` meanwhile."""
    from kfp.local import docker_task_handler

    kept = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = kept
