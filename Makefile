# `make demo` and `make test` each set themselves up on a fresh machine:
# a project virtualenv in .venv (reused), an editable install with the dev
# extras (skipped when setup.py has not changed since), and a Java check.
# uv installs from its cache in ~/.cache/uv (linked, not unpacked again: about
# 25 s for torch, Spark and the rest against 110 s with pip); pip does it where
# uv cannot.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.userlens-installed

.PHONY: demo test test-fast lint setup java browser clean

setup: $(STAMP) java

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "userlens needs Python >= 3.10, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[dev,privacy]' || $(PY) -m pip install -q -e '.[dev,privacy]'
	@touch $(STAMP)

java:
	@bash scripts/check-java.sh

# The report's browser test (tests/test_report.py) renders it in headless Chromium: Debian's package, installed
# where apt-get can (as root); elsewhere the test is skipped with a line that says so.
browser:
	@bash scripts/check-chromium.sh

demo: setup
	$(VENV)/bin/userlens demo

# Test modules run in TEST_WORKERS processes (pytest-xdist), a whole module per process so that its
# module-scoped pipeline runs once; each process has its own local Spark session (2 GiB driver). The
# suite is CPU-bound: on two cores about 25 min with 2 (docs/benchmarks.md), and more processes gained nothing. The default is
# one per core, at most 4, and at most one per 5 GiB of memory (a Spark driver, torch and MiniLM each).
# Modules are handed out in tests/conftest.py's order, longest first (--no-loadscope-reorder: pytest-xdist
# otherwise hands them out by their number of tests, and a long module with few tests ran alone at the end).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30; print(max(1, min(len(os.sched_getaffinity(0)), 4, int(gib // 5))))' 2>/dev/null || echo 2)

test: setup browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The unit-level tests: no whole pipelines, no demo, no cluster, no measurement at scale (tests marked
# `pipeline`, `cluster` or `scale`).
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not pipeline and not cluster and not scale" tests

# ruff (lint and format check) and mypy over lib/ (pyproject.toml)
lint: setup
	$(PY) -m ruff check lib tests bench scripts jobs
	$(PY) -m ruff format --check lib tests bench scripts jobs
	$(PY) -m mypy

clean:
	rm -rf warehouse spark-warehouse metastore_db derby.log data models reports .pytest_cache
