#!/usr/bin/env bash
# `make base-image`: a Debian bookworm base image with python3 and python3-venv, built from
# Debian's packages with mmdebstrap and imported into the container engine, for machines (and
# air-gapped clusters) that reach a Debian mirror but no container registry:
#
#   make base-image && make images BASE_IMAGE=localhost/stablerep-base:bookworm
#
#   CONTAINER_ENGINE=podman   the engine to import into (default: podman, then docker)
#   BASE_TAG=TAG              the tag (default localhost/stablerep-base:bookworm)
#   DEBIAN_MIRROR=URL         the Debian mirror (default: mmdebstrap's, from the host's apt)
#
# Exits 2 with one `error:` line when mmdebstrap or an engine is missing.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

tag=${BASE_TAG:-localhost/stablerep-base:bookworm}
command -v mmdebstrap >/dev/null 2>&1 \
  || die "mmdebstrap: not found on PATH; expected Debian's mmdebstrap (apt-get install mmdebstrap)"
engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  for candidate in podman docker; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
      engine=$candidate
      break
    fi
  done
fi
[ -n "$engine" ] && "$engine" info >/dev/null 2>&1 \
  || die "no usable container engine (${engine:-docker or podman}) to import the base image into"

start=$(date +%s)
tarball=$(mktemp --suffix=.tar)
trap 'rm -f "$tarball"' EXIT
echo "base-image: debootstrapping bookworm (python3, python3-venv) with mmdebstrap"
# minbase + what the images need: python3 with venv, CA certificates, bash (SHELL pipefail).
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  --aptopt='APT::Install-Recommends "false"' bookworm "$tarball" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"}
"$engine" import --quiet --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$tag" >/dev/null
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
echo "base-image: built $tag in $(( $(date +%s) - start )) s, $(( size / 1000000 )) MB"
