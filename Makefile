# stablerep: `make demo` and `make test` each do all the set-up on a fresh machine.
#
#   make demo    create .venv, install, run the local demo (CPU, tiny models, ./data/demo)
#   make test    create .venv, install, run the unit + integration tests
#   make lint    ruff
#   make bench   CPU benchmarks (tables against an in-process baseline)
#   make clean   remove the venv and demo output

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# The only torch build this project pins (CUDA wheels; they run on CPU too).
TORCH_PINS  := torch==2.14.1 torchvision==0.29.1
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-unit test-integration lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

DEMO        ?= configs/demo.yaml

demo: $(STAMP)
	$(BIN)/stablerep captions --config $(DEMO)
	$(BIN)/stablerep generate --config $(DEMO)
	$(BIN)/stablerep train --config $(DEMO)
	$(BIN)/stablerep eval --config $(DEMO)

test: $(STAMP)
	GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false $(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard stablerep tests benchmarks components pipelines)

bench: $(STAMP)
	$(BIN)/python benchmarks/captions.py
	$(BIN)/python benchmarks/generation.py --arch tiny --captions 8 -m 4 --size 64 --steps 10
	$(BIN)/python benchmarks/training.py --model vit_tiny --image-size 32 --captions 16 -k 2
	$(BIN)/python benchmarks/evaluation.py

clean:
	rm -rf $(VENV) data/demo .pytest_cache
