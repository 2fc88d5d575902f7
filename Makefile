# README's two commands. Each creates .venv (pip, CPU torch) when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install test
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -x -q -n 2
