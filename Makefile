# The two set-up commands are `make demo` and `make test`; both create .venv and install when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz lint torch-free bench fixtures docs clean

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
	$(PY) -m pip install -q -c constraints.txt ruff mypy
	$(VENV)/bin/ruff check wfactor tests bench fixtures
	$(VENV)/bin/mypy wfactor

# The torch-free core in an environment without torch: the format, family checks, reference reader, CLI inspect.
NOTORCH := .venv-notorch
torch-free:
	$(PYTHON) -m venv $(NOTORCH)
	$(NOTORCH)/bin/python -m pip install -q --upgrade pip
	$(NOTORCH)/bin/python -m pip install -q numpy zstandard click rich
	$(NOTORCH)/bin/python -m pip install -q --no-deps -e .
	$(NOTORCH)/bin/python .ci/torch_free.py

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(PY) bench/run.py

docs: $(STAMP)
	$(PY) -m wfactor.clidoc docs/cli.md

fixtures: $(STAMP)
	$(PY) fixtures/make_family.py fixtures/family

clean:
	rm -rf $(VENV) $(NOTORCH) build *.egg-info .pytest_cache
