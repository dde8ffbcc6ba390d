# The two set-up commands are `make demo` and `make test`; both create .venv and install when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz lint bench fixtures docs clean

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

# 10,000 mutated families through both readers (derandomized: a failure reproduces); `make test` runs 250.
fuzz: $(STAMP)
	WFACTOR_FUZZ_EXAMPLES=10000 $(PY) -m pytest tests/test_fuzz.py -q -p no:cacheprovider --hypothesis-show-statistics

lint: $(STAMP)
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check wfactor tests bench fixtures
	$(VENV)/bin/mypy wfactor

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(PY) bench/run.py

docs: $(STAMP)
	$(PY) -m wfactor.clidoc README.md

fixtures: $(STAMP)
	$(PY) fixtures/make_family.py fixtures/family

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
