"""The prepared GPU run (benchmarks/gpu/run.sh) in its --smoke mode on the CPU.

The smoke mode takes the code paths of the GPU run at toy size: the wheels check, the machine
record, the GPU tests in STABLEREP_GPU_SMOKE mode, and the three benchmarks. This test runs
the script as a GPU session would (``bash benchmarks/gpu/run.sh``, output under ``$OUT``)
and checks that every part finished and that every table and figure was written.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["wheels", "machine", "tests", "generation", "training", "evaluation"]
RUN_TIMEOUT_S = 600  # a hang guard: the smoke run takes 2-3 minutes on 2 busy cores


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return out, proc


def test_every_part_finishes_and_is_timed(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    parts = json.loads((out / "parts.json").read_text())
    assert [p["part"] for p in parts] == PARTS
    assert all(p["status"] == "ok" and 0 < p["seconds"] <= p["cap_s"] for p in parts), parts
    for name in PARTS:  # each part's output, tables included, was kept
        assert (out / f"{name}.txt").stat().st_size > 0, name
        assert f"=== {name}: exit 0 after" in proc.stdout
    tests = (out / "tests.txt").read_text()
    assert re.search(r"\d+ passed", tests) and not re.search(r"\d+ (failed|error)", tests)


def test_summary_has_every_section_with_numbers(smoke):
    out, _ = smoke
    summary = json.loads((out / "summary.json").read_text())
    assert _number(summary["machine"]["matmul_tflops"]) and summary["machine"]["device"] == "cpu"
    gen = summary["generation"]["results"]
    assert [r["method"] for r in gen][0] == "baseline" and len(gen) >= 2
    assert all(_number(r["images_per_s"]) and r["images"] > 0 for r in gen)
    train = summary["training"]
    assert [r["method"] for r in train["results"]] == ["baseline", "stage"]
    assert all(_number(r["images_per_s"]) for r in train["results"])
    data = train["data_path"]
    assert all(_number(data[f"{k}_images_per_s"]) for k in ("loader", "step", "end_to_end"))
    evaluation = summary["evaluation"]["results"]
    # probe-in: the ImageNet-shaped probe (reduced on a CPU), timed on its own
    assert {r["part"] for r in evaluation} == {"extraction", "probe", "few-shot", "probe-in"}
    assert all(_number(r["ours_s"]) and _number(r["base_s"]) for r in evaluation)
    assert all(_number(r["ours_acc"]) for r in evaluation if r["part"] != "extraction")


def test_tables_are_printed(smoke):
    out, _ = smoke
    assert "method    dtype compile batch" in (out / "generation.txt").read_text()
    training = (out / "training.txt").read_text()
    assert "s/step" in training and "end_to_end" in training
    assert "speed x" in (out / "evaluation.txt").read_text()


def test_the_run_ends_with_the_parts_table(smoke):
    _, proc = smoke
    tail = proc.stdout[proc.stdout.rindex("part         status"):]
    assert all(f"\n{name} " in tail for name in PARTS) and "summary:" in tail
