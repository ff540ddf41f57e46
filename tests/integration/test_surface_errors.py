"""Bad input to the newer surfaces, through the real CLI: one ``error:`` line, exit 2, nothing
written.

The surfaces: ``stablerep pipeline compile|submit|run-local``, ``stablerep k8s render|launch``,
``stablerep repro`` and ``--set`` on the newer config fields. One group per class of bad input:
pipeline parameters checked before a KFP endpoint is contacted; an endpoint or API server that
refuses the connection (a loopback port nobody listens on); output files of ``compile`` and
their all-or-nothing publication; Kubernetes' own rules applied offline by ``render``;
kubeconfig problems; ``run-local``'s data_root and a failing step's own error; the repro plan;
non-finite floats and model kwargs that cannot build a ViT; contract files of the wrong types.
Each asserts the exit status, that the last stderr line is the only ``error:`` line and names
the input, that no traceback is printed, and that the working folder is unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = str(ROOT / "pipelines" / "stablerep_pipeline.yaml")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": "/nonexistent-home",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = _env()
    env.pop("KUBECONFIG", None)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run([sys.executable, "-m", "stablerep.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _listing(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``root``, hidden ones included."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """Assert the one-line failure form and return the ``error:`` line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-3000:],
                                    result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert lines[-1] == errors[0], result.stderr[-3000:]
    assert len(errors[0]) < 500, errors[0]
    return errors[0]


def _dead_port() -> int:
    """A loopback port nobody listens on (bound, read, closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working folder holding a regular file ``afile`` where outputs might go."""
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _check(work: Path, args: list[str], needle: str) -> str:
    before = _listing(work)
    line = _one_error_line(_cli(*args, cwd=work))
    assert needle in line, line
    assert _listing(work) == before  # nothing published, staged or created
    return line


# ---------------------------------------------------------------------------- submit

SUBMIT_PARAMS = {
    "epochs-zero": (["--param", "epochs=0"],
                    "error: parameter epochs (train.epochs: got 0.0, expected a value > 0)"),
    "epochs-nan": (["--param", "epochs=NaN"],
                   "error: parameter epochs (train.epochs: got nan, expected a finite number)"),
    "data-root-ftp": (["--param", "data_root=ftp://x"],
                      "error: parameter data_root: got 'ftp://x' (scheme ftp://), expected "
                      "gs://bucket/prefix"),
    "data-root-no-bucket": (["--param", "data_root=gs:///x"],
                            "error: parameter data_root: got 'gs:///x', which names no bucket"),
    "unknown-recipe": (["--recipe", "nosuch"], "error: recipe 'nosuch': not a built-in recipe"),
    "toleration-operator": (["--param", 'tolerations=[{"key": "a", "operator": "Sometimes"}]'],
                            "error: parameter tolerations[0].operator: got 'Sometimes', "
                            "expected Equal or Exists"),
    "image": (["--param", "image=Not:An:Image!!"],
              "error: parameter image: got 'Not:An:Image!!', expected an image reference"),
    "node-selector-key": (["--param", 'node_selector={"a b": "x"}'],
                          "error: parameter node_selector: key 'a b' is not a valid label key"),
}


@pytest.mark.parametrize("case", list(SUBMIT_PARAMS))
def test_submit_checks_every_parameter_before_contacting_the_endpoint(case: str,
                                                                       work: Path) -> None:
    args, needle = SUBMIT_PARAMS[case]
    host = f"http://127.0.0.1:{_dead_port()}"  # were it contacted, the error would name it
    line = _check(work, ["pipeline", "submit", "--host", host, "--experiment", "e",
                         "--package", PACKAGE, *args], needle)
    assert line.startswith(needle) and host not in line, line


def test_submit_to_an_endpoint_that_refuses_names_it(work: Path) -> None:
    host = f"http://127.0.0.1:{_dead_port()}"
    line = _check(work, ["pipeline", "submit", "--host", host, "--experiment", "e",
                         "--package", PACKAGE], f"error: --host {host}: cannot reach the "
                                                "Kubeflow Pipelines API (")
    assert "Connection refused" in line and "check the URL, that the server runs" in line


def test_submit_to_a_host_that_is_not_a_url(work: Path) -> None:
    _check(work, ["pipeline", "submit", "--host", "localhost:8080", "--experiment", "e",
                  "--package", PACKAGE],
           "error: --host: got 'localhost:8080', expected an http(s) URL")


