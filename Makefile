# One virtual environment in .venv, made on first use. `make run` installs jetmesh and
# starts the whole mesh; `make test` also installs the dev tools and runs the test suite;
# `make check` adds lint and types.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: run test check lint types bench fault clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/jetmesh up

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# The repository root is the `jetmesh` package; mypy sees it through a link named jetmesh.
types: $(STAMP)
	mkdir -p $(VENV)/mypy-src && ln -sfn "$(CURDIR)" $(VENV)/mypy-src/jetmesh
	MYPYPATH=$(VENV)/mypy-src $(BIN)/mypy -p jetmesh

check: lint types test

fault: $(STAMP)
	$(BIN)/pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/ledger.py
	$(BIN)/python benchmarks/fanout.py
	$(BIN)/python benchmarks/steps.py

clean:
	rm -rf $(VENV) .jetmesh .pytest_cache .mypy_cache .ruff_cache
