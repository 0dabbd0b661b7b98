# Two entry points; both create/refresh .venv from pyproject.toml, so a fresh machine needs only
# Python >= 3.10 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_ARGS ?=
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/castseg demo $(DEMO_ARGS)

# Every core (pytest-xdist), a test file per worker: module fixtures are built once.
test: $(VENV)/.installed-dev
	$(PY) -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
