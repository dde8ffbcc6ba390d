# The two set-up commands are `make demo` and `make test`; both create .venv and install when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench fixtures clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) fixtures/demo.py

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check wfactor tests bench fixtures
	$(VENV)/bin/mypy wfactor

bench: $(STAMP)
	$(PY) bench/run.py

fixtures: $(STAMP)
	$(PY) fixtures/make_family.py fixtures/family

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
