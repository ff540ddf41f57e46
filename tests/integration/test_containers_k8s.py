"""The rendered Kubernetes pods of ``k8s/base``, started in the built image as a cluster starts
them: the exact command, args, env, volume mounts and security context of each pod template
(UID 1000, read-only root, ``/tmp`` an emptyDir with HOME under it), with the environment the
controllers inject and CPU-sized recipe overrides.

- the Indexed generation Job: two pods (``JOB_COMPLETION_INDEX`` 0 and 1) each draw their shard
  into the shared data root;
- the PyTorchJob: a Master and a Worker container with the Training Operator's variables
  (``MASTER_ADDR``, ``PET_NNODES``, ``PET_NODE_RANK`` ...) rendezvous over a container network
  and train, checkpointing to the data root; the Worker is killed mid-run and the Master ends
  with the lost-peer line and status 138; both are started again, as ``restartPolicy:
  ExitCode`` does, and training resumes from latest.json to the last step;
- the TrainJob: its node containers with what the ``torch-distributed`` runtime injects
  (``PET_*``) train to the end.

Needs podman and the image (``make images IMAGES=cpu``; ``STABLEREP_TEST_IMAGE`` names another);
skips saying which is missing. Waits are on conditions (a checkpoint, an exit), with limits that
are hang guards sized for a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stablerep.captions.stage import make_captions
from stablerep.config import CaptionsConfig, GenerateConfig
from stablerep.errors import EXIT_PEER_LOST
from stablerep.generation.runner import generate
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE

from ._pods import Pod, engine, image_exists

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "k8s" / "base"
IMAGE = os.environ.get("STABLEREP_TEST_IMAGE") or CPU_IMAGE
UID = 1000
MOUNT = "/data"  # where the data root is mounted (a bucket on a cluster)
MAX_STEPS = 24
RUN_TIMEOUT_S = 420  # hang guards, not expectations
# The CPU-sized recipe every pod reads from the data root (the manifests' STABLEREP_RECIPE).
RECIPE = {
    "captions": {"source": "procedural", "num_captions": 32, "num_shards": 2, "seed": 0},
    "generate": {"backend": "procedural", "images_per_caption": 3, "height": 32, "width": 32,
                 "stored_size": 0, "image_format": "png", "batch_size": 32,
                 "encode_workers": 1},
    "train": {"method": "stablerep", "model": "vit_tiny_patch16_224",
              "model_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
              "image_size": 32, "head_hidden_dim": 64, "head_out_dim": 32,
              "images_per_caption": 2, "captions_per_batch": 8, "max_steps": MAX_STEPS,
              "warmup_steps": 2, "precision": "fp32", "num_workers": 0, "log_every": 1,
              "checkpoint_every": 4, "tensorboard": False, "dist_timeout_s": 60},
}


@pytest.fixture(scope="module")
def podman() -> str:
    found = engine()
    if not found:
        pytest.skip("no container engine: podman is not installed or `podman info` fails "
                    "(.ci/run installs and configures it)")
    if not image_exists(found, IMAGE):
        pytest.skip(f"no image {IMAGE}: build it with `make images IMAGES=cpu` (.ci/run does)")
    return found


def _data_root(path: Path, *, shards: bool) -> Path:
    """A data root owned by UID 1000 with the recipe and captions (and the shards)."""
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    make_captions(CaptionsConfig(**RECIPE["captions"]), str(path / "captions"))
    if shards:
        generate(GenerateConfig(**RECIPE["generate"]), captions=str(path / "captions"),
                 out=str(path / "images"))
    for folder, _, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chown(name, UID, UID)
    return path


def _template(kind_dir: str, role: str = "") -> tuple[dict, dict]:
    """(container, pod spec) of a rendered manifest's pod template."""
    docs = [d for f in sorted((BASE / kind_dir).glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]
    job = docs[0]
    if job["kind"] == "PyTorchJob":
        spec = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
    else:
        spec = job["spec"]["template"]["spec"]
    return spec["containers"][0], spec


def _trainjob_pod() -> tuple[dict, dict, dict]:
    """(container, pod spec, trainer) of a TrainJob node: the runtime's template, the
    TrainJob's runtime patch and its trainer (image, command, args, env) merged."""
    runtime = yaml.safe_load((BASE / "training-runtime" /
                              "clustertrainingruntime.yaml").read_text())
    job = yaml.safe_load((BASE / "training-trainjob" / "trainjob.yaml").read_text())
    node = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
                if r["name"] == "node")
    spec = node["template"]["spec"]["template"]["spec"]
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    patched = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = {**spec["containers"][0], **patched["containers"][0]}
    trainer = job["spec"]["trainer"]
    container.update({k: trainer[k] for k in ("command", "args", "env") if k in trainer})
    pod = {**spec, **{k: v for k, v in patched.items() if k != "containers"}}
    return container, pod, trainer


class Containers:
    """Containers of one test on one network, all removed at the end."""

    def __init__(self, podman: str) -> None:
        self.podman, self.tag = podman, uuid.uuid4().hex[:8]
        self.network = f"stablerep-test-{self.tag}"
        self.names: list[str] = []
        self._call("network", "create", self.network)

    def _call(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.podman, *args], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, check=check)

    def start(self, pod: Pod, name: str, data: Path) -> str:
        name = f"{name}-{self.tag}"
        self.names.append(name)
        extra = ["--network", self.network, "--volume", f"{data}:{MOUNT}"]
        self._call(*pod.run_args(image=IMAGE, name=name, extra=extra))
        return name

    def wait(self, name: str) -> int:
        return int(self._call("wait", name).stdout.strip().splitlines()[-1])

    def logs(self, name: str) -> str:
        run = self._call("logs", name, check=False)
        return run.stdout + run.stderr

    def kill(self, name: str) -> None:
        self._call("kill", "--signal", "KILL", name)

    def close(self) -> None:
        for name in self.names:
            self._call("rm", "--force", name, check=False)
        self._call("network", "rm", "--force", self.network, check=False)


