"""No stage imports another: stages meet only through stablerep.contracts and shared helpers.

Every import statement of the package (top level and inside functions) is read with ``ast``;
a module of one stage package that imports another stage package fails the test, named with
its file and line. Shared modules (contracts, storage, config, data, models, report ...) must
import no stage at all; only the wiring (stages.py, cli.py, k8s/) may.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "stablerep"
STAGES = ("captions", "generation", "training", "evaluation")
WIRING = ("stages.py", "cli.py", "train.py", "k8s")  # modules that join stages together


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = path.relative_to(root.parent).with_suffix("").parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(parts[: len(parts) - node.level])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "stablerep":  # from stablerep import captions
                found += [(node.lineno, f"stablerep.{a.name}") for a in node.names]
    return found


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "stablerep" and parts[1] in STAGES:
        return parts[1]
    return None


def _owner(path: Path, root: Path) -> str | None:
    """The stage package ``path`` belongs to; None for a shared module; "" for wiring."""
    first = path.relative_to(root).parts[0]
    if first in WIRING:
        return ""
    return first if first in STAGES else None


def cross_stage_imports(root: Path = PACKAGE) -> list[str]:
    """Every import of a stage by another stage or by a shared module, as ``file:line: ...``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        owner = _owner(path, root)
        if owner == "":
            continue
        for line, module in _imports(path, root):
            stage = _stage_of(module)
            if stage is None or stage == owner:
                continue
            who = f"stage {owner}" if owner else "shared module"
            problems.append(f"{path.relative_to(root.parent)}:{line}: {who} imports {module}")
    return problems


def test_no_stage_imports_another_stage() -> None:
    problems = cross_stage_imports()
    assert not problems, "cross-stage imports:\n" + "\n".join(problems)


def test_the_check_finds_a_cross_stage_import(tmp_path: Path) -> None:
    fake = tmp_path / "stablerep"
    (fake / "generation").mkdir(parents=True)
    (fake / "evaluation").mkdir()
    (fake / "generation" / "ok.py").write_text("from stablerep.generation import shards\n"
                                               "from stablerep import contracts\n")
    (fake / "generation" / "bad.py").write_text(
        "import os\n\ndef f():\n    from stablerep.captions.stage import make_captions\n")
    (fake / "evaluation" / "rel.py").write_text("from ..training import checkpoint\n")
    (fake / "report.py").write_text("from stablerep import training\n")
    assert cross_stage_imports(fake) == [
        "stablerep/evaluation/rel.py:1: stage evaluation imports stablerep.training",
        "stablerep/generation/bad.py:4: stage generation imports stablerep.captions.stage",
        "stablerep/report.py:1: shared module imports stablerep.training",
    ]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_package_exists(stage: str) -> None:
    assert (PACKAGE / stage / "__init__.py").is_file()
