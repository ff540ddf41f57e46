"""The carried wheels of the GPU run: download them here, install the missing ones there.

    python benchmarks/gpu/wheels.py download .wheels   # lock pins, for Python 3.12 x86_64
    python benchmarks/gpu/wheels.py install .wheels --target DIR   # on the GPU machine
    python benchmarks/gpu/wheels.py check              # which modules import here

``wheels.txt`` (beside this file) names each distribution and the module it provides; the
version is the pin of ``requirements.lock``. ``install`` installs (``pip --no-index --no-deps``)
only the wheels whose module does not import, so the machine's own torch stack is left alone;
with ``--target`` into that folder (no site-packages write, no externally-managed refusal),
which the caller then puts on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def norm(name: str) -> str:
    """A distribution name as pip and wheel files compare it (PEP 503, '-' as '_')."""
    return re.sub(r"[-_.]+", "_", name).lower()


def entries(path: Path = HERE / "wheels.txt") -> list[tuple[str, str]]:
    """(distribution, module) of every line of wheels.txt."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            dist, module = line.split()[:2]
            out.append((dist, module))
    return out


def pins(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    """Normalised distribution name -> pinned version, from the lock."""
    found = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            found[norm(name)] = version.strip()
    return found


def missing() -> list[tuple[str, str]]:
    """The entries whose module does not import here."""
    return [(d, m) for d, m in entries() if importlib.util.find_spec(m) is None]


def download(dest: Path) -> int:
    locked = pins()
    specs = [f"{d}=={locked[norm(d)]}" for d, _ in entries()]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--dest", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + specs, check=True)
    total = 0
    for dist, _ in entries():
        [wheel] = wheel_files(dest, dist)
        total += wheel.stat().st_size
        print(f"{wheel.name:<90} {wheel.stat().st_size / 2**20:6.2f} MiB")
    print(f"{'total':<90} {total / 2**20:6.2f} MiB")
    return 0


def wheel_files(folder: Path, dist: str) -> list[Path]:
    return [w for w in folder.glob("*.whl") if norm(w.name.split("-")[0]) == norm(dist)]


def install(folder: Path, target: str = "") -> int:
    """Install the wheels of the modules that do not import; 1 if one has no wheel."""
    todo = missing()
    if not todo:
        print("wheels: every module imports; nothing to install")
        return 0
    files, absent = [], []
    for dist, module in todo:
        found = wheel_files(folder, dist)
        (files.extend(found) if found else absent.append(f"{dist} ({module})"))
    if files:
        print("wheels: installing " + ", ".join(w.name for w in files), flush=True)
        if target and importlib.util.find_spec("pip") is None:
            unpack(files, Path(target))
        else:
            where = ["--target", target] if target else []
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                            "--no-deps", *where, "--find-links", str(folder), *map(str, files)],
                           check=True)
    if absent:
        print(f"wheels: not importable and no wheel in {folder}: {', '.join(absent)}")
        return 1
    return 0


def unpack(files: list[Path], target: Path) -> None:
    """Install wheels by unzipping them into ``target`` (a Python without pip).

    A wheel is a zip of its import tree; the packages listed in wheels.txt need nothing more
    (no compiled scripts, no data files outside the package).
    """
    import zipfile

    print(f"wheels: no pip here; unpacking into {target}")
    target.mkdir(parents=True, exist_ok=True)
    for wheel in files:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)


def print_import_states() -> int:
    """Print, per wheel entry, whether its module imports here."""
    todo = missing()
    for dist, module in entries():
        state = "missing" if (dist, module) in todo else "imports"
        print(f"{dist:<20} {module:<20} {state}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["download", "install", "check"])
    p.add_argument("folder", nargs="?", default=str(ROOT / ".wheels"))
    p.add_argument("--target", default="", help="install into this folder (put it on "
                   "PYTHONPATH) instead of site-packages")
    args = p.parse_args()
    if args.action == "download":
        return download(Path(args.folder))
    if args.action == "install":
        return install(Path(args.folder), args.target)
    return print_import_states()


if __name__ == "__main__":
    sys.exit(main())
