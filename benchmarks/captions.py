"""Caption-stage throughput and memory against an in-memory baseline, in one process.

Sources: the built-in synthetic source (100k captions wanted) and a CC3M-layout TSV of 200k
rows (written to a temporary folder first). For each, the stage (`make_captions`: streaming,
bucketed dedupe, spill to disk) runs beside a plain baseline that loads every row into a
list, cleans it, dedupes with a dict, samples with `random.sample` and writes one Parquet
file. Prints a table (seconds, rows/s, peak Python heap, ratio to the baseline) and writes
JSON to benchmarks/results/captions.json. Absolute times are noisy; the ratios are the point.

    python benchmarks/captions.py [--rows 200000] [--captions 100000] [--spill-rows 50000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stablerep.captions import make_captions
from stablerep.captions.clean import clean, normalise
from stablerep.captions.synthetic import synthetic_rows
from stablerep.config import CaptionsConfig

RESULTS = Path(__file__).parent / "results"


def baseline(rows, n: int, seed: int, out: Path) -> int:
    """Everything in memory: list -> clean -> dict dedupe -> random.sample -> one Parquet."""
    items = list(rows)
    unique: dict[str, str] = {}
    for raw, _ in items:
        text, reason = clean(raw, min_chars=5, max_chars=1000)
        if reason is None:
            unique.setdefault(normalise(text), text)
    chosen = random.Random(seed).sample(sorted(unique.values()), min(n, len(unique)))
    pq.write_table(pa.table({"caption_id": list(range(len(chosen))), "caption": chosen}), out)
    return len(items)


def measure(fn, *, trace: bool) -> tuple[float, float, int]:
    """(seconds, peak traced MB or nan, rows) of one call; tracing runs are not timed."""
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    rows = fn()
    seconds = time.perf_counter() - start
    peak = float("nan")
    if trace:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return seconds, peak, rows


def write_tsv(path: Path, num_rows: int) -> None:
    rows = synthetic_rows(CaptionsConfig(num_captions=1).synthetic, num_rows, 123)[0]
    with open(path, "w", encoding="utf-8") as f:
        for i, (caption, _) in enumerate(rows):
            f.write(f"{caption} #{i % (num_rows // 2)}\thttp://example.invalid/{i}.jpg\n")


def run_case(name: str, cfg: CaptionsConfig, rows_fn, work: Path) -> list[dict]:
    results = []
    for method in ("baseline", "stage"):
        def call(method=method):
            out = Path(tempfile.mkdtemp(dir=work))
            if method == "baseline":
                return baseline(rows_fn(), cfg.num_captions or 10**12, cfg.seed, out / "p.parquet")
            manifest = make_captions(cfg, str(out / "captions"))
            return manifest.summary["rows_read"]

        seconds, _, rows = measure(call, trace=False)
        _, peak, _ = measure(call, trace=True)
        results.append({"case": name, "method": method, "rows": rows, "seconds": seconds,
                        "rows_per_s": rows / seconds, "peak_python_mb": peak})
    base = results[0]
    for r in results:
        r["speed_ratio"] = r["rows_per_s"] / base["rows_per_s"]
        r["memory_ratio"] = r["peak_python_mb"] / base["peak_python_mb"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the TSV source")
    parser.add_argument("--captions", type=int, default=100_000, help="captions wanted")
    parser.add_argument("--spill-rows", type=int, default=50_000)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        syn = CaptionsConfig(num_captions=args.captions, num_shards=8, spill_rows=args.spill_rows)
        syn_rows = int(args.captions * 1.6)  # enough draws for that many distinct captions
        syn.synthetic.num_rows = syn_rows  # one drawing round, the same rows for both methods
        results += run_case(f"synthetic {args.captions:,}", syn,
                            lambda: synthetic_rows(syn.synthetic, syn_rows, syn.seed)[0], work)
        tsv = work / "cc3m.tsv"
        write_tsv(tsv, args.rows)
        files = CaptionsConfig(source="files", inputs=[str(tsv)], format="cc3m", num_shards=8,
                               num_captions=args.captions, spill_rows=args.spill_rows)

        def tsv_rows():
            with open(tsv, encoding="utf-8") as f:
                for line in f:
                    yield line.split("\t", 1)[0], str(tsv)

        results += run_case(f"cc3m tsv {args.rows:,} rows", files, tsv_rows, work)
    header = (f"{'case':<26} {'method':<9} {'rows':>9} {'seconds':>8} {'rows/s':>9} "
              f"{'peak MB':>8} {'speed x':>8} {'memory x':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['case']:<26} {r['method']:<9} {r['rows']:>9,} {r['seconds']:>8.2f} "
              f"{r['rows_per_s']:>9,.0f} {r['peak_python_mb']:>8.1f} {r['speed_ratio']:>8.2f} "
              f"{r['memory_ratio']:>9.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "captions.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {RESULTS / 'captions.json'}")


if __name__ == "__main__":
    main()
