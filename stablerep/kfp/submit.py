"""``stablerep pipeline submit``: a run of the compiled pipeline on a Kubeflow Pipelines server.

Everything is checked on this machine first (:func:`check_submission`); then ``kfp.Client``
creates the run, sending the spec inline or as a version of an uploaded pipeline.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stablerep.errors import ConfigError, InputError
from stablerep.kfp.compile import PIPELINE_YAML
from stablerep.kfp.params import PIPELINE_NAME, check_params
from stablerep.kfp.validation import check_data_root, check_run, cluster_config


def _uploaded_version(client: Any, package: Path, pipeline: str) -> tuple[str, str]:
    """(pipeline id, version id) of ``package`` under ``pipeline``: uploaded when new.

    A version is named after the package's content (``<pipeline>-<sha256[:12]>``), so
    submitting the same compiled file again reuses it.
    """
    import hashlib

    version = f"{pipeline}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"
    pipeline_id = client.get_pipeline_id(pipeline)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline).pipeline_id
    by_name = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS",
                                          "string_value": version}]})
    found = client.list_pipeline_versions(pipeline_id, filter=by_name).pipeline_versions or []
    if found:
        return pipeline_id, found[0].pipeline_version_id
    made = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id)
    return pipeline_id, made.pipeline_version_id


def submit(host: str, experiment: str, params: Mapping[str, Any], *,
           package: str | Path = PIPELINE_YAML, run_name: str = "",
           namespace: str | None = None, pipeline: str = "",
           service_account: str = "") -> tuple[str, str]:
    """Create a run of the compiled pipeline; returns (run id, its UI URL).

    Everything is checked before the endpoint is contacted: the parameters by the rules the
    pipeline's validate step applies (:func:`~stablerep.kfp.validation.check_run`), the training job's pod settings,
    data_root, the package and the endpoint URL. An endpoint that refuses, times out or
    answers with an error is a :class:`ConfigError` naming it.

    Args:
        host: the KFP API endpoint, e.g. http://localhost:8080.
        experiment: experiment name (created when missing).
        params: runtime parameters (name -> value); unset ones keep the pipeline defaults.
        package: the compiled pipeline YAML.
        run_name: the run's display name (default: stablerep-<timestamp>).
        namespace: the Kubeflow profile namespace (multi-user installs).
        pipeline: upload the package as a version of this pipeline (reused when the same
            package was uploaded before) and run that version; "" = send the spec inline.
        service_account: the Kubernetes service account the run's pods use ("" = the KFP
            server's default); the launcher step creates the training job through it.
    """
    check_submission(host, params, package)
    if namespace is not None:
        from stablerep.k8s.rules import check_dns_label

        check_dns_label("--namespace", namespace)
    if service_account:
        from stablerep.k8s.rules import check_subdomain

        check_subdomain("--service-account", service_account)
    if not experiment.strip():
        raise ConfigError("--experiment: got '', expected an experiment name")
    package = Path(package)
    with _endpoint_errors(host):
        return _create_run(host, experiment, params, package=package, run_name=run_name,
                           namespace=namespace, pipeline=pipeline,
                           service_account=service_account)


def check_submission(host: str, params: Mapping[str, Any], package: str | Path) -> None:
    """Every local check of :func:`submit`, in the order a user would fix them."""
    values = check_params(params)
    check_run(values, local=False, data=False)  # the data cache is the pods', checked there
    cluster_config(values)  # the pods' image, node selector and tolerations, every backend
    check_data_root(values["data_root"], local=False)
    package = Path(package)
    if not package.is_file():
        raise InputError(f"--package {package}: no compiled pipeline there; run `make compile`")
    check_endpoint("--host", host)


def check_endpoint(flag: str, url: str) -> None:
    """An http(s) URL with a host (nothing is contacted)."""
    from urllib.parse import urlparse

    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{flag}: got {url!r}, expected an http(s) URL of the Kubeflow "
                          "Pipelines API, e.g. http://localhost:8080")


#: Seconds the connect, and then the answer, of the KFP API's health check may take.
ENDPOINT_TIMEOUT_S = 30.0


@contextlib.contextmanager
def _endpoint_errors(host: str) -> Iterator[None]:
    """An endpoint that cannot be reached or answers with an error: one line naming it."""
    import urllib3

    try:
        from kfp_server_api.exceptions import ApiException
    except ImportError:  # pragma: no cover - kfp brings it
        ApiException = urllib3.exceptions.HTTPError  # noqa: N806
    try:
        _probe(host)  # the kfp client waits forever on a silent endpoint
        yield
    except urllib3.exceptions.HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"--host {host}: cannot reach the Kubeflow Pipelines API "
                          f"({_first_line(reason)}); check the URL, that the server runs and "
                          "that a port-forward to it is open") from None
    except ApiException as e:
        raise ConfigError(f"--host {host}: the Kubeflow Pipelines API answered {e.status} "
                          f"{e.reason}; check the URL, --namespace and your access") from None
    except TimeoutError as e:  # kfp's health check gave up after its retries
        raise ConfigError(f"--host {host}: the Kubeflow Pipelines API is not healthy "
                          f"({_first_line(e)}); check the URL and the server") from None


def _probe(host: str) -> None:
    """GET the health endpoint once, with timeouts; any HTTP answer counts as reachable."""
    import urllib3

    timeout = urllib3.Timeout(connect=ENDPOINT_TIMEOUT_S, read=ENDPOINT_TIMEOUT_S)
    urllib3.PoolManager().request("GET", f"{host.rstrip('/')}/apis/v2beta1/healthz",
                                  timeout=timeout, retries=False, redirect=False)


def _first_line(value: Any) -> str:
    text = str(value).strip().splitlines()
    return text[0] if text else type(value).__name__


def _create_run(host: str, experiment: str, params: Mapping[str, Any], *, package: Path,
                run_name: str, namespace: str | None, pipeline: str,
                service_account: str) -> tuple[str, str]:
    import kfp

    client = kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)
    try:
        exp = client.create_experiment(experiment, namespace=namespace)
    except Exception:  # noqa: BLE001 - the experiment exists already (a race)
        exp = client.get_experiment(experiment_name=experiment, namespace=namespace)
    name = run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"
    if pipeline:
        pipeline_id, version_id = _uploaded_version(client, package, pipeline)
        run = client.run_pipeline(exp.experiment_id, name, params=dict(params),
                                  pipeline_id=pipeline_id, version_id=version_id,
                                  service_account=service_account or None)
    else:
        run = client.create_run_from_pipeline_package(
            str(package), arguments=dict(params), run_name=name,
            experiment_id=exp.experiment_id, service_account=service_account or None)
    return run.run_id, f"{host.rstrip('/')}/#/runs/details/{run.run_id}"

