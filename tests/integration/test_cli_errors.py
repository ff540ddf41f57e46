"""Bad input through the real CLI (a subprocess): one ``error:`` line, exit 2, nothing written.

One test per class of bad input: a config or ``--set`` of the wrong shape, a config that is not
UTF-8 or is a folder, click's own usage errors, a device no stage knows, an output path that is
a regular file (or runs through one) in each stage, a data file (captions manifest, shard json,
latest.json) that is not UTF-8 or not JSON, and a hub model id that does not exist. Each
asserts the exit status, that the last stderr line is the only ``error:`` line and names the
input, that no traceback is printed, and that the working folder holds exactly what it held
before. A real bug is the opposite case: its traceback is kept and a summary line ends it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_UTF8 = b'{"count": 3, "note": "caf\xe9"}'  # Latin-1 bytes, not UTF-8


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stablerep.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _listing(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``root``, hidden ones included."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = path.read_bytes() if path.is_file() else None
    return out


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """Assert the one-line failure form and return the ``error:`` line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert lines[-1] == errors[0], result.stderr[-3000:]
    assert len(errors[0]) < 500, errors[0]
    return errors[0]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working folder holding a regular file ``afile`` where outputs might go."""
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


# Each case: (prepare inputs under the working folder -> CLI arguments, texts the error names).
Case = tuple[Callable[[Path], list[str]], list[str]]
TRAIN_TINY = ["--model", "vit_tiny", "--image-size", "32", "--captions-per-batch", "2", "-k",
              "2", "--max-steps", "1", "--num-workers", "0", "--device", "cpu"]


def _section_is_a_list(w: Path) -> list[str]:
    _write(w / "r.yaml", "captions:\n  - num_captions: 5\n")
    return ["captions", "--config", "r.yaml", "--num-captions", "5", "--out", "out"]


def _recipe_sets_a_removed_field(w: Path) -> list[str]:
    _write(w / "r.yaml", "captions:\n  num_captions: 5\n  synthetic:\n    rewriter: none\n")
    return ["captions", "--config", "r.yaml", "--out", "out"]


def _config_not_utf8(w: Path) -> list[str]:
    _write(w / "r.yaml", b"captions:\n  num_captions: 5\n  column: caf\xe9\n")
    return ["captions", "--config", "r.yaml", "--out", "out"]


def _manifest_not_utf8(w: Path) -> list[str]:
    _write(w / "caps" / "manifest.json", NOT_UTF8)
    return ["generate", "--captions", "caps", "--out", "out", "--backend", "tiny",
            "--device", "cpu"]


def _manifest_not_json(w: Path) -> list[str]:
    _write(w / "caps" / "manifest.json", '{"count": 3,')
    return ["generate", "--captions", "caps", "--out", "out", "--backend", "tiny",
            "--device", "cpu"]


def _shard_json_not_utf8(w: Path) -> list[str]:
    _write(w / "images" / "shard-000000.tar", b"\0" * 1024)
    _write(w / "images" / "shard-000000.json", NOT_UTF8)
    return ["train", "--data", "images", "--out", "out", *TRAIN_TINY]


def _latest_json_not_utf8(w: Path) -> list[str]:
    _write(w / "run" / "latest.json", NOT_UTF8)
    return ["eval", "--checkpoint", "run", "--out", "out", "--device", "cpu"]


CASES: dict[str, Case] = {
    # config shape
    "set-section-to-a-scalar": (
        lambda w: ["captions", "--set", "captions=3", "--num-captions", "5", "--out", "out"],
        ["captions: got 3, expected a mapping"]),
    "yaml-section-is-a-list": (_section_is_a_list, ["captions: got [{", "expected a mapping"]),
    "set-below-a-scalar": (
        lambda w: ["captions", "--set", "captions.seed=1", "--set", "captions.seed.x=2",
                   "--num-captions", "5", "--out", "out"],
        ["--set captions.seed.x=2: seed is not a section"]),
    "set-root-scalar-to-a-mapping": (
        lambda w: ["captions", "--set", "data_root.x=1", "--num-captions", "5"],
        ["data_root: got {'x': 1}, expected a string"]),
    "recipe-sets-a-removed-field": (_recipe_sets_a_removed_field,
                                    ["captions.synthetic.rewriter: unknown field; known fields: "
                                     "background_prob, backgrounds_uri, concepts"]),
    "config-not-utf8": (_config_not_utf8, ["r.yaml: not UTF-8 text (byte 0xe9"]),
    "config-is-a-folder": (
        lambda w: ["captions", "--config", ".", "--out", "out"],
        ["cannot read .: . is a folder, expected a file"]),
    # click's usage errors
    "unknown-option": (lambda w: ["captions", "--bogus"],
                       ["error: no such option '--bogus'", "captions --help"]),
    "bad-choice": (lambda w: ["train", "--method", "byol"],
                   ["invalid value for '--method': 'byol' is not one of 'stablerep'"]),
    "missing-value": (lambda w: ["captions", "--num-captions"],
                      ["option '--num-captions' requires an argument"]),
    "not-an-integer": (lambda w: ["captions", "--num-captions", "many"],
                       ["'--num-captions'", "'many' is not a valid integer"]),
    "unknown-command": (lambda w: ["trian"], ["no such command 'trian'"]),
    # devices
    "train-device": (lambda w: ["train", "--device", "bogus", "--out", "out"],
                     ["train.device: got 'bogus', expected auto, cpu or cuda"]),
    "train-device-index": (lambda w: ["train", "--device", "cuda:1", "--out", "out"],
                           ["train.device: got 'cuda:1', expected auto, cpu or cuda"]),
    "generate-device": (lambda w: ["generate", "--device", "gpu", "--out", "out"],
                        ["generate.device: got 'gpu', expected auto, cpu, cuda or cuda:N"]),
    "eval-device": (lambda w: ["eval", "--device", "tpu", "--out", "out"],
                    ["eval.device: got 'tpu', expected auto, cpu, cuda or cuda:N"]),
    # an output path that is a regular file, or runs through one
    "captions-out-is-a-file": (
        lambda w: ["captions", "--num-captions", "5", "--out", "afile"],
        ["captions.out: afile is a regular file, expected a folder"]),
    "captions-out-under-a-file": (
        lambda w: ["captions", "--num-captions", "5", "--out", "afile/captions"],
        ["captions.out: afile/captions runs through afile, a regular file"]),
    "captions-data-root-is-a-file": (
        lambda w: ["captions", "--num-captions", "5", "--data-root", "afile"],
        ["data_root: afile/captions runs through afile, a regular file"]),
    "captions-work-dir-is-a-file": (
        lambda w: ["captions", "--num-captions", "5", "--work-dir", "afile", "--out", "out"],
        ["captions.work_dir: afile is a regular file, expected a folder"]),
    "generate-out-is-a-file": (
        lambda w: ["generate", "--captions", "caps", "--out", "afile", "--backend", "tiny"],
        ["generate.out: afile is a regular file, expected a folder"]),
    "train-out-under-a-file": (
        lambda w: ["train", "--data", "images", "--out", "afile/run", *TRAIN_TINY],
        ["train.out: afile/run runs through afile, a regular file"]),
    "eval-out-is-a-file": (
        lambda w: ["eval", "--checkpoint", "timm:vit_tiny_patch16_224", "--out", "afile"],
        ["eval.out: afile is a regular file, expected a folder"]),
    "eval-data-root-is-a-file": (
        lambda w: ["eval", "--data-root", "afile"],
        ["data_root: afile/eval runs through afile, a regular file"]),
    "generate-captions-under-a-file": (
        lambda w: ["generate", "--captions", "afile", "--out", "out", "--backend", "tiny",
                   "--device", "cpu"],
        ["cannot read afile/manifest.json: afile is a regular file, expected a folder"]),
    # data files that are not UTF-8 or not JSON
    "manifest-not-utf8": (_manifest_not_utf8,
                          ["caps/manifest.json: not UTF-8 text (byte 0xe9 at offset 25)"]),
    "manifest-not-json": (_manifest_not_json, ["caps/manifest.json: not valid JSON"]),
    "shard-json-not-utf8": (_shard_json_not_utf8,
                            ["shard-000000.json: not UTF-8 text (byte 0xe9"]),
    "latest-json-not-utf8": (_latest_json_not_utf8,
                             ["run/latest.json: not UTF-8 text (byte 0xe9"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_writes_nothing(case: str, work: Path) -> None:
    prepare, needles = CASES[case]
    args = prepare(work)
    before = _listing(work)
    result = _cli(*args, cwd=work)
    line = _one_error_line(result)
    for needle in needles:
        assert needle in line, line
    assert _listing(work) == before  # nothing published, nothing staged, nothing created


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real captions folder (4 synthetic captions) made by the CLI."""
    root = tmp_path_factory.mktemp("captions")
    result = _cli("captions", "--num-captions", "4", "--out", "caps", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "caps"


def test_hub_model_id_that_does_not_exist_is_one_line(captions: Path, work: Path) -> None:
    before = _listing(work)
    result = _cli("generate", "--captions", str(captions), "--out", "out", "--backend",
                  "diffusers", "--model", "no-such-org-4f1c9/no-such-model", "--device", "cpu",
                  cwd=work)
    line = _one_error_line(result)
    assert line.startswith("error: generate.model: cannot load no-such-org-4f1c9/no-such-model:")
    assert "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line, line
    assert "stacktrace" not in result.stderr
    assert _listing(work) == before


def test_help_and_version_still_work(work: Path) -> None:
    for args in (["--help"], ["train", "--help"], ["--version"]):
        result = _cli(*args, cwd=work)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stderr == ""
    bare = _cli(cwd=work)  # no command: the group's help, as click does
    assert bare.returncode == 2
    assert "captions" in bare.stderr and "Commands:" in bare.stderr


def test_the_torchrun_entry_point_reports_like_the_cli(work: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "stablerep.train", "--bogus"], cwd=work,
                            env=_env(), capture_output=True, text=True, timeout=120)
    line = _one_error_line(result)
    assert line.startswith("error: no such option '--bogus'"), line
    assert "(see 'stablerep train --help')" in line, line


