"""Cluster access the launcher needs, checked before it relies on it.

A kubeconfig that is missing, a folder, not UTF-8, not a YAML mapping, or whose server is not
an https/http URL is named with what is wrong; an API server that refuses the connection or
does not answer in time is named with what to check. Each is a
:class:`~stablerep.errors.StablerepError` raised as the caller's error type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from stablerep.errors import StablerepError

#: Seconds to connect to and hear back from the API server in the reachability probe.
PROBE_TIMEOUT_S = (5.0, 15.0)


def kubeconfig_path(kubeconfig: str) -> Path:
    """The file the Kubernetes client reads: ``kubeconfig``, else $KUBECONFIG's first, else
    ~/.kube/config."""
    if kubeconfig:
        return Path(kubeconfig).expanduser()
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return Path(first or "~/.kube/config").expanduser()


def check_kubeconfig(path: Path, error: type[StablerepError]) -> dict[str, Any]:
    """Read ``path`` as a kubeconfig: a UTF-8 YAML mapping; returns it.

    Raises:
        error: naming the file and what is wrong with it.
    """
    where = f"kubeconfig {path}"
    if not path.exists():
        raise error(f"{where}: no such file; pass --kubeconfig, set KUBECONFIG, or run in a "
                    "pod with a service account")
    if path.is_dir():
        raise error(f"{where}: is a folder, expected a kubeconfig file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start}); expected a kubeconfig YAML "
                    "file") from None
    except OSError as e:
        raise error(f"{where}: cannot be read ({e.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise error(f"{where}: got a YAML {type(doc).__name__}, expected a mapping with "
                    "clusters, contexts and users")
    return doc


def check_server(server: Any, path: Path, error: type[StablerepError]) -> None:
    """The cluster's server is an https or http URL with a host."""
    try:
        parsed = urlparse(server) if isinstance(server, str) else None
        ok = parsed is not None and parsed.scheme in ("https", "http") and bool(parsed.hostname)
        ok = ok and (parsed.port or 0) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise error(f"kubeconfig {path}: cluster server: got {server!r}, expected an https URL "
                    "of the API server, e.g. https://203.0.113.10:6443")


def probe(api: Any, server: str, error: type[StablerepError]) -> None:
    """Ask the API server for its version: a refused or silent server fails here, named.

    An answer of any HTTP status counts as reachable (the calls that follow report access
    problems themselves).
    """
    import urllib3
    from kubernetes import client

    try:
        client.VersionApi(api).get_code(_request_timeout=PROBE_TIMEOUT_S)
    except client.exceptions.ApiException:
        return
    except (urllib3.exceptions.HTTPError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        text = str(reason).strip().splitlines()
        raise error(f"API server {server}: cannot be reached ({text[0] if text else reason}); "
                    "check the kubeconfig's server address, the network (VPN, port-forward) "
                    "and that the cluster runs") from None
