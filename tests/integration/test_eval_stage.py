"""The evaluation stage end to end with a randomly initialised tiny ViT at 32 px.

- `stablerep eval` (subprocess) on ``sklearn:digits`` with ``timm:vit_tiny_patch16_224`` and
  with a stablerep training folder (a checkpoint written by the trainer's checkpoint code):
  metrics.json (probe, few-shot, kNN, counts, the baseline block), report.html + report.md,
  and the line saying where the report went;
- the feature cache: a second evaluation of the same backbone runs no forward pass (a real
  forward hook on the model counts them);
- ``imagefolder:gs://...`` on the GCS emulator, outputs written back to the bucket;
- the report of a real run opened in headless Chromium;
- bad input: exit status 2, one ``error:`` line, nothing under ``--out`` (a bad baseline is
  found before any feature is cached there); data set errors (no readable image, a missing
  split, one class) name the data set; a corrupt image inside an image folder is skipped,
  counted, and the run succeeds.

The two good CLI runs and the bad-input commands of SUBPROCESS start together as
subprocesses when the module starts, while the in-process tests run; the other bad-input commands run through
click's test runner in this process (same command, exit status and stderr) to spare an
import of torch & co. per case on the 2-core CI machine.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageStat

from stablerep import storage
from stablerep.config import EvalConfig, TrainConfig
from stablerep.evaluation.backbones import load_backbone
from stablerep.evaluation.datasets import EvalData, ImageList, load_digits_data
from stablerep.evaluation.stage import evaluate_backbone, run_eval
from stablerep.models import create_model
from stablerep.training.checkpoint import save_checkpoint
from stablerep.training.trainer import model_info

pytestmark = pytest.mark.integration

TIMM = "timm:vit_tiny_patch16_224"
FAST = ["--set", "eval.probe_num_c=5", "--set", "eval.num_workers=0", "--set",
        "eval.batch_size=128"]
# The module's CLI runs start together (four imports of torch on 2 busy cores); a hang guard.
RUN_TIMEOUT_S = 600


# ---------------------------------------------------------------------------- inputs


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_digit_folder(root: str, *, train: int, test: int,
                       classes: dict[str, int] | None = None,
                       test_classes: dict[str, int] | None = None) -> str:
    """``train/<class>/*.png`` and ``test/<class>/*.png`` of real digits at any URI.

    Args:
        root: folder URI (local or gs://).
        train: images per class in train/.
        test: images per class in test/.
        classes: folder name -> digit (default three classes, digits 0, 1, 2).
        test_classes: the same for test/ when it should differ from train/.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    classes = classes or {"zero": 0, "one": 1, "two": 2}
    for split, count, names in (("train", train, classes),
                                ("test", test, test_classes or classes)):
        for name, digit in names.items():
            rows = np.flatnonzero(digits.target == digit)
            rows = rows[:count] if split == "train" else rows[-count:]
            for i, row in enumerate(rows):
                storage.write_bytes(storage.join(root, split, name, f"{i:03d}.png"),
                                    _png(pixels[row]))
    return root


def write_train_folder(folder: Path) -> Path:
    """A stablerep training folder: ckpt-00000001.pt + latest.json (+ metrics.jsonl)."""
    cfg = TrainConfig(model="vit_tiny", image_size=32, head_hidden_dim=64, head_out_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = create_model(cfg)
    state = {"model": model.state_dict(), "model_info": model_info(cfg, model.feature_dim),
             "step": 1}
    save_checkpoint(str(folder), state, step=1, keep=1)
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 / (1 + s)}) + "\n" for s in range(1, 30)))
    return folder


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", STABLEREP_CACHE=str(cache),
               PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stablerep.cli", "eval", *args]


# ---------------------------------------------------------------------------- the runs


class Runs:
    """The subprocesses started with the module; ``result(name)`` waits for one."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.done: dict[str, subprocess.CompletedProcess] = {}
        self.outs: dict[str, Path] = {}

    def start(self, name: str, *args: str) -> None:
        self.outs[name] = self.root / name / "out"
        cmd = _cli(*args, "--out", str(self.outs[name]))
        self.procs[name] = subprocess.Popen(cmd, env=_env(self.root / "cache"), cwd=self.root,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)

    def result(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.done:
            proc = self.procs[name]
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
            self.done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                                          stderr)
        return self.done[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-inputs")
    corrupt = Path(write_digit_folder(str(root / "corrupt"), train=20, test=20))
    (corrupt / "train" / "one" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (corrupt / "test" / "two" / "bad.jpg").write_bytes(os.urandom(600))
    (root / "no-classes" / "train").mkdir(parents=True)
    (root / "no-classes" / "test").mkdir(parents=True)
    (root / "weights.pt").write_bytes(os.urandom(4096))
    (root / "weights.json").write_text(json.dumps({"model": "vit_tiny", "step": 3}))
    for split, name in (("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "dog")):
        (root / "unreadable" / split / name).mkdir(parents=True)
        (root / "unreadable" / split / name / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
        (root / "unreadable" / split / name / "b.jpg").write_bytes(os.urandom(500))
    no_test = Path(write_digit_folder(str(root / "no-test"), train=4, test=4))
    shutil.rmtree(no_test / "test")
    return {"unreadable": root / "unreadable", "no_test": no_test,
            "one_class": Path(write_digit_folder(str(root / "one-class"), train=8, test=8,
                                                 classes={"zero": 0})),
            "train": write_train_folder(root / "train"), "corrupt": corrupt,
            "small": Path(write_digit_folder(str(root / "small"), train=8, test=8)),
            "differ": Path(write_digit_folder(
                str(root / "differ"), train=3, test=3,
                classes={"cat": 0, "dog": 1, "fox": 2},
                test_classes={"cat": 0, "dog": 1, "owl": 2})),
            "no_classes": root / "no-classes", "bytes": root / "weights.pt",
            "json": root / "weights.json"}


@pytest.fixture(scope="module", autouse=True)
def runs(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Runs]:
    """Starts the CLI commands now; the in-process tests below run while they work."""
    runs = Runs(tmp_path_factory.mktemp("eval-runs"))
    runs.start("timm", "--checkpoint", TIMM, "--datasets", "sklearn:digits", "--episodes", "50",
               "--set", "eval.image_size=32", *FAST)
    runs.start("folder", "--checkpoint", str(inputs["train"]), "--datasets",
               f"sklearn:digits,imagefolder:{inputs['corrupt']}", "--baseline", "none",
               "--episodes", "20", "--set", "eval.few_shot_way=3", "--set",
               "eval.few_shot_query=10", *FAST)
    for case, (make_args, _) in SUBPROCESS.items():
        runs.start(case, *make_args(inputs))
    yield runs
    runs.stop()


# ---------------------------------------------------------------------------- in process


def _subset(data: EvalData, train: int, test: int) -> EvalData:
    return EvalData(data.name + f"-first{train}", data.classes,
                    ImageList(data.train.labels[:train], data.train.load),
                    ImageList(data.test.labels[:test], data.test.load))


def test_second_evaluation_reads_the_feature_cache(tmp_path: Path):
    backbone = load_backbone(TIMM, image_size=32)
    data = _subset(load_digits_data(), 150, 80)
    cfg = EvalConfig(image_size=32, batch_size=64, num_workers=0, probe_num_c=2,
                     few_shot_way=3, few_shot_shot=1, few_shot_query=2, few_shot_episodes=5,
                     knn_k=5)
    calls: list[int] = []
    handle = backbone.model.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    try:
        first = evaluate_backbone(backbone, [data], cfg, cache_root=str(tmp_path), device="cpu")
        assert sum(calls) == 230 and len(calls) == 3 + 2  # 150 + 80 images in batches of 64
        calls.clear()
        second = evaluate_backbone(backbone, [data], cfg, cache_root=str(tmp_path),
                                   device="cpu")
        assert calls == [], "the second evaluation ran the backbone"
    finally:
        handle.remove()
    a, b = first[data.name], second[data.name]
    assert a["features_cached"] is False and b["features_cached"] is True
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == ["test.npz", "train.npz"]
    for key in ("linear_probe", "few_shot"):
        a[key].pop("seconds")
        b[key].pop("seconds")
    assert {k: v for k, v in a.items() if k != "features_cached"} == \
        {k: v for k, v in b.items() if k != "features_cached"}


def test_imagefolder_on_gcs(gcs_bucket: str, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STABLEREP_CACHE", str(tmp_path / "cache"))
    folder = write_digit_folder(f"{gcs_bucket}/digits3", train=12, test=10)
    cfg = EvalConfig(datasets=[f"imagefolder:{folder}"], baseline="none", image_size=32,
                     num_workers=0, probe_num_c=2, few_shot_way=3, few_shot_shot=2,
                     few_shot_query=3, few_shot_episodes=5, knn_k=3)
    out = f"{gcs_bucket}/eval"
    metrics = run_eval(cfg, checkpoint=TIMM, out=out)
    result = metrics["datasets"][f"imagefolder:{folder}"]
    assert (result["num_classes"], result["train"], result["test"]) == (3, 36, 30)
    assert result["corrupt_images"] == 0 and result["feature_dim"] == 192
    assert result["linear_probe"]["top5"] is None  # 3 classes
    assert 0.0 <= result["linear_probe"]["top1"] <= 1.0
    assert storage.read_json(f"{out}/metrics.json") == json.loads(json.dumps(metrics))
    assert storage.exists(f"{out}/report.html") and storage.exists(f"{out}/report.md")
    assert storage.exists(f"{out}/features")  # the feature cache lives on the bucket too
    copies = list((tmp_path / "cache").glob("digits3-*/train/two/*.png"))
    assert len(copies) == 12  # read from one local copy of the folder


# Cases that fail before any feature is extracted, through click's runner in this process.
IN_PROCESS = {
    "no_classes": (lambda i: ["--datasets", f"imagefolder:{i['no_classes']}"],
                   ["train/ holds no class folder with images"]),
    "classes_differ": (lambda i: ["--datasets", f"imagefolder:{i['differ']}"],
                       ["train and test classes differ", "'fox'", "'owl'"]),
    "json_checkpoint": (lambda i: ["--checkpoint", str(i["json"])],
                        ["weights.json: not a stablerep checkpoint or timm backbone"]),
    "k_too_large": (lambda i: ["--datasets", f"imagefolder:{i['small']}", "--set",
                               "eval.few_shot_way=3", "--set", "eval.few_shot_shot=6"],
                    ["eval.few_shot_shot: 6 support + 15 query", "need 21",
                     "smallest class: 8"]),
}

def _small(i: dict[str, Path], *args: str) -> list[str]:
    """A valid run on the small folder (a bad case adds one wrong argument)."""
    return ["--checkpoint", TIMM, "--datasets", f"imagefolder:{i['small']}", "--episodes", "0",
            "--set", "eval.image_size=32", "--set", "eval.num_workers=0", *args]


def _folder(i: dict[str, Path], key: str) -> list[str]:
    return ["--checkpoint", TIMM, "--datasets", f"imagefolder:{i[key]}", "--set",
            "eval.image_size=32", "--set", "eval.num_workers=0"]


# Cases run as `stablerep eval` subprocesses: (arguments, expected texts in the error line).
SUBPROCESS = {
    "unknown_dataset": (lambda i: ["--checkpoint", TIMM, "--datasets", "sklearn:digits,mnist"],
                        lambda i: ["unknown data set 'mnist'", "sklearn:digits",
                                   "imagefolder:<URI>", "torchvision", "CIFAR10"]),
    "random_bytes": (lambda i: ["--checkpoint", str(i["bytes"])],
                     lambda i: ["weights.pt: not a stablerep checkpoint or timm backbone"]),
    "baseline_missing": (lambda i: _small(i, "--baseline", str(i["small"] / "no-such.pt")),
                         lambda i: [f"{i['small'] / 'no-such.pt'}: no such checkpoint"]),
    "baseline_not_a_checkpoint": (
        lambda i: _small(i, "--baseline", str(i["json"])),
        lambda i: [f"{i['json']}: not a stablerep checkpoint or timm backbone"]),
    "unreadable_images": (lambda i: _folder(i, "unreadable"),
                          lambda i: [f"imagefolder:{i['unreadable']}: no image could be read",
                                     "train split", "4 files tried"]),
    "missing_split": (lambda i: _folder(i, "no_test"),
                      lambda i: [f"imagefolder:{i['no_test']}: expected train/<class>/* and "
                                 "test/<class>/*"]),
    "one_class": (lambda i: _folder(i, "one_class"),
                  lambda i: [f"imagefolder:{i['one_class']}: expected at least 2 classes",
                             "got 1 (['zero'])"]),
}


def _invoke(args: list[str]) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    from stablerep.cli import main

    result = CliRunner().invoke(main, ["eval", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _check_refused(result: subprocess.CompletedProcess, out: Path, expected: list[str]):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
    assert not out.exists(), sorted(out.rglob("*"))


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_bad_input_in_process(case: str, inputs: dict[str, Path], tmp_path: Path):
    make_args, expected = IN_PROCESS[case]
    args = ["--checkpoint", TIMM, "--set", "eval.image_size=32", "--set",
            "eval.num_workers=0", *make_args(inputs)]
    out = tmp_path / "out"
    _check_refused(_invoke([*args, "--out", str(out)]), out, expected)


# ---------------------------------------------------------------------------- subprocesses


@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_bad_input_subprocess(case: str, runs: Runs, inputs: dict[str, Path]):
    _check_refused(runs.result(case), runs.outs[case], SUBPROCESS[case][1](inputs))


def _good(runs: Runs, name: str) -> tuple[dict, Path, str]:
    result = runs.result(name)
    assert result.returncode == 0, result.stderr[-4000:]
    out = runs.outs[name]
    return json.loads((out / "metrics.json").read_text()), out, result.stdout


def _check_digits(result: dict, episodes: int, way: int) -> None:
    assert (result["num_classes"], result["train"], result["test"]) == (10, 1198, 599)
    assert result["feature_dim"] == 192 and result["corrupt_images"] == 0
    probe = result["linear_probe"]
    assert 0.3 < probe["top1"] <= probe["top5"] <= 1.0  # far above chance (0.1)
    assert any(np.isclose(probe["best_c"], np.logspace(-6, 5, 5)))
    fs = result["few_shot"]
    assert (fs["episodes"], fs["way"], fs["shot"]) == (episodes, way, 5)
    assert 1.0 / way < fs["mean"] <= 1.0 and 0.0 < fs["ci95"] < 0.2
    assert 0.3 < result["knn"]["top1"] <= 1.0 and result["knn"]["k"] == 20


def test_cli_timm_random_init_on_digits(runs: Runs):
    metrics, out, stdout = _good(runs, "timm")
    assert metrics["checkpoint"] == TIMM
    assert metrics["model"] == {"timm_model": "vit_tiny_patch16_224", "image_size": 32,
                                "feature_dim": 192}
    digits = metrics["datasets"]["sklearn:digits"]
    _check_digits(digits, episodes=50, way=5)
    assert digits["features_cached"] is False
    base = metrics["baseline"]
    assert base["checkpoint"] == "random init" and base["model"]["init"] == "random"
    # seed 0 random init is the same weights as the evaluated backbone: its cached features
    base_digits = base["datasets"]["sklearn:digits"]
    assert base_digits["features_cached"] is True
    assert base_digits["linear_probe"]["top1"] == digits["linear_probe"]["top1"]
    assert f"eval: report {out / 'report.html'}; metrics {out / 'metrics.json'}" in stdout
    assert "eval: sklearn:digits: probe top-1" in stdout and "(baseline" in stdout
    markdown = (out / "report.md").read_text()
    assert "sklearn:digits" in markdown
    assert "<table" in (out / "report.html").read_text()
    assert "probe_num_c: 5" in (out / "config.yaml").read_text()


def test_cli_training_folder_with_a_corrupt_image(runs: Runs, inputs: dict[str, Path]):
    metrics, out, stdout = _good(runs, "folder")
    assert metrics["checkpoint"] == str(inputs["train"])
    assert metrics["model"]["timm_model"] == "vit_tiny_patch16_224"
    assert metrics["model"]["image_size"] == 32 and metrics["model"]["step"] == 1
    assert "baseline" not in metrics
    _check_digits(metrics["datasets"]["sklearn:digits"], episodes=20, way=3)
    folder = metrics["datasets"][f"imagefolder:{inputs['corrupt']}"]
    assert folder["corrupt_images"] == 2  # one in train/, one in test/, skipped
    assert (folder["num_classes"], folder["train"], folder["test"]) == (3, 60, 60)
    assert folder["few_shot"]["way"] == 3 and folder["linear_probe"]["top5"] is None
    assert f"eval: report {out / 'report.html'}" in stdout


def test_report_of_a_real_run_in_chromium(runs: Runs, inputs: dict[str, Path],
                                          tmp_path: Path, chromium):
    _, out, _ = _good(runs, "folder")
    page = (out / "report.html").as_uri()
    shot = tmp_path / "shot.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1200,1600", page)
    assert shot.exists(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    with Image.open(shot) as im:
        stddev = ImageStat.Stat(im.convert("L")).stddev[0]
    assert stddev > 10, f"the screenshot looks blank (stddev {stddev:.1f})"
    dom = chromium("--dump-dom", page).stdout
    rows = re.findall(r'<tr class="ds" data-dataset="([^"]+)">', dom)
    assert rows == ["sklearn:digits", f"imagefolder:{inputs['corrupt']}"]
    # few-shot and linear-probe bars, and the loss curve from the folder's metrics.jsonl
    assert len(re.findall(r'<img class="plot" src="data:image/png;base64,', dom)) == 3
