# README's two commands. Each creates .venv (pip, CPU torch) when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,gpu-compile]'  # gpu-compile: tests/gpu compile every kernel for H100/A100
	touch $@

.PHONY: install train test
install: $(VENV)/.installed

# The main job: tokenizer + shards from the Python standard library, a small code model, a sample.
# --resume makes it idempotent: a finished run only re-prints its result, an interrupted one continues.
train: $(VENV)/.installed
	$(VENV)/bin/jaxformer train --config tiny_code --resume

test: $(VENV)/.installed
	$(PY) -m pytest -x -q -n 2 --dist worksteal
