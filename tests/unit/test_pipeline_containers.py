"""`stablerep pipeline run-local --runner docker`: the container settings every step gets
(the manifests' constraints), the folder and engine checks, and the container loop that
keeps a finished container until its exit status is read (Podman may remove it early)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from stablerep.errors import ConfigError
from stablerep.kfp import containers


def test_runner_args_are_the_manifests_constraints(tmp_path: Path) -> None:
    args = containers.runner_args(tmp_path / "root")
    assert args["user"] == "1000:1000"
    assert args["read_only"] is True and args["tmpfs"] == {"/tmp": ""}
    assert args["network_mode"] == "none"
    assert args["environment"]["HOME"] == "/tmp/home"
    (mount,) = args["mounts"]
    assert (mount["Source"], mount["Target"], mount["Type"], mount["ReadOnly"]) == (
        str(tmp_path / "root"), str(tmp_path / "root"), "bind", False)
    assert "volumes" not in args  # DockerRunner refuses it


def test_kfp_docker_runner_takes_the_args(tmp_path: Path) -> None:
    runner = containers.make_runner(tmp_path)
    assert runner.container_run_args == containers.runner_args(tmp_path)


@pytest.mark.skipif(os.getuid() != 0, reason="changing a folder's owner needs root")
@pytest.mark.parametrize(("owner", "group", "mode", "expected"), [
    (1000, 0, 0o755, True), (0, 0, 0o755, False), (0, 0, 0o777, True),
    (0, 1000, 0o775, True), (0, 1000, 0o755, False), (1000, 0, 0o555, False)])
def test_writable_by_uid_1000(tmp_path: Path, owner: int, group: int, mode: int,
                              expected: bool) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    os.chown(folder, owner, group)
    folder.chmod(mode)
    assert containers.writable_by(folder) is expected


def test_a_missing_folder_needs_root_or_uid_1000(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(containers.os, "getuid", lambda: 1234)
    with pytest.raises(ConfigError, match=r"^x: .*/new does not exist, and a folder this user "
                                          "makes is not writable by UID 1000"):
        containers.check_folder("x", tmp_path / "new")
    monkeypatch.setattr(containers.os, "getuid", lambda: 1000)
    containers.check_folder("x", tmp_path / "new")
    assert not (tmp_path / "new").exists()  # checked, not made


class _Container:
    def __init__(self, events: list[str], *, gone: bool):
        self.events, self.gone = events, gone

    def logs(self, **kwargs: Any) -> list[bytes]:
        self.events.append(f"logs follow={kwargs.get('follow')}")
        return [b"step line\n"]

    def wait(self) -> dict[str, int]:
        self.events.append("wait")
        return {"StatusCode": 3}

    def remove(self, force: bool) -> None:
        import docker

        self.events.append(f"remove force={force}")
        if self.gone:  # what Podman answers for a container it already removed
            raise docker.errors.APIError("container abc does not exist in database")


class _Client:
    def __init__(self, *, gone: bool = False):
        self.events: list[str] = []
        self.run_kwargs: dict[str, Any] = {}
        self.gone = gone
        self.images = self

    def get(self, image: str) -> None:
        self.events.append(f"image {image}")

    def run(self, **kwargs: Any) -> _Container:
        self.run_kwargs = kwargs
        return _Container(self.events, gone=self.gone)

    @property
    def containers(self) -> _Client:
        return self


@pytest.mark.parametrize("gone", [False, True])
def test_run_container_keeps_the_container_until_its_status_is_read(gone: bool, capsys) -> None:
    client = _Client(gone=gone)
    status = containers.run_container(client, "reg/img", ["python", "x"], {"/p": {}},
                                      user="1000:1000", auto_remove=True)
    assert status == 3
    assert client.run_kwargs["auto_remove"] is False and client.run_kwargs["detach"] is True
    assert client.run_kwargs["image"] == "reg/img:latest"
    assert client.run_kwargs["user"] == "1000:1000"
    assert client.events == ["image reg/img:latest", "logs follow=True", "wait",
                             "remove force=True"]
    assert "step line" in capsys.readouterr().out


def test_own_container_loop_is_in_place_only_during_a_run() -> None:
    from kfp.local import docker_task_handler

    kept = docker_task_handler.run_docker_container
    with containers.own_container_loop():
        assert docker_task_handler.run_docker_container is containers.run_container
    assert docker_task_handler.run_docker_container is kept


def test_run_local_docker_builds_every_step_on_the_image(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What run-local hands kfp.local: the DockerRunner and a pipeline on --image only."""
    import kfp.local
    from kfp.local import config as local_config

    from stablerep.kfp import local
    from stablerep.kfp.params import recipe_params

    monkeypatch.setattr(containers, "check_engine", lambda: None)
    monkeypatch.setattr(local, "_run", lambda fn, params: fn)
    image = "registry.example.com/stablerep:dev"
    fn = local.run_local({**recipe_params("demo"), "train_backend": "local",
                          "data_root": str(tmp_path / "root")}, runner="docker", image=image)
    executors = fn.pipeline_spec.deployment_spec["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {image}
    runner = local_config.LocalExecutionConfig.instance.runner
    assert isinstance(runner, kfp.local.DockerRunner)
    assert runner.container_run_args["mounts"][0]["Source"] == str(tmp_path / "root")
    assert local_config.LocalExecutionConfig.instance.pipeline_root == str(tmp_path / "root" /
                                                                           "kfp")


def test_run_local_docker_hands_the_steps_an_absolute_data_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative data root (the demo's ./data/demo) reaches the steps as the absolute folder
    that is mounted: inside a container a relative path would resolve under the image's
    working directory instead."""
    from stablerep.kfp import local
    from stablerep.kfp.params import recipe_params

    monkeypatch.setattr(containers, "check_engine", lambda: None)
    monkeypatch.setattr(local, "_run", lambda fn, params: params)
    monkeypatch.chdir(tmp_path)
    params = local.run_local({**recipe_params("demo"), "train_backend": "local",
                              "data_root": "./data/demo"}, runner="docker", image="img:1")
    assert params["data_root"] == str(tmp_path / "data" / "demo")
    kept = local.run_local({**recipe_params("demo"), "train_backend": "local",
                            "data_root": "./data/demo"})
    assert kept["data_root"] == "./data/demo"  # the subprocess runner shares the cwd