def test_choices_on_the_command_line_are_the_config_literals(work: Path) -> None:
    result = _cli("generate", "--help", cwd=work)
    assert result.returncode == 0
    assert "[ddim|dpmsolver++|default]" in result.stdout
    assert "[jpg|webp|png]" in result.stdout


def test_an_internal_error_keeps_its_traceback_and_ends_with_a_summary(work: Path) -> None:
    snippet = textwrap.dedent("""
        from stablerep.cli import main

        @main.command()
        def explode():
            raise RuntimeError("the ledger is\\ninconsistent")

        main(["explode"], prog_name="stablerep")
    """)
    script = _write(work / "explode.py", snippet)
    result = subprocess.run([sys.executable, str(script)], cwd=work, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise RuntimeError("the ledger is' in result.stderr  # the failing line is shown
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: internal error: RuntimeError: the ledger is"), last
    assert "this is a bug" in last


def test_a_user_error_from_a_library_call_is_one_line(work: Path) -> None:
    snippet = textwrap.dedent("""
        from stablerep.cli import main
        from stablerep.errors import InputError

        @main.command()
        def refuse():
            raise InputError("table.csv: expected a column 'caption'")

        main(["refuse"], prog_name="stablerep")
    """)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert _one_error_line(result) == "error: table.csv: expected a column 'caption'"
