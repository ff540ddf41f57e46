"""Read pins for the image builds: ``lock_pins.py NAME ...`` prints ``name==version`` for each
name from requirements.lock; ``lock_pins.py --requirements`` prints the package's declared
dependencies from pyproject.toml (installed under the lock before the code is copied in).

Exits 2 with one ``error:`` line when a name is not pinned by the lock.
"""

import sys
import tomllib
from pathlib import Path


def lock_pins(names: list[str], lock: Path = Path("requirements.lock")) -> list[str]:
    """``name==version`` of each name, as the lock pins it (names compared case-blind)."""
    pinned = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            pinned[name.lower().replace("_", "-")] = f"{name}=={version}"
    missing = [n for n in names if n.lower().replace("_", "-") not in pinned]
    if missing:
        print(f"error: {lock}: does not pin {', '.join(missing)}; expected 'name==version' "
              "lines (run make lock)", file=sys.stderr)
        sys.exit(2)
    return [pinned[n.lower().replace("_", "-")] for n in names]


def declared(pyproject: Path = Path("pyproject.toml")) -> list[str]:
    """The [project] dependencies of pyproject.toml."""
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


if __name__ == "__main__":
    args = sys.argv[1:]
    print("\n".join(declared() if args == ["--requirements"] else lock_pins(args)))
