#!/usr/bin/env bash
# The prepared GPU run: carried wheels, the GPU tests, the three GPU benchmarks, one JSON.
#
#   bash benchmarks/gpu/run.sh [--smoke] [--wheels DIR]      (make bench-gpu)
#
# On a bare GPU machine (no network; torch, timm, transformers, numpy, pyarrow present) it
#   1. installs the wheels of benchmarks/gpu/wheels.txt whose modules do not import, from
#      DIR (--wheels, else $GPU_WHEELS, else .wheels; `make gpu-wheels` fills it),
#   2. records the machine (torch, CUDA, device name) and the measured bf16 matmul rate,
#   3. runs `pytest -m gpu tests/gpu`,
#   4. runs benchmarks/generation.py (SD v1.5 architecture, random weights, 512 px, 25
#      DPM-Solver++ steps, guidance 2; batch 16/32/64 x fp16/bf16 eager, bf16 compiled at 32),
#      benchmarks/training.py (ViT-B/16 224 px, 43 captions x 6 images; step, loader, end to
#      end) and benchmarks/evaluation.py (ViT-B/16 features; probe on 50k x 768, 100 classes),
# and writes under $OUT (default benchmarks/results/gpu): <part>.txt (each part's output and
# tables), json/*.json (each benchmark's figures), parts.json (status and seconds of each part)
# and summary.json (all of it in one file). Every part runs under a time cap; a part that
# fails or runs out of time is recorded as such and the run goes on.
#
# Time caps on an H200 (seconds), 480 s = 8 min in all, and the expected time of each part
# (estimated from FLOP counts and typical H200 rates; no part has run on a GPU yet):
#   wheels      25  (~10: pip unpacks the missing wheels, scipy the largest)
#   machine     15  (~5: versions, one bf16 8192^2 GEMM loop)
#   tests      180  (~150: SD v1.5 built once on the CPU ~20, UNet compile ~60, ViT-B compile
#                    ~40, three `stablerep train` runs ~35, eval CLI ~15)
#   generation 140  (~120: 6 eager rows x 64 images at ~7 img/s, the compiled row reusing the
#                    tests' inductor cache, the per-caption baseline on 12 images)
#   training    45  (~35: 2 x 2 x 8 ViT-B steps of 258 images, 3.6k JPEG shards, loader and
#                    end to end over 12 steps)
#   evaluation  75  (~60: ViT-B features of 1,797 digits x 3 passes; the probe sweep on 50k x
#                    768, 100 classes, 45 C values x 20 iterations, GPU and scikit-learn)
# The generation rows are saved as they finish, so a part stopped by its cap keeps its figures.
# --smoke runs the same code paths at toy size on the CPU (no wheels; tiny SD at 64 px,
# ViT-Ti at 32 px, a few steps; the GPU tests in STABLEREP_GPU_SMOKE mode): about 2 minutes.
set -uo pipefail

cd "$(dirname "$0")/../.."
SMOKE=0
WHEELS="${GPU_WHEELS:-.wheels}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    *) echo "error: run.sh argument: got $1, expected --smoke or --wheels DIR" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-$(command -v python3 || command -v python)}"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT/json"
OUT="$(cd "$OUT" && pwd)"
# the carried wheels go to a folder of their own, on the path (site-packages is left alone)
SITE="${GPU_SITE:-${TMPDIR:-/tmp}/stablerep-gpu-site}"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export STABLEREP_BENCH_RESULTS="$OUT/json" GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
export PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning"
: > "$OUT/parts.tsv"

# part NAME CAP_SECONDS COMMAND...: run it under its cap, output to $OUT/NAME.txt (and here)
part() {
  local name="$1" cap="$2"; shift 2
  echo "=== $name (cap ${cap}s): $*"
  local start ms rc
  start=$(date +%s%N)
  timeout --kill-after=15 "$cap" "$@" 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$ms" "$cap" >> "$OUT/parts.tsv"
  echo "=== $name: exit $rc after $(( ms / 1000 )).$(( ms % 1000 / 100 )) s"
}

if [ "$SMOKE" = 1 ]; then
  export STABLEREP_GPU_SMOKE=1 CUDA_VISIBLE_DEVICES=""
  part wheels 60 "$PY" benchmarks/gpu/wheels.py check
  part machine 60 "$PY" benchmarks/gpu/machine.py
  part tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
  part generation 120 "$PY" benchmarks/generation.py --smoke
  part training 120 "$PY" benchmarks/training.py --smoke
  part evaluation 120 "$PY" benchmarks/evaluation.py --smoke --threads 1
else
  part wheels 25 "$PY" benchmarks/gpu/wheels.py install "$WHEELS" --target "$SITE"
  part machine 15 "$PY" benchmarks/gpu/machine.py
  part tests 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
  part generation 140 "$PY" benchmarks/generation.py --arch sd15 --size 512 --steps 25 \
    --scheduler dpmsolver++ --guidance 2 --captions 16 -m 4 --baseline-captions 3 \
    --batch-size 16 32 64 --dtype fp16 bf16 --compile --compile-batch-size 32
  part training 45 "$PY" benchmarks/training.py --model vit_base --image-size 224 \
    --captions 43 -k 6 --steps 8 --repeats 2 --data-steps 12
  part evaluation 75 "$PY" benchmarks/evaluation.py --model vit_base_patch16_224 \
    --image-size 224 --batch-size 256 --n 50000 --dim 768 --classes 100 --max-iter 20 \
    --episodes 200
fi
"$PY" benchmarks/gpu/collect.py "$OUT"
