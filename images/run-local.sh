#!/usr/bin/env bash
# `make demo RUNNER=containers`: the pipeline through kfp.local's DockerRunner, every step in
# the CPU image (`make images IMAGES=cpu`) as UID 1000 with a read-only root, a /tmp tmpfs and
# no network, the data root mounted. The Docker API is DOCKER_HOST's, else docker's socket,
# else a podman service started on a private socket for this run.
#
#   PYTHON=.venv/bin/python IMAGE=... images/run-local.sh --recipe demo [run-local options]
#
# Exits 2 with one `error:` line when no Docker API can be had.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
image=${IMAGE:-$(PYTHONPATH="$PWD" "$python" -c \
  'from stablerep.k8s.config import CPU_IMAGE; print(CPU_IMAGE)')}

if [ -z "${DOCKER_HOST:-}" ] && [ ! -S /var/run/docker.sock ]; then
  command -v podman >/dev/null 2>&1 || {
    echo "error: RUNNER=containers: no Docker API: DOCKER_HOST is unset, /var/run/docker.sock is absent and podman is not installed" >&2
    exit 2
  }
  folder=$(mktemp -d)
  podman system service --time=0 "unix://$folder/podman.sock" >/dev/null 2>&1 &
  service=$!
  trap 'kill "$service" 2>/dev/null; wait "$service" 2>/dev/null; rm -rf "$folder"' EXIT
  for _ in $(seq 100); do [ -S "$folder/podman.sock" ] && break; sleep 0.2; done
  export DOCKER_HOST="unix://$folder/podman.sock"
  echo "run-local: podman's Docker API at $DOCKER_HOST"
fi
"$python" -m stablerep pipeline run-local --runner docker --image "$image" "$@"