@pytest.fixture()
def containers(podman: str) -> Iterator[Containers]:
    group = Containers(podman)
    yield group
    group.close()


def _pod_env() -> dict[str, str]:
    """The CPU-sized recipe and the mounted data root, in place of the manifests' values."""
    return {"STABLEREP_RECIPE": f"{MOUNT}/recipe.yaml", "STABLEREP_DATA_ROOT": MOUNT,
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


def _succeeded(group: Containers, name: str) -> str:
    status, text = group.wait(name), group.logs(name)
    assert status == 0, f"{name} exited {status}:\n{text[-4000:]}"
    return text


def test_indexed_generation_pods_draw_their_shards(containers: Containers,
                                                   tmp_path: Path) -> None:
    data = _data_root(tmp_path / "data", shards=False)
    container, spec = _template("generation")
    names = [containers.start(Pod(container, spec, {**_pod_env(),
                                                    "JOB_COMPLETION_INDEX": str(index)}),
                              f"generate-{index}", data) for index in (0, 1)]
    for name in names:
        _succeeded(containers, name)
    shards = sorted(p.name for p in (data / "images").iterdir() if p.name.endswith(".tar"))
    assert len(shards) == 2, sorted(p.name for p in (data / "images").iterdir())
    assert {(data / "images" / s).stat().st_uid for s in shards} == {UID}


def _operator_env(role: str, master: str) -> dict[str, str]:
    """What the Training Operator injects into a 2-replica PyTorchJob with nprocPerNode 1."""
    rank = "0" if role == "Master" else "1"
    return {"MASTER_ADDR": master, "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": rank,
            "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": rank,
            "PET_MASTER_ADDR": master, "PET_MASTER_PORT": "23456"}


def _latest_step(out: Path) -> int:
    try:
        latest = json.loads((out / "latest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(latest.get("step", 0))


def _start_pytorchjob(group: Containers, data: Path, attempt: int) -> dict[str, str]:
    names = {}
    master = f"master-{attempt}-{group.tag}"
    for role in ("Master", "Worker"):
        container, spec = _template("training-pytorchjob", role)
        env = {**_pod_env(), **_operator_env(role, master)}
        names[role] = group.start(Pod(container, spec, env), f"{role.lower()}-{attempt}", data)
    return names


def test_pytorchjob_pods_lose_a_peer_and_resume(containers: Containers, tmp_path: Path) -> None:
    data = _data_root(tmp_path / "data", shards=True)
    out = data / "train"
    first = _start_pytorchjob(containers, data, 0)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while _latest_step(out) < 8:  # two checkpoints in: the job is well under way
        assert time.monotonic() < deadline, containers.logs(first["Master"])[-4000:]
        time.sleep(0.5)
    containers.kill(first["Worker"])
    status, text = containers.wait(first["Master"]), containers.logs(first["Master"])
    assert status == EXIT_PEER_LOST, text[-4000:]
    assert "a peer process failed or stopped responding" in text, text[-4000:]
    killed_at = _latest_step(out)
    assert 8 <= killed_at < MAX_STEPS, killed_at
    again = _start_pytorchjob(containers, data, 1)
    logs = [_succeeded(containers, again[role]) for role in ("Master", "Worker")]
    assert _latest_step(out) == MAX_STEPS
    assert f"step {killed_at}" in logs[0] and "resum" in logs[0].lower(), logs[0][-4000:]


def test_trainjob_node_pods_train_to_the_end(containers: Containers, tmp_path: Path) -> None:
    data = _data_root(tmp_path / "data", shards=True)
    container, spec, trainer = _trainjob_pod()
    assert trainer["image"] == CUDA_IMAGE  # the release tag; the test runs it as IMAGE
    master = f"node-0-{containers.tag}"
    names = []
    for rank in (0, 1):  # the torch-distributed runtime's variables, 2 nodes x 1 process
        env = {**_pod_env(), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
               "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": master,
               "PET_MASTER_PORT": "29400"}
        names.append(containers.start(Pod(container, spec, env), f"node-{rank}", data))
    for name in names:
        _succeeded(containers, name)
    assert _latest_step(data / "train") == MAX_STEPS


def test_a_data_root_the_pod_user_cannot_write_is_one_error_line(containers: Containers,
                                                                  tmp_path: Path) -> None:
    data = _data_root(tmp_path / "data", shards=False)
    os.chown(data, 0, 0)
    data.chmod(0o755)  # readable, not writable by UID 1000
    container, spec = _template("generation")
    name = containers.start(Pod(container, spec, {**_pod_env(), "JOB_COMPLETION_INDEX": "0"}),
                            "generate-denied", data)
    status, text = containers.wait(name), containers.logs(name)
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1, text[-3000:]
    assert f"{MOUNT}/images: permission denied to UID {UID}; {MOUNT} is owned by UID 0" \
        in errors[0], errors[0]
    assert "Traceback" not in text and not (data / "images").exists()


def test_the_image_compiles_the_checked_in_pipeline(podman: str) -> None:
    """A user with only the image compiles the pipeline there (root read-only, UID 1000, no
    network): the YAML on standard output is the repository's compiled pipeline."""
    run = subprocess.run([podman, "run", "--rm", "--read-only", "--tmpfs", "/tmp",
                          "--user", f"{UID}:{UID}", "--env", "HOME=/tmp/home",
                          "--network", "none", IMAGE, "stablerep", "pipeline", "compile",
                          "--out", "-"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == (ROOT / "pipelines" / "stablerep_pipeline.yaml").read_text()
