"""Start a rendered pod's container with podman as the kubelet would: its image, command,
args (with ``$(VAR)`` expanded from its env), env, volume mounts and security context.

Only what the manifests in ``k8s/`` use is translated: emptyDir volumes (``medium: Memory`` at
``/dev/shm`` becomes the container's shm size, others a tmpfs), ``runAsUser``/``runAsGroup``,
``readOnlyRootFilesystem``, ``allowPrivilegeEscalation: false`` and dropped capabilities. The
caller adds what a cluster adds: the operator's environment, the data root's volume, a network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def engine() -> str | None:
    """``podman`` when it is installed and answers ``podman info``; else None."""
    podman = shutil.which("podman")
    if not podman:
        return None
    info = subprocess.run([podman, "info"], capture_output=True, timeout=60, check=False)
    return podman if info.returncode == 0 else None


def image_exists(podman: str, image: str) -> bool:
    return subprocess.run([podman, "image", "exists", image], check=False).returncode == 0


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, others kept."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


@dataclass
class Pod:
    """One container of a pod template, ready to start."""

    container: dict[str, Any]
    pod_spec: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)  # overrides and injected variables

    def environment(self) -> dict[str, str]:
        base = {e["name"]: str(e["value"]) for e in self.container.get("env", [])}
        return {**base, **self.env}

    def _volumes(self) -> list[str]:
        volumes = {v["name"]: v for v in self.pod_spec.get("volumes", [])}
        args = []
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            empty = volume.get("emptyDir")
            assert empty is not None, f"volume {mount['name']}: only emptyDir is translated"
            if mount["mountPath"] == "/dev/shm":
                args += ["--shm-size", "256m"]  # CPU-sized: the manifest's sizeLimit is for GPUs
            else:
                args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
        return args

    def _security(self) -> list[str]:
        pod = self.pod_spec.get("securityContext", {})
        own = self.container.get("securityContext", {})
        args = []
        if "runAsUser" in pod:
            args += ["--user", f"{pod['runAsUser']}:{pod.get('runAsGroup', pod['runAsUser'])}"]
        if own.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if own.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in own.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        return args

    def run_args(self, *, image: str, name: str, extra: Sequence[str] = ()) -> list[str]:
        """``podman run`` arguments (detached) for this container under ``name``."""
        env = self.environment()
        command = [expand(c, env) for c in self.container.get("command", [])]
        args = [expand(a, env) for a in self.container.get("args", [])]
        assert command, "the container has no command: the image's CMD would run instead"
        flags = ["run", "--detach", "--name", name, "--hostname", name, *self._volumes(),
                 *self._security(), *extra]
        for key, value in env.items():
            flags += ["--env", f"{key}={value}"]
        return [*flags, "--entrypoint", command[0], image, *command[1:], *args]
