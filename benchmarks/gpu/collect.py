"""One summary of a GPU run: each part's status and seconds, every benchmark's figures.

    python benchmarks/gpu/collect.py OUT

Reads ``OUT/parts.tsv`` (written by run.sh: name, exit status, milliseconds, cap) and
``OUT/json/*.json`` (the benchmarks' results), writes ``OUT/parts.json`` and
``OUT/summary.json``, prints the parts' table. Exits 1 when a part failed or ran out of time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SECTIONS = {"machine": "machine", "generation": "generation-", "training": "training-",
            "evaluation": "evaluation-"}


def read_parts(out: Path) -> list[dict]:
    parts = []
    for line in (out / "parts.tsv").read_text().splitlines():
        name, rc, ms, cap = line.split("\t")
        status = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"exit {rc}"
        parts.append({"part": name, "status": status, "seconds": int(ms) / 1000,
                      "cap_s": int(cap)})
    return parts


def read_figures(out: Path) -> dict[str, dict | None]:
    """Each section's JSON (None where its benchmark wrote none)."""
    files = sorted((out / "json").glob("*.json"))
    return {section: next((json.loads(f.read_text()) for f in files
                           if f.name.startswith(prefix)), None)
            for section, prefix in SECTIONS.items()}


def main(out: Path) -> int:
    parts = read_parts(out)
    summary = {"parts": parts, "total_seconds": sum(p["seconds"] for p in parts),
               **read_figures(out)}
    (out / "parts.json").write_text(json.dumps(parts, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{'part':<12} {'status':<10} {'seconds':>8} {'cap s':>6}")
    print("-" * 39)
    for p in parts:
        print(f"{p['part']:<12} {p['status']:<10} {p['seconds']:>8.1f} {p['cap_s']:>6}")
    print(f"{'total':<12} {'':<10} {summary['total_seconds']:>8.1f}")
    missing = [s for s in SECTIONS if summary[s] is None]
    if missing:
        print(f"no figures from: {', '.join(missing)}")
    print(f"summary: {out / 'summary.json'}")
    return 0 if all(p["status"] == "ok" for p in parts) and not missing else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
