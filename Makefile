# orchestratord: build, test and install.
#
#   make test     create .venv, install the package with its test extras,
#                 install the pinned opencode server, run the test suite
#   make bench    the same setup, then the benchmarks: one table on stdout,
#                 the figures in $(BENCH_OUT)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
OPENCODE_DIR := tests/opencode
OPENCODE_BIN := $(OPENCODE_DIR)/node_modules/.bin/opencode
PYTEST_ARGS ?=
BENCH_OUT ?= bench-results/bench.json

.PHONY: all venv opencode test bench check-tools clean

all: test

check-tools:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or newer" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is older than 3.11; set PYTHON=python3.11 or newer" >&2; exit 1; }
	@command -v node >/dev/null || { echo "error: node not found; the tests run the real opencode server from npm: install Node.js 18+ and npm" >&2; exit 1; }
	@command -v npm >/dev/null || { echo "error: npm not found; install npm (it comes with Node.js)" >&2; exit 1; }

$(VENV)/.installed: pyproject.toml | check-tools
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(OPENCODE_DIR)/node_modules/.installed: $(OPENCODE_DIR)/package-lock.json | check-tools
	cd $(OPENCODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	test -x $(OPENCODE_BIN) || { echo "error: npm ci did not install $(OPENCODE_BIN)" >&2; exit 1; }
	touch $@

opencode: $(OPENCODE_DIR)/node_modules/.installed

test: venv opencode
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: venv opencode
	$(VPY) -m tests.bench.run --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) $(OPENCODE_DIR)/node_modules .pytest_cache build *.egg-info bench-results
