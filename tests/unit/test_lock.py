"""The dependency lock: every requirement of pyproject is pinned there, inside its range.

`make` installs through ``requirements.lock`` (pip constraints), so a fresh clone gets the
versions the tests last passed with. These tests fail when pyproject and the lock drift apart
(a new dependency, a narrowed range) and say to run `make lock`.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{LOCK.name}: {line!r} is not a name==version pin"
        pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [r for group in project["optional-dependencies"].values()
                                       for r in group]
    return [Requirement(t) for t in texts]


def test_every_requirement_is_pinned_within_its_range():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: "
            "run `make lock`")
    for tool in ("pip", "setuptools", "wheel"):
        assert tool in pins, f"{LOCK.name} does not pin {tool}: run `make lock`"


def test_installed_environment_is_the_locked_one():
    """What `make` installed is what the lock says (a stale venv or a bypassed lock fails)."""
    pins = _pins()
    wrong = []
    for req in _requirements():
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed: run `make test` (it installs the lock)")
        if have != pins[canonicalize_name(req.name)]:
            wrong.append(f"{req.name} {have} (locked {pins[canonicalize_name(req.name)]})")
    assert not wrong, "installed versions differ from the lock: " + ", ".join(wrong)