# ---------------------------------------------------------------------------- compile


def _folder_yaml(w: Path) -> list[str]:
    (w / "d.yaml").mkdir()
    return ["--out", "d.yaml"]


COMPILE = {
    "out-is-a-folder": (_folder_yaml, "error: --out: d.yaml is a folder, expected a file"),
    "out-without-yaml": (lambda w: ["--out", "pipeline"],
                         "error: --out: got 'pipeline', expected a file name ending in .yaml"),
    "out-empty": (lambda w: ["--out", ""], "error: --out: got '', expected a file name"),
    "out-under-a-file": (lambda w: ["--out", "afile/p.yaml"],
                         "error: --out: afile/p.yaml runs through afile, a regular file"),
    "parallelism-huge": (lambda w: ["--out", "p.yaml", "--parallelism",
                                    "99999999999999999999"],
                         "error: --parallelism: got 99999999999999999999, expected 1 to "
                         "2147483647"),
    "image": (lambda w: ["--out", "p.yaml", "--image", "not an image"],
              "error: --image: got 'not an image', expected an image reference"),
    "cpu-image": (lambda w: ["--out", "p.yaml", "--cpu-image", "Bad:Image"],
                  "error: --cpu-image: got 'Bad:Image', expected an image reference"),
    "cuda-image": (lambda w: ["--out", "p.yaml", "--image", "a/b:1", "--cuda-image", "x y"],
                   "error: --cuda-image: got 'x y', expected an image reference"),
    # all or nothing: the pipeline YAML is not written when the manifest path is bad
    "kubernetes-under-a-file": (lambda w: ["--out", "out/p.yaml", "--kubernetes",
                                           "afile/k.yaml"],
                                "error: --kubernetes: afile/k.yaml runs through afile"),
    "kubernetes-same-as-out": (lambda w: ["--out", "p.yaml", "--kubernetes", "p.yaml"],
                               "error: --kubernetes: p.yaml is also --out"),
}


@pytest.mark.parametrize("case", list(COMPILE))
def test_compile_checks_its_outputs_and_image_before_writing(case: str, work: Path) -> None:
    prepare, needle = COMPILE[case]
    _check(work, ["pipeline", "compile", *prepare(work)], needle)


def test_compile_writes_both_files_and_no_temporary_one(work: Path) -> None:
    result = _cli("pipeline", "compile", "--out", "out/p.yaml", "--kubernetes", "out/k.yaml",
                  cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (work / "out").iterdir()) == ["k.yaml", "p.yaml"]


# ---------------------------------------------------------------------------- k8s render

RENDER = {
    "toleration-without-key": ({"cluster": {"pod": {"tolerations": [
        {"operator": "Equal", "value": "x"}]}}}, "error: cluster.pod.tolerations[0].key: missing"),
    "toleration-operator": ({"cluster": {"pod": {"tolerations": [
        {"key": "a", "operator": "Sometimes"}]}}},
        "error: cluster.pod.tolerations[0].operator: got 'Sometimes', expected Equal or Exists"),
    "toleration-exists-with-value": ({"generation": {"pod": {"tolerations": [
        {"key": "a", "operator": "Exists", "value": "x"}]}}},
        "error: generation.pod.tolerations[0].value: got 'x', expected none with operator "
        "Exists"),
    "toleration-seconds-soon": ({"cluster": {"pod": {"tolerations": [
        {"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": "soon"}]}}},
        "error: cluster.pod.tolerations[0].tolerationSeconds: got 'soon', expected an integer"),
    "toleration-seconds-without-noexecute": ({"cluster": {"pod": {"tolerations": [
        {"key": "a", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}]}}},
        "error: cluster.pod.tolerations[0].tolerationSeconds: set with effect 'NoSchedule'"),
    "toleration-effect": ({"cluster": {"pod": {"tolerations": [
        {"key": "a", "effect": "Sometimes"}]}}},
        "error: cluster.pod.tolerations[0].effect: got 'Sometimes', expected one of NoSchedule"),
    "image": ({"cluster": {"pod": {"image": "Not:An:Image!!"}}},
              "error: cluster.pod.image: got 'Not:An:Image!!', expected an image reference"),
    "label-key": ({"cluster": {"labels": {"a b": "x"}}},
                  "error: cluster.labels: key 'a b' is not a valid label key"),
    "label-value": ({"generation": {"labels": {"team": "a b"}}},
                    "error: generation.labels.team: got 'a b', expected a label value"),
    "node-selector-key": ({"generation": {"pod": {"node_selector": {"a b": "x"}}}},
                          "error: generation.pod.node_selector: key 'a b' is not a valid label "
                          "key"),
    "env-name": ({"generation": {"pod": {"env": {"": "x"}}}},
                 "error: generation.pod.env: variable name '' is not valid"),
    "shards-beyond-int32": ({"generation": {"shards": 10**20}},
                            f"error: generation.shards: got {10**20}, expected at most "
                            "2147483647"),
    "namespace": ({"generation": {"namespace": "Bad_NS"}},
                  "error: generation.namespace: got 'Bad_NS', expected a DNS-1123 label"),
    "service-account": ({"cluster": {"pod": {"service_account": "Bad SA"}}},
                        "error: cluster.pod.service_account: got 'Bad SA', expected a DNS-1123 "
                        "subdomain"),
}


