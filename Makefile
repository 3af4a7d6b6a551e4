# Two commands do everything on a fresh machine:
#   make demo   creates .venv (if missing) and runs `nanscope demo`
#   make test   creates .venv (if missing) and runs the whole test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanscope demo

test: $(STAMP)
	$(VENV)/bin/python scripts/run_tests.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
