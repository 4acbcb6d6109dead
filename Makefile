# moeforge — every user-facing target does its own set-up on a fresh machine.
#
#   make demo     venv + deps + a tiny CPU run
#   make test     venv + deps + the whole test suite (what CI runs)
#   make bench    venv + deps + benchmarks
#   make deepspeed  venv + the optional DeepSpeed engine (DS_BUILD_OPS=0: compiles nothing)
#   make clean    remove build/test caches (distclean: the venv too)
#
# Variables (override on the command line, e.g. `make test PYTHON=python3.12`):
#   PYTHON          interpreter used to create the venv          (python3)
#   VENV            venv directory                               (.venv)
#   TORCH_SPEC      torch installed first on machines without nvidia-smi
#                   (torch==2.13.0); set it empty to skip that step
#   PIP_TORCH_ARGS  extra pip args for that torch install, e.g. the CPU index:
#                   PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
#   EXTRAS          extras installed with the project            (dev)
#   ARGS            extra arguments for demo/test/bench
#
# OMP_NUM_THREADS is left as it is in your environment (unset by default).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
EXTRAS ?= dev
ARGS ?=
BENCH ?= bench/hf_baseline.py
STAMP := $(VENV)/.installed

.PHONY: help venv deepspeed demo test bench clean distclean

help:
	@sed -n '3,8p' Makefile | sed 's/^# *//'

venv: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "moeforge needs Python >= 3.10, got " + sys.version' \
		|| { echo "Set PYTHON=<python3.10+> (e.g. make test PYTHON=python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "python -m venv failed; on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
	$(PIP) install --upgrade pip

# Reinstall only when pyproject.toml changes (or the venv is new).
# Without nvidia-smi (and with no torch in the venv yet), install the CPU torch
# first so that `pip install -e .` finds `torch>=2.9` satisfied and never pulls
# the multi-GB CUDA build. GPU machines get torch from the project requirement,
# or keep the build you installed into the venv beforehand.
$(STAMP): pyproject.toml | $(PY)
	@if [ -n "$(strip $(TORCH_SPEC))" ] && ! command -v nvidia-smi >/dev/null 2>&1 \
	    && ! $(PY) -c 'import torch' >/dev/null 2>&1; then \
		echo "+ $(PIP) install '$(TORCH_SPEC)' $(PIP_TORCH_ARGS)"; \
		$(PIP) install '$(TORCH_SPEC)' $(PIP_TORCH_ARGS); \
	fi
	$(PIP) install -e '.[$(EXTRAS)]'
	@touch $@

# parallel.data_parallel=deepspeed. DS_BUILD_OPS=0 builds no C++/CUDA op at install time (a CPU
# machine has no CUDA to build against); the one op the engine may need, DeepSpeedCPUAdam for
# offload_optimizer=cpu, is JIT-built on first use and cached (TORCH_EXTENSIONS_DIR).
deepspeed: venv
	DS_BUILD_OPS=0 $(PIP) install -e '.[$(EXTRAS),deepspeed]'

# The trainer (`python -m train`) takes over once it exists; until then the
# model smoke run.
demo: venv
	@if [ -f train/__main__.py ]; then \
		echo "+ $(PY) -m train --config configs/tiny.yaml $(ARGS)"; \
		$(PY) -m train --config configs/tiny.yaml $(ARGS); \
	else \
		echo "+ $(PY) -m models.smoke $(ARGS)"; \
		$(PY) -m models.smoke $(ARGS); \
	fi

test: venv
	$(PY) -m pytest -q $(ARGS)

bench: venv
	$(PY) $(BENCH) $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .cache
	find . \( -path ./.git -o -path './$(VENV)' \) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
