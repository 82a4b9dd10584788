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

.PHONY: all venv opencode promtool test bench check-tools clean

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

# promtool checks the shipped alert rules. It comes out of Debian's prometheus package,
# unpacked into tests/.tools without installing it (no service is set up or started);
# where apt-get cannot fetch it, the alert tests skip and say why.
PROMTOOL := tests/.tools/promtool

$(PROMTOOL):
	@mkdir -p tests/.tools/deb
	@if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	  cd tests/.tools/deb && { apt-get download prometheus >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
	  && dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool ../promtool \
	  || echo "note: could not fetch promtool (Debian package prometheus); the alert rule tests will skip" >&2; \
	else echo "note: no apt-get here; the alert rule tests will skip" >&2; fi
	@rm -rf tests/.tools/deb

promtool: $(PROMTOOL)

test: venv opencode promtool
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: venv opencode
	$(VPY) -m tests.bench.run --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) $(OPENCODE_DIR)/node_modules tests/.tools .pytest_cache build *.egg-info bench-results
