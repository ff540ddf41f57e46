#!/usr/bin/env bash
# `make images`: build the CUDA and the CPU image of this checkout and tag them with the
# constants the manifests and the components' base_image use (stablerep.k8s.config CUDA_IMAGE /
# CPU_IMAGE), so the tags cannot drift from the code.
#
#   CONTAINER_ENGINE=podman images/build.sh   choose the engine (default: docker, then podman)
#   PYTHON=.venv/bin/python images/build.sh   the interpreter that reads the tags (python3)
#
# Exits 2 with one `error:` line when no engine is usable or the tags cannot be read.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "error: $*" >&2; exit 2; }

# The first engine whose `info` answers: the CLI alone is not enough (docker without a daemon).
pick_engine() {
  local candidate tried=""
  if [ -n "${CONTAINER_ENGINE:-}" ]; then
    command -v "$CONTAINER_ENGINE" >/dev/null 2>&1 \
      || die "CONTAINER_ENGINE=$CONTAINER_ENGINE: not found on PATH, expected docker or podman"
    "$CONTAINER_ENGINE" info >/dev/null 2>&1 \
      || die "CONTAINER_ENGINE=$CONTAINER_ENGINE: '$CONTAINER_ENGINE info' failed, expected a running engine (is its daemon up?)"
    echo "$CONTAINER_ENGINE"
    return
  fi
  for candidate in docker podman; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" info >/dev/null 2>&1; then
      echo "$candidate"
      return
    fi
    tried="$tried $candidate"
  done
  if [ -n "$tried" ]; then
    die "no usable container engine: '${tried# } info' failed (is the daemon running?); the images need a running docker or podman"
  fi
  die "no container engine: neither docker nor podman is on PATH; install one to build the images"
}

engine=$(pick_engine)
python="${PYTHON:-python3}"
tags=$(PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
  'from stablerep import __version__; from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE; print(__version__, CUDA_IMAGE, CPU_IMAGE)') \
  || die "could not read the image tags from stablerep.k8s.config with $python"
read -r version cuda_image cpu_image <<<"$tags"

for variant in cuda cpu; do
  image=$cuda_image
  [ "$variant" = cpu ] && image=$cpu_image
  echo "images: building $image (images/Dockerfile.$variant) with $engine"
  "$engine" build --file "images/Dockerfile.$variant" --build-arg "VERSION=$version" \
    --tag "$image" .
done
echo "images: built $cuda_image and $cpu_image"
