# qvirtd: `make demo` and `make test` do all the set-up on a fresh Debian 12 machine (as root):
# Debian packages (QEMU), a virtualenv with the package, and the cached test guest.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qvirtd-installed
PYTEST_ARGS ?=

.PHONY: setup host-deps venv guest demo test lint typecheck unit integration bench bench-libvirt clean

setup: host-deps venv guest

host-deps:
	@PYTHON=$(PYTHON) scripts/install-host-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: host-deps $(STAMP)

guest: venv
	$(PY) tests/guest/build_guest.py >/dev/null

demo: setup
	$(PY) scripts/demo.py

lint: venv
	$(VENV)/bin/ruff check qvirtd tests scripts $(wildcard benchmarks)

typecheck: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

test: setup lint typecheck
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

bench: setup
	$(PY) benchmarks/bench_compare.py
	$(PY) benchmarks/bench_queries.py
	$(PY) benchmarks/bench_events.py

# The same, plus Debian's libvirt measured in the same run (installs libvirt itself).
bench-libvirt: setup
	$(PY) benchmarks/bench_compare.py --libvirt
	$(PY) benchmarks/bench_queries.py --libvirt
	$(PY) benchmarks/bench_events.py
