#!/usr/bin/env bash
# `make images`: build the CPU and the CUDA image of this checkout and tag them with the
# constants the manifests and the pipeline's steps use (stablerep.k8s.config CPU_IMAGE /
# CUDA_IMAGE), so the tags cannot drift from the code. Prints each image's build time and size.
#
#   CONTAINER_ENGINE=podman       choose the engine (default: docker, then podman)
#   IMAGES="cpu"                  build only these variants (default: "cpu cuda")
#   BASE_IMAGE=IMAGE              the base of both (default: the Dockerfiles' python:3.11 slim);
#                                 `make base-image` builds localhost/stablerep-base:bookworm
#                                 from Debian's packages for machines without registry access
#   TORCH_INDEX_URL=URL           where torch comes from ("" = the pip index; default: each
#                                 Dockerfile's own: the CPU wheel index for cpu, PyPI for cuda)
#   WHEELS=DIR[:DIR...]           local wheel folders mounted read-only into the build (podman),
#                                 with PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS
#                                 passed through: an offline or air-gapped mirror
#   PIP_CERT=FILE                 a CA bundle for pip behind a TLS-inspecting proxy, mounted
#                                 read-only into the build (podman)
#   PYTHON=.venv/bin/python       the interpreter that reads the tags (python3)
#
# Exits 2 with one `error:` line when no engine is usable, the base image does not exist, or
# pip cannot satisfy the lock in the build.
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

# A base image given by the user must exist locally or be pullable, before any build starts.
check_base() {
  [ -n "${BASE_IMAGE:-}" ] || return 0
  "$engine" image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  "$engine" pull "$BASE_IMAGE" >/dev/null 2>&1 \
    || die "BASE_IMAGE=$BASE_IMAGE: no such image here and it cannot be pulled; expected a Debian bookworm image with python3 and python3-venv (make base-image builds one)"
}

# Build options shared by both variants: base, torch source and the local wheel mirror.
build_options() {
  local dir
  [ -n "${BASE_IMAGE:-}" ] && options+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ -n "${TORCH_INDEX_URL+set}" ] && options+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  if [ -n "${WHEELS:-}" ]; then
    [ "$engine" = podman ] \
      || die "WHEELS=$WHEELS: local wheel folders are mounted into the build by podman only; use CONTAINER_ENGINE=podman"
    IFS=: read -ra dirs <<<"$WHEELS"
    for dir in "${dirs[@]}"; do
      [ -d "$dir" ] || die "WHEELS: $dir is not a folder; expected local wheel folders separated by ':'"
      options+=(--volume "$dir:$dir:ro")
    done
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS; do
      [ -n "${!var:-}" ] && options+=(--build-arg "$var=${!var}")
    done
  fi
  if [ -n "${PIP_CERT:-}" ] && [ "$engine" = podman ]; then
    [ -f "$PIP_CERT" ] || die "PIP_CERT=$PIP_CERT: not a file; expected a CA bundle (PEM)"
    options+=(--volume "$PIP_CERT:/run/stablerep-build/ca.pem:ro"
              --build-arg "PIP_CERT=/run/stablerep-build/ca.pem")
  fi
  # podman: the host's network reaches the package index (its default build network is a
  # private one), and the docker image format keeps SHELL (OCI drops it).
  [ "$engine" = podman ] && options+=(--network host --format docker)
  return 0
}

# One variant: build, then report time and size; a failed pip step names what it missed.
build() {
  local variant=$1 image=$2 start log missing size
  log=$(mktemp)
  start=$(date +%s)
  echo "images: building $image (images/Dockerfile.$variant) with $engine"
  if ! "$engine" build --file "images/Dockerfile.$variant" --build-arg "VERSION=$version" \
      "${options[@]}" --tag "$image" . 2>&1 | tee "$log"; then
    missing=$(grep -oE "No matching distribution found for [^ ]+|Cannot install [^ ]+ because[^.]*" "$log" | head -n1 || true)
    rm -f "$log"
    [ -n "$missing" ] && die "$image: pip could not satisfy requirements.lock: $missing (is the index or WHEELS mirror reachable?)"
    die "$image: '$engine build' failed (its output is above)"
  fi
  rm -f "$log"
  size=$("$engine" image inspect --format '{{.Size}}' "$image" 2>/dev/null || echo 0)
  echo "images: built $image in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
}

engine=$(pick_engine)
python="${PYTHON:-python3}"
tags=$(PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
  'from stablerep import __version__; from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE; print(__version__, CPU_IMAGE, CUDA_IMAGE)') \
  || die "could not read the image tags from stablerep.k8s.config with $python"
read -r version cpu_image cuda_image <<<"$tags"
variants=${IMAGES:-cpu cuda}
for variant in $variants; do
  case $variant in
    cpu|cuda) ;;
    *) die "IMAGES=$variants: unknown variant '$variant', expected cpu and/or cuda" ;;
  esac
done
options=()
check_base
build_options
for variant in $variants; do
  if [ "$variant" = cpu ]; then build cpu "$cpu_image"; else build cuda "$cuda_image"; fi
done
