# keep-ingest: every target installs what it needs into .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.toml
SRC    ?=
ARGS   ?=
# make bench: QUICK=1 for a small fast run; BENCH_ARGS for anything else (python -m bench --help).
QUICK      ?=
BENCH_ARGS ?=
BENCH_DIR  ?= /tmp/keep-ingest-bench
export BENCH_DIR

LISTEN ?= 127.0.0.1:25107
VOLUME ?= $(HOME)/.local/share/keep-ingest/keepstore

.PHONY: help install ingest keepstore test lint bench bench-md5 bench-clean clean

help:
	@echo "make ingest SRC=path [CONFIG=configs/default.toml] [ARGS=...]  upload a tree, print its manifest"
	@echo "make keepstore [LISTEN=127.0.0.1:25107] [VOLUME=dir]           run a local Keep server"
	@echo "make test                                                      run the test suite"
	@echo "make lint                                                      check the code with ruff"
	@echo "make bench [QUICK=1] [BENCH_ARGS=...] [BENCH_DIR=...]          benchmark against arv-put and md5sum"
	@echo "make bench BENCH_ARGS=\"--datasets tiny1m\"                       fresh put, re-runs and walk floor at 1,000,000 files"
	@echo "make bench-md5                                                 MD5 throughput per core for each engine and lane count"
	@echo "make bench-clean                                               remove the cached benchmark datasets"
	@echo "make clean                                                     remove the virtualenv and caches"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (for make ingest) and test install, each re-run when pyproject, setup.py
# or the C extension's source change (pip builds the extension in place).
BUILD_INPUTS := pyproject.toml setup.py ingest/_md5lanes.c ingest/_smallfiles.c

$(VENV)/.runtime: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.runtime

$(VENV)/.bench: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
	@echo "keep-ingest is installed as $(abspath $(BIN))/keep-ingest (use that path in crontabs)" >&2

# Only the manifest goes to stdout (`make ingest SRC=x > x.manifest`): the install
# steps, when due, run in a sub-make whose output (commands and pip) goes to stderr.
ingest:
	@if [ -z "$(SRC)" ]; then echo "usage: make ingest SRC=path [CONFIG=...]" >&2; exit 2; fi
	@$(MAKE) --no-print-directory -q $(VENV)/.runtime || $(MAKE) --no-print-directory $(VENV)/.runtime >&2
	@$(BIN)/keep-ingest put --config $(CONFIG) $(ARGS) $(SRC)

keepstore: $(VENV)/.runtime
	mkdir -p $(VOLUME)
	$(BIN)/keep-ingest keepstore --listen $(LISTEN) --volume $(VOLUME)

test: $(VENV)/.test
	$(BIN)/python -m pytest

$(VENV)/.lint: | $(BIN)/python
	$(BIN)/python -m pip install -q ruff
	touch $@

lint: $(VENV)/.lint
	$(BIN)/python -m ruff check ingest workers tests bench

bench: $(VENV)/.bench
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(BENCH_ARGS)

bench-md5: $(VENV)/.runtime
	$(BIN)/python -m bench.md5lanes

bench-clean:
	rm -rf "$(BENCH_DIR)"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info ingest/*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
