# stablerep: `make demo` and `make test` each do all the set-up on a fresh machine.
#
#   make demo    create .venv, install, run the pipeline locally (kfp.local; CPU, procedural
#                digits, ./data/demo; DEMO=demo_sd for the tiny Stable Diffusion path;
#                RUNNER=containers: every step in the CPU image, see images/run-local.sh)
#   make repro   create .venv, install, run the miniature replication (./data/repro, ~25 min on 2 cores)
#   make compile compile the Kubeflow pipeline (pipelines/ and k8s/pipeline/)
#   make test    create .venv, install, run the unit + integration tests
#   make lint    ruff
#   make bench   CPU benchmarks (tables against an in-process baseline)
#   make bench-gpu  the prepared GPU run (benchmarks/gpu/run.sh; SMOKE=1: toy size on the CPU)
#   make gpu-wheels download the wheels the GPU run carries into .wheels/ (lock pins)
#   make k8s     re-render the Kubernetes manifests in k8s/ from configs/k8s/cc12m_4x8.yaml
#   make images  build and tag the CPU and CUDA images (docker or podman; CONTAINER_ENGINE,
#                IMAGES=cpu, BASE_IMAGE, TORCH_INDEX_URL, WHEELS: see images/build.sh)
#   make base-image  a Debian bookworm base from Debian's packages (mmdebstrap), for machines
#                without registry access: make images BASE_IMAGE=localhost/stablerep-base:bookworm
#   make tools   create .venv-tools with checkov (.ci/tools.lock), which make test uses
#   make lock    re-resolve every dependency on purpose and rewrite requirements.lock
#   make clean   remove the venv and demo output

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# The only torch build this project pins (CUDA wheels; they run on CPU too).
TORCH_PINS  := torch==2.14.1 torchvision==0.29.1
STAMP       := $(VENV)/.installed
# Every install goes through the lock: today's resolve, next year (`make lock` refreshes it).
LOCK        := requirements.lock
PIP_LOCKED  = $(BIN)/python -m pip install -q -c $(LOCK)
PYTEST_ARGS ?=

.PHONY: venv tools tools-lock demo repro compile test test-unit test-integration lint bench \
        bench-gpu gpu-wheels lock k8s crd-schemas images base-image clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) --upgrade pip setuptools wheel
	$(PIP_LOCKED) $(TORCH_PINS)
	$(PIP_LOCKED) -e '.[dev]'
	@touch $(STAMP)

# A fresh resolve of pyproject's ranges in a scratch venv, frozen (pip, setuptools and wheel
# included) into $(LOCK). Run it on purpose, then run `make test` and commit both.
LOCK_VENV   := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev]'
	{ echo "# The resolved dependency set of stablerep (runtime + dev extra), used as pip constraints"; \
	  echo "# by make and the images. Written by 'make lock' on $$(date -u +%Y-%m-%d) with"; \
	  echo "# $$($(LOCK_VENV)/bin/python --version) on $$(uname -m); do not edit by hand."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "lock: $$(grep -vc '^#' $(LOCK)) pins written to $(LOCK)"

# checkov lives in a venv of its own: installed beside the project it downgrades botocore
# and packaging. .ci/tools.lock pins it and everything it pulls in (`make tools-lock`).
TOOLS_VENV  := .venv-tools
TOOLS_LOCK  := .ci/tools.lock
TOOLS_STAMP := $(TOOLS_VENV)/.installed

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): $(TOOLS_LOCK)
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q -r $(TOOLS_LOCK)
	@touch $(TOOLS_STAMP)

tools-lock:
	rm -rf $(TOOLS_VENV)
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q checkov
	{ echo "# checkov and its dependencies for $(TOOLS_VENV) (make tools). Written by 'make tools-lock'"; \
	  echo "# on $$(date -u +%Y-%m-%d) with $$($(TOOLS_VENV)/bin/python --version); do not edit by hand."; \
	  $(TOOLS_VENV)/bin/python -m pip freeze; } > $(TOOLS_LOCK).tmp
	mv $(TOOLS_LOCK).tmp $(TOOLS_LOCK)
	@touch $(TOOLS_STAMP)

DEMO        ?= demo
RUNNER      ?= processes

# The same pipeline function a cluster runs, through kfp.local on this machine.
demo: $(STAMP)
ifeq ($(filter $(RUNNER),processes containers),)
	@echo "error: RUNNER=$(RUNNER): expected processes (the default) or containers" >&2; exit 2
endif
ifeq ($(RUNNER),containers)
	PYTHON=$(BIN)/python images/run-local.sh --recipe $(DEMO)
else
	$(BIN)/stablerep pipeline run-local --recipe $(DEMO)
endif

# The paper's claims in miniature: every arm x 3 seeds through the real stages, one table.
repro: $(STAMP)
	$(BIN)/stablerep repro

# pipelines/stablerep_pipeline.yaml and k8s/pipeline/stablerep-pipeline.yaml (a test checks
# they equal a fresh compile). IMAGE=... compiles against an image you pushed.
compile: $(STAMP)
	$(BIN)/stablerep pipeline compile $(if $(IMAGE),--image $(IMAGE))

test: $(STAMP) $(TOOLS_STAMP)
	GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) $(TOOLS_STAMP)
	GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false $(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard stablerep tests benchmarks components pipelines)

bench: $(STAMP)
	$(BIN)/python benchmarks/captions.py
	$(BIN)/python benchmarks/generation.py --arch tiny --captions 8 -m 4 --size 64 --steps 10
	$(BIN)/python benchmarks/training.py --model vit_tiny --image-size 32 --captions 16 -k 2
	$(BIN)/python benchmarks/loader.py --captions 8 -k 2 --workers 2
	$(BIN)/python benchmarks/evaluation.py

# On a GPU machine without network (see README, "GPU run"): carry .wheels/ and run
# `bash benchmarks/gpu/run.sh` there; OUT=... moves the output (benchmarks/results/gpu).
bench-gpu:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) \
	  bash benchmarks/gpu/run.sh $(if $(SMOKE),--smoke)

gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu/wheels.py download .wheels

K8S_RECIPE  ?= configs/k8s/cc12m_4x8.yaml

# The training jobs' CRD schemas shipped in stablerep/k8s/schemas, from a folder of CRD YAMLs.
CRDS        ?= ../shared/schemas
crd-schemas: $(STAMP)
	$(BIN)/python -m stablerep.k8s.crd $(CRDS)

k8s: $(STAMP)
	rm -rf k8s/base k8s/overlays
	$(BIN)/stablerep k8s render --config $(K8S_RECIPE) --out k8s

# The tags are the constants the manifests and the components' base_image use
# (stablerep.k8s.config), read from this checkout; the package's imports there are stdlib only,
# so no venv is needed to build the images.
images:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) images/build.sh

base-image:
	images/base.sh

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(TOOLS_VENV) data/demo data/demo_sd data/repro .pytest_cache