@pytest.mark.parametrize("case", list(RENDER))
def test_render_applies_kubernetes_rules_before_writing(case: str, work: Path) -> None:
    recipe, needle = RENDER[case]
    _write(work / "c.yaml", yaml.safe_dump(recipe))
    _check(work, ["k8s", "render", "--config", "c.yaml", "--out", "out"], needle)


def test_render_publishes_no_file_when_one_destination_is_blocked(work: Path) -> None:
    _write(work / "c.yaml", "cluster: {}\n")
    _write(work / "out" / "overlays" / "example", "a file where a folder goes\n")
    _check(work, ["k8s", "render", "--config", "c.yaml", "--out", "out"],
           "error: --out out: out/overlays/example is a file, expected a folder")


# ---------------------------------------------------------------------------- k8s launch


def _kubeconfig(server: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "f",
        "clusters": [{"name": "f", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "f", "context": {"cluster": "f", "user": "u", "namespace": "ns"}}]})


LAUNCH: dict[str, tuple[Callable[[Path], str], str]] = {
    "missing": (lambda w: "missing.yaml", "error: kubeconfig missing.yaml: no such file"),
    "a-folder": (lambda w: str((w / "kd").mkdir() or "kd"),
                 "error: kubeconfig kd: is a folder, expected a kubeconfig file"),
    "not-utf8": (lambda w: str(_write(w / "kc", b"clusters: caf\xe9\n").name),
                 "error: kubeconfig kc: not UTF-8 text"),
    "a-list": (lambda w: str(_write(w / "kc", "[1, 2]\n").name),
               "error: kubeconfig kc: got a YAML list, expected a mapping"),
    "server-not-a-url": (lambda w: str(_write(w / "kc", _kubeconfig("not a url")).name),
                         "error: kubeconfig kc: cluster server: got 'not a url', expected an "
                         "https URL"),
}


@pytest.mark.parametrize("case", list(LAUNCH))
def test_launch_names_the_kubeconfig_and_what_is_wrong(case: str, work: Path) -> None:
    _write(work / "c.yaml", "cluster: {data_root: gs://b/r}\n")
    prepare, needle = LAUNCH[case]
    _check(work, ["k8s", "launch", "--config", "c.yaml", "--kubeconfig", prepare(work)], needle)


def test_launch_to_an_api_server_that_refuses_names_it(work: Path) -> None:
    server = f"http://127.0.0.1:{_dead_port()}"
    _write(work / "c.yaml", "cluster: {data_root: gs://b/r}\n")
    _write(work / "kc", _kubeconfig(server))
    line = _check(work, ["k8s", "launch", "--config", "c.yaml", "--kubeconfig", "kc"],
                  f"error: API server {server}: cannot be reached (")
    assert "Connection refused" in line and "check the kubeconfig's server address" in line


def test_launch_checks_the_job_before_the_cluster(work: Path) -> None:
    _write(work / "c.yaml", "cluster: {data_root: gs://b/r, pod: {image: 'Not:An:Image!!'}}\n")
    _check(work, ["k8s", "launch", "--config", "c.yaml", "--kubeconfig", "missing.yaml"],
           "error: cluster.pod.image: got 'Not:An:Image!!'")


# ---------------------------------------------------------------------------- run-local

