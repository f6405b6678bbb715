# One virtual environment in .venv, made on first use. `make run` starts the whole mesh;
# `make test` installs the dev tools and runs the test suite; `make check` adds lint and types.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check lint types bench fault clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
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
