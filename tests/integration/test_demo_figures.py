"""README's measured demo figures are what `make demo` prints: the full demo recipe through
`stablerep pipeline run-local` (about 75 s on 2 quiet cores), its headline line against every
headline line README quotes, and the report's table against the same numbers.

The figures depend on the recipe, the seed and the torch thread count the stage picks from the
usable CPUs (2 on the development and CI machines; README says so), so a machine with another
count skips this test saying why instead of failing it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stablerep.cpus import usable_cpus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MEASURED_ON_CPUS = 2


def _readme_headlines() -> list[str]:
    """Every `sklearn:digits: ...` line README quotes, whitespace normalised."""
    text = (ROOT / "README.md").read_text()
    quoted = re.findall(r"`(sklearn:digits:[^`]+)`", text, flags=re.S)
    return [" ".join(q.split()) for q in quoted if "probe_top1" in q]


def test_readme_quotes_what_make_demo_prints(tmp_path: Path) -> None:
    if usable_cpus() != MEASURED_ON_CPUS:
        pytest.skip(f"README's demo figures were measured with {MEASURED_ON_CPUS} usable CPUs "
                    f"(torch threads follow them); this machine has {usable_cpus()}")
    quoted = _readme_headlines()
    assert quoted, "README quotes no demo headline line"
    env = dict(os.environ, PYTHONPATH=str(ROOT), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    env.pop("OMP_NUM_THREADS", None)  # the stage sizes its threads as make demo does
    run = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "run-local",
                          "--recipe", "demo", "--data-root", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
                         check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    printed = [" ".join(line.split()) for line in run.stdout.splitlines()
               if line.startswith("sklearn:digits:")]
    assert len(printed) == 1, run.stdout[-2000:]
    assert set(quoted) == set(printed), (quoted, printed)
    numbers = re.findall(r"\d+\.\d%", printed[0])  # trained and baseline, three metrics
    report = (tmp_path / "demo" / "eval" / "report.html").read_text()
    for number in numbers:
        assert number.rstrip("%") in report, f"{number} is not in the report"