RUN_LOCAL = {
    "data-root-ftp": (["--param", "data_root=ftp://x"],
                      "error: parameter data_root: got 'ftp://x' (scheme ftp://)"),
    "data-root-empty": (["--data-root", ""], "error: parameter data_root: got '', expected"),
    "data-root-under-a-file": (["--data-root", "afile/root"],
                               "error: parameter data_root: afile/root runs through afile"),
}


@pytest.mark.parametrize("case", list(RUN_LOCAL))
def test_run_local_checks_data_root_before_any_step(case: str, work: Path) -> None:
    args, needle = RUN_LOCAL[case]
    _check(work, ["pipeline", "run-local", *args], needle)


def _root_only_folder(w: Path) -> list[str]:
    (w / "mine").mkdir(mode=0o755)
    os.chown(w / "mine", 0, 0)
    return ["--data-root", "mine"]


IMAGE = "docker.io/stablerep/stablerep:0.1.0-cpu"
RUN_LOCAL_DOCKER = {
    "runner-unknown": (lambda w: ["--runner", "kubernetes"],
                       "error: --runner: got 'kubernetes', expected one of subprocess, docker"),
    "docker-without-image": (lambda w: ["--runner", "docker"],
                             "error: --image: got '', expected the image every step runs in"),
    "image-without-docker": (lambda w: ["--image", IMAGE],
                             f"error: --image: got '{IMAGE}' with --runner subprocess"),
    "docker-bad-image": (lambda w: ["--runner", "docker", "--image", "Not An Image",
                                    "--data-root", "r"],
                         "error: --image: got 'Not An Image', expected an image reference"),
    "docker-bucket-root": (lambda w: ["--runner", "docker", "--image", IMAGE, "--data-root",
                                      "gs://b/run", "--pipeline-root", "kfp"],
                           "error: parameter data_root: got 'gs://b/run'; --runner docker "
                           "mounts the data root"),
    "docker-root-not-for-uid-1000": (_root_only_folder,
                                     "is not writable by UID 1000 (the images' user)"),
}


@pytest.mark.parametrize("case", list(RUN_LOCAL_DOCKER))
def test_run_local_checks_runner_and_image_before_any_step(case: str, work: Path) -> None:
    prepare, needle = RUN_LOCAL_DOCKER[case]
    args = prepare(work)
    if case == "docker-root-not-for-uid-1000":
        if os.getuid() != 0:
            pytest.skip("making a folder only root can write needs root")
        args = ["--runner", "docker", "--image", IMAGE, *args]
    line = _check(work, ["pipeline", "run-local", *args], needle)
    if case == "docker-root-not-for-uid-1000":
        assert f"{work / 'mine'}" in line, line


def test_run_local_docker_without_an_engine_names_it(work: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    socket_path = work / "no-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")
    _check(work, ["pipeline", "run-local", "--runner", "docker", "--image", IMAGE,
                  "--data-root", "r"],
           f"error: --runner docker: no container engine answers at unix://{socket_path}")
    assert not (work / "r").exists()


def test_run_local_reports_the_failing_steps_own_error(work: Path) -> None:
    missing = work / "missing.tsv"
    result = _cli("pipeline", "run-local", "--data-root", "root", "--param",
                  "caption_source=files", "--param", f"caption_inputs={json.dumps([str(missing)])}",
                  cwd=work)
    line = _one_error_line(result)
    assert line == f"error: step captions: {missing}: no such file, folder or bucket", line
    assert not (work / "root" / "captions").exists()


# ---------------------------------------------------------------------------- repro

REPRO = {
    "negative-seed": (["--seeds", "-1"], "error: repro.seeds[0]: got -1, expected a value >= 0"),
    "huge-seed": (["--seeds", str(2**64)], "error: repro.seeds[0]: got 18446744073709551616, "
                                           "expected a value <= 4294967295"),
    "too-few-images": (["--set", "generate.images_per_caption=4"],
                       "error: generate.images_per_caption: got 4, expected >= 8 (arm "
                       "stablerep_k8 reads"),
    "too-few-captions": (["--set", "captions.num_captions=20"],
                         "error: captions.num_captions: got 20, expected >= 64 (arm simclr"),
}


@pytest.mark.parametrize("case", list(REPRO))
def test_repro_checks_its_whole_plan_before_any_work(case: str, work: Path) -> None:
    args, needle = REPRO[case]
    _check(work, ["repro", "--data-root", "root", *args], needle)


