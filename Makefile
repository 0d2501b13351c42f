# The CRM suite. Two commands matter: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# chassis, then every service in services.toml, then the gateway (tools/registry.py: bare python3).
PACKAGES := $(shell $(PYTHON) tools/registry.py packages)
ifeq ($(strip $(PACKAGES)),)
$(error services.toml could not be read: run $(PYTHON) tools/registry.py packages)
endif
PYPROJECTS := proto/pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGES))
PROTOS := $(shell find proto/crm -name '*.proto' 2>/dev/null)
GEN_STAMP := proto/gen/.stamp

.PHONY: all venv proto run test lint unit bench k8s-check clean help

help:
	@echo "make run        start PostgreSQL (embedded), the five services and the gateway"
	@echo "make test       lint + unit, integration and end-to-end tests"
	@echo "make lint       buf lint + buf breaking (vs main) + ruff"
	@echo "make bench      benchmarks (prints figures beside a same-run baseline)"
	@echo "make proto      regenerate the Python stubs"

venv: $(STAMP)

# Stubs must exist before the crm-protos package is installed (it packages proto/gen).
$(STAMP): $(PYPROJECTS) services.toml requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt grpcio-tools
	$(PY) tools/gen_protos.py
	touch $(GEN_STAMP)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt -e proto -e 'chassis[embedded]' \
		$(addprefix -e ,$(filter-out chassis,$(PACKAGES)))
	touch $@

$(GEN_STAMP): $(PROTOS) tools/gen_protos.py | $(STAMP)
	$(PY) tools/gen_protos.py
	touch $@

proto: $(GEN_STAMP)

node_modules/.bin/buf: package.json package-lock.json
	# npm ci trips over the lock file's optional per-platform binaries (npm 11); install honours the lock.
	npm install --no-audit --no-fund --no-save --loglevel=error
	touch $@

run: venv proto
	$(PY) tools/devrun.py

lint: venv proto node_modules/.bin/buf
	cd proto && ../node_modules/.bin/buf lint
	@if git rev-parse --verify -q refs/heads/main >/dev/null; then \
		cd proto && ../node_modules/.bin/buf breaking --against '../.git#branch=main,subdir=proto' && echo "buf breaking: no breaking change against main"; \
	else echo "buf breaking: skipped (no local main branch)"; fi
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || (echo "run: $(BIN)/ruff format ." && false)

# The CDNOW summaries (Fader & Hardie) the customer-value model is validated on ship in the
# MIT-licensed Lifetimes wheel: fetched from PyPI as test data, never installed or copied.
CDNOW := .cache/Lifetimes-0.11.3-py3-none-any.whl
$(CDNOW): | venv
	$(PY) -m pip download --quiet --no-deps --dest .cache lifetimes==0.11.3

test: lint k8s-check $(CDNOW)
	$(BIN)/pytest

bench: venv proto
	$(PY) -m bench && $(PY) -m bench.sales_bench && $(PY) -m bench.support_bench
	$(PY) -m bench.campaign_segments_bench && $(PY) -m bench.campaign_mail_bench && $(PY) -m bench.campaign_delivery_bench
	$(PY) -m bench.campaign_points_bench && $(PY) -m bench.reporting_bench && $(PY) -m bench.reporting_scale_bench

clean:
	rm -rf $(VENV) proto/gen node_modules .run

# --- k8s-check: images and Kubernetes manifests, checked without a cluster (k8s/README.md) ---
# Its tools live in their own virtualenv (checkov's pins clash with constraints.txt).
K8S_VENV := .venv-k8s
K8S_STAMP := $(K8S_VENV)/.installed

$(K8S_STAMP): requirements-k8s.txt
	test -x $(K8S_VENV)/bin/python || $(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-k8s.txt
	touch $@

k8s-check: $(K8S_STAMP)
	$(K8S_VENV)/bin/python tools/k8s_check.py
