"""The miniature replication, reduced to a few minutes, through the command line and the real
caption, generation, training and evaluation stages: StableRep (k = 4) features must beat the
random-init features of the same ViT on scikit-learn's real digits by more than the spread
over seeds, and a second run must reuse every finished run. Bad experiment settings fail in
one line before anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the recipe's data, model and budget (300 steps of 128 images: at 200 steps one seed's digits
# kNN fell to the untrained level, and 8 probe C values instead of 15 doubled the probe's
# spread over seeds); two arms, a smaller held-out set, fewer few-shot episodes
REDUCED = ["--arms", "random,stablerep_k4", "--seeds", "0,1,2",
           "--set", "repro.test_captions=200", "--set", "eval.few_shot_episodes=100"]


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "stablerep.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("repro")
    run = _cli("repro", "--data-root", str(root), *REDUCED)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return root, run


def test_stablerep_beats_random_init_on_real_digits_by_more_than_the_seed_spread(reduced
                                                                                 ) -> None:
    root, run = reduced
    results = json.loads((root / "repro" / "results.json").read_text())
    assert set(results["runs"]) == {"random", "stablerep_k4"}
    assert all(len(results["runs"][arm]) == 3 for arm in results["runs"])
    for metric in ("digits_knn", "digits_probe"):
        print(f"reduced repro: {metric} stablerep_k4 {results['summary']['stablerep_k4'][metric]}"
              f" vs random {results['summary']['random'][metric]}")
    for metric in ("digits_knn", "digits_probe"):
        ours = results["summary"]["stablerep_k4"][metric]
        base = results["summary"]["random"][metric]
        margin = ours["mean"] - base["mean"]
        assert margin > ours["std"] + base["std"], (metric, ours, base)
        assert ours["min"] > base["max"], (metric, ours, base)  # every seed, not the mean only


def test_results_table_plot_and_report_are_written(reduced) -> None:
    root, run = reduced
    out = root / "repro"
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("| arm | digits linear probe | digits 5-way 5-shot")
    assert "procedural test linear probe" in table.splitlines()[0]
    assert table.strip() in run.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert f"results in {out / 'results.json'}" in run.stdout
    assert "repro: [3/3] stablerep_k4 seed 2:" in run.stdout
    # every run went through the real stages: a checkpoint and an evaluation per seed
    runs = sorted((out / "runs").iterdir())
    assert [p.name.split("-")[:2] for p in runs] == [["stablerep_k4", f"s{s}"] for s in range(3)]
    for folder in runs:
        assert (folder / "train" / "latest.json").is_file()
        metrics = json.loads((folder / "eval" / "metrics.json").read_text())
        assert set(metrics["datasets"]) == {"sklearn:digits",
                                            f"imagefolder:{root / 'testset' / 'folder'}"}


def test_a_second_run_reuses_every_finished_run(reduced) -> None:
    root, run = reduced
    before = json.loads((root / "repro" / "results.json").read_text())
    again = _cli("repro", "--data-root", str(root), *REDUCED, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("(finished before)") == 3
    after = json.loads((root / "repro" / "results.json").read_text())
    assert after["summary"] == before["summary"]


@pytest.mark.parametrize(("args", "message"), [
    (["--arms", "random,moco"], "error: repro.arms[1]: got 'moco', expected one of random, "
                                "simclr, stablerep_k2"),
    (["--seeds", "0,x"], "error: invalid value for --seeds: got '0,x', expected "
                         "comma-separated integers"),
    (["--arms", "random"], "error: repro.arms: the random arm is the baseline of a trained "
                           "arm; add at least one trained arm"),
    (["--set", "repro.images_per_step=12"], "error: repro.images_per_step: 12 images do not "
                                            "split into captions of 8 rows (stablerep_k8)"),
])
def test_bad_settings_fail_in_one_line_and_write_nothing(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    run = _cli("repro", "--data-root", str(tmp_path / "r"), *args, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(message), run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists()