# ---------------------------------------------------------------------------- config fields

CONFIG = {
    "oversample-nan": (["captions", "--set", "captions.source=procedural", "--set",
                        "captions.procedural.oversample=.nan", "--out", "out"],
                       "error: captions.procedural.oversample: got nan, expected a finite "
                       "number"),
    "oversample-inf": (["captions", "--set", "captions.procedural.oversample=.inf", "--out",
                        "out"], "error: captions.procedural.oversample: got inf, expected a "
                                "finite number"),
    "cache-mb-nan": (["train", "--set", "train.cache_mb=.nan", "--out", "out"],
                     "error: train.cache_mb: got nan, expected a finite number"),
    "depth-negative": (["train", "--set", "train.model_kwargs.depth=-3", "--out", "out"],
                       "error: train.model_kwargs.depth: got -3, expected a positive integer"),
    "patch-size-zero": (["train", "--set", "train.model_kwargs.patch_size=0", "--out", "out"],
                        "error: train.model_kwargs.patch_size: got 0, expected a positive "
                        "integer"),
    "image-below-patch": (["train", "--set", "train.model_kwargs.patch_size=16", "--set",
                           "train.image_size=8", "--out", "out"],
                          "error: train.image_size: got 8, expected a multiple of the patch "
                          "size 16"),
}


@pytest.mark.parametrize("case", list(CONFIG))
def test_config_fields_refuse_values_that_cannot_work(case: str, work: Path) -> None:
    args, needle = CONFIG[case]
    _check(work, args, needle)


# ---------------------------------------------------------------------------- contracts


def test_a_captions_manifest_of_the_wrong_types_is_refused_where_read(work: Path) -> None:
    result = _cli("captions", "--num-captions", "4", "--out", "caps", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = work / "caps" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "num_shards": "1"}))
    _check(work, ["generate", "--captions", "caps", "--out", "out", "--backend", "tiny",
                  "--device", "cpu"], "caps/manifest.json: 'num_shards' is str; expected int")


# ---------------------------------------------------------------------------- silent endpoints


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (into its backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_submit_to_an_endpoint_that_never_answers_names_it(
        silent_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from stablerep.errors import ConfigError
    from stablerep.kfp import submit

    monkeypatch.setattr(submit, "ENDPOINT_TIMEOUT_S", 0.5)
    host = f"http://127.0.0.1:{silent_port}"
    with pytest.raises(ConfigError) as info:
        submit.submit(host, "e", {}, package=PACKAGE)
    assert str(info.value).startswith(f"--host {host}: cannot reach the Kubeflow Pipelines API")
    assert "timed out" in str(info.value)


def test_launch_to_an_api_server_that_never_answers_names_it(
        silent_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stablerep.k8s import access
    from stablerep.k8s.launcher import LaunchError, api_client

    monkeypatch.setattr(access, "PROBE_TIMEOUT_S", (0.5, 0.5))
    server = f"http://127.0.0.1:{silent_port}"
    kubeconfig = _write(tmp_path / "kc", _kubeconfig(server))
    with pytest.raises(LaunchError) as info:
        api_client(kubeconfig=str(kubeconfig))
    assert str(info.value).startswith(f"API server {server}: cannot be reached (")
    assert "timed out" in str(info.value)


def test_a_steps_internal_error_keeps_its_traceback_and_a_user_error_is_held_back() -> None:
    import io

    from stablerep.kfp.local import _failed_task, _StepOutput

    out = io.StringIO()
    steps = _StepOutput(out)
    steps.write("    step log line\n    Traceback (most recent call last):\n"
                '      File "x.py", line 1, in f\n    stablerep.errors.InputError: bad.tsv: '
                "missing\n    after\n")
    assert steps.user_error == "bad.tsv: missing"
    assert out.getvalue() == "    step log line\n    after\n"
    steps.write("    Traceback (most recent call last):\n      File \"y.py\", line 2, in g\n"
                "    KeyError: 'k'\n")
    assert "Traceback" in out.getvalue() and "KeyError: 'k'" in out.getvalue()
    assert _failed_task("Pipeline \x1b[95m'stablerep'\x1b[0m finished with status FAILURE. "
                        "Inner task failed: \x1b[96m'generate-shard'\x1b[0m inside "
                        "'for-loop-1'.") == "generate-shard"
