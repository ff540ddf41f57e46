"""Every command the docs show (README code blocks, ``--help`` examples, module docstrings) works.

Each shown command is parsed the way a shell would, the ``configs/...`` recipes it names must
exist, and it runs with ``--print-config`` (which only builds the config: no data, no
network), so an example with a wrong path, a misspelt flag or a broken line continuation fails
here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

import stablerep.train
from stablerep.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PATH = re.compile(r"configs/[\w./-]+\.ya?ml")


def _commands_in(text: str) -> list[str]:
    """Shell commands starting with ``stablerep`` or ``torchrun``, continuations joined."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line.startswith(("stablerep ", "torchrun ")):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        out.append(line)
    return out


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme, flags=re.DOTALL | re.MULTILINE)
    assert blocks, "README.md has no code blocks"
    return [c for block in blocks for c in _commands_in(block)]


def _help_texts() -> dict[str, str]:
    runner = CliRunner()
    texts = {"stablerep --help": runner.invoke(main, ["--help"]).output}
    for name in sorted(main.commands):
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output
        texts[f"stablerep {name} --help"] = result.output
        command = main.commands[name]
        for sub in sorted(command.commands if isinstance(command, click.Group) else ()):
            result = runner.invoke(main, [name, sub, "--help"])
            assert result.exit_code == 0, result.output
            texts[f"stablerep {name} {sub} --help"] = result.output
    texts["stablerep/train.py"] = stablerep.train.__doc__ or ""
    return texts


def _all_commands() -> list[tuple[str, str]]:
    found = [("README.md", c) for c in _readme_commands()]
    for where, text in _help_texts().items():
        found += [(where, c) for c in _commands_in(text)]
    return found


COMMANDS = _all_commands()


def _cli_args(command: str) -> list[str]:
    """The arguments ``stablerep`` receives from a shown command (torchrun's are dropped)."""
    words = shlex.split(command, comments=True)
    if words[0] == "torchrun":
        at = words.index("-m")
        assert words[at + 1] == "stablerep.train", command
        return ["train", *words[at + 2:]]
    assert words[0] == "stablerep", command
    return words[1:]


def test_docs_show_commands_of_every_stage():
    stages = {_cli_args(c)[0] for _, c in COMMANDS}
    assert stages >= {"captions", "generate", "train", "eval"}, stages
    assert any(where == "stablerep/train.py" for where, _ in COMMANDS)
    assert sum(where == "README.md" for where, _ in COMMANDS) >= 10


def test_every_named_recipe_exists():
    texts = [(ROOT / "README.md").read_text(encoding="utf-8"), *_help_texts().values()]
    named = sorted({p for text in texts for p in CONFIG_PATH.findall(text)})
    assert named, "no configs/ path named anywhere"
    missing = [p for p in named if not (ROOT / p).is_file()]
    assert not missing, f"named but not in the repository: {missing}"


@pytest.mark.parametrize(("where", "command"), COMMANDS,
                         ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_shown_command_builds_its_config(where: str, command: str, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs give recipe paths relative to the repository
    args = _cli_args(command)
    group = main.commands[args[0]]
    if isinstance(group, click.Group):  # k8s: talks to a cluster or writes k8s/; parse only
        sub = group.commands[args[1]]
        sub.make_context(f"stablerep {args[0]} {args[1]}", args[2:])  # raises on a bad flag
        return
    result = CliRunner().invoke(main, [*args, "--print-config"])
    assert result.exit_code == 0, f"{where}: {command}\n{result.output}"
    printed = yaml.safe_load(result.stdout)
    stage = "eval" if args[0] == "eval" else args[0]
    assert isinstance(printed, dict) and printed.get(stage), result.stdout
