# One entry point for people and CI. Every target creates the environment it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true

.PHONY: setup demo demo-domains test test-slow test-all lint bench clean postgres

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone: the pinned CPU wheel (see docs/stack.md), then everything else.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup  ## the main job: the whole pipeline on the default domain (citation_intent, shared model, CPU)
	$(BIN)/l3m run configs/demo.yaml

demo-domains: setup  ## three domains (weight_mask / lora) over one base, one multi-domain bento
	for d in citation_intent chemprot hyperpartisan; do $(BIN)/l3m run configs/domains/$$d.yaml || exit $$?; done
	$(BIN)/l3m models list
	$(BIN)/bentoml list l3m_domains

test: setup  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest -q

# The slow scale-out test (tests/test_scale_prefect.py) starts a real PostgreSQL server from
# the distribution's package; install it when initdb is nowhere (Debian keeps it off PATH).
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; fi

test-slow: setup postgres
	$(BIN)/python -m pytest -q -m slow

test-all: setup postgres
	$(BIN)/python -m pytest -q -m 'slow or not slow'

lint: setup  ## ruff, and mypy on l3m/ flows/ serving/ (settings in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .bench
