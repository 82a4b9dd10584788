# orchestratord: build, test and install.
#
#   make test       create .venv, install the package with its test extras,
#                   install the pinned opencode server (and 1.18.3, for the
#                   compatibility smoke), run the test suite on PYTEST_WORKERS (2) processes
#   make demo       the whole thing working, offline: a real opencode serve with a
#                   scripted model and a sample team, and the daemon in front of it
#   make install    the package and its runtime dependencies (EXTRAS=metrics adds the
#                   metrics extra), the systemd units, the example config, the
#                   sysusers/tmpfiles snippets, the README and docs/ (DESTDIR, PREFIX,
#                   SYSCONFDIR are honoured); needs Python 3.11+ and pip's registry,
#                   not Node.js
#   make uninstall  remove what install put there; never the config or the ledger
#   make bench      the same setup, then the benchmarks: one table on stdout,
#                   the figures in $(BENCH_OUT)
#   make faults     the long form of the fault-injection cases (about an hour,
#                   the soak included); prints the results table, kept in $(FAULTS_OUT)
#   make docs       write docs/configuration.md from the config schema (a test fails
#                   when it is out of date)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
OPENCODE_DIR := tests/opencode
OPENCODE_BIN := $(OPENCODE_DIR)/node_modules/.bin/opencode
# The oldest release of the supported range the registry serves: the compatibility smoke runs on it too.
COMPAT_DIR := tests/opencode-compat
COMPAT_BIN := $(COMPAT_DIR)/node_modules/.bin/opencode
PYTEST_ARGS ?=
# make test runs the suite on this many processes (pytest-xdist; 0 runs it in this one).
# Each runs its own opencode servers, about 650 MB each: more than the cores rarely helps.
PYTEST_WORKERS ?= 2
BENCH_OUT ?= bench-results/bench.json
FAULTS_OUT ?= bench-results/faults.jsonl

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
PKGLIBDIR ?= $(LIBDIR)/opencode-orchestrator
DOCDIR ?= $(PREFIX)/share/doc/opencode-orchestrator
UNITDIR ?= $(LIBDIR)/systemd/system
USERUNITDIR ?= $(LIBDIR)/systemd/user
SYSUSERSDIR ?= $(LIBDIR)/sysusers.d
TMPFILESDIR ?= $(LIBDIR)/tmpfiles.d
# launchd (macOS): on by default there. Then the config goes under $(PREFIX)/etc, and make
# install makes the log and state directories the plist and the config name.
LAUNCHD ?= $(if $(filter Darwin,$(shell uname -s)),yes,no)
ifeq ($(LAUNCHD),yes)
SYSCONFDIR ?= $(PREFIX)/etc
LOCALSTATEDIR ?= $(PREFIX)/var
else
SYSCONFDIR ?= /etc
LOCALSTATEDIR ?= /var
endif
LAUNCHD_USER ?= opencode-orchestrator
LOGDIR ?= $(LOCALSTATEDIR)/log/opencode-orchestrator
STATEDIR ?= $(LOCALSTATEDIR)/lib/opencode-orchestrator
# The interpreter the installed command runs with: one the service user can read.
INSTALL_PYTHON ?= /usr/bin/python3
# Where opencode-serve.service finds opencode (npm install -g opencode-ai puts it here).
OPENCODE ?= /usr/local/bin/opencode
# Optional extras of the package to install with it: EXTRAS=metrics adds prometheus_client.
EXTRAS ?=
# Extra pip arguments, e.g. --no-deps for a package whose dependencies come from the system.
PIP_INSTALL_ARGS ?=
# The runtime is built with a virtualenv of its own, made by `python3 -m venv`: never the
# test one (no Node.js, no test packages), and only the package's runtime dependencies
# reach $(PKGLIBDIR).
BUILD_VENV ?= build/install-venv

CONFIG_DIR := $(DESTDIR)$(SYSCONFDIR)/opencode-orchestrator
UNITS := opencode-orchestrator.service opencode-orchestrator@.service opencode-serve.service
USER_UNITS := opencode-orchestrator.service opencode-serve.service
INSTALL_PATHS := sed -e 's|/usr/local/bin/opencode|$(OPENCODE)|g' \
	-e 's|/usr/local/bin/orchestratord|$(BINDIR)/orchestratord|g' \
	-e 's|/usr/local/share/doc/opencode-orchestrator|$(DOCDIR)|g' \
	-e 's|/etc/opencode-orchestrator|$(SYSCONFDIR)/opencode-orchestrator|g'
PLIST_PATHS := sed -e 's|/usr/local/bin/orchestratord|$(BINDIR)/orchestratord|g' \
	-e 's|/usr/local/etc/opencode-orchestrator|$(SYSCONFDIR)/opencode-orchestrator|g' \
	-e 's|/usr/local/var/log/opencode-orchestrator|$(LOGDIR)|g' \
	-e 's|<string>opencode-orchestrator</string><!-- the user -->|<string>$(LAUNCHD_USER)</string>|'
CONFIG_PATHS := $(if $(filter yes,$(LAUNCHD)),sed -e 's|/var/lib/opencode-orchestrator|$(STATEDIR)|g',cat)
INSTALL_SPEC := .$(if $(strip $(EXTRAS)),[$(EXTRAS)])

.PHONY: all venv opencode promtool libfaketime lint test bench faults demo docs install uninstall check-tools clean

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

$(COMPAT_DIR)/node_modules/.installed: $(COMPAT_DIR)/package-lock.json | check-tools
	cd $(COMPAT_DIR) && npm ci --no-audit --no-fund --loglevel=error
	test -x $(COMPAT_BIN) || { echo "error: npm ci did not install $(COMPAT_BIN)" >&2; exit 1; }
	touch $@

opencode: $(OPENCODE_DIR)/node_modules/.installed $(COMPAT_DIR)/node_modules/.installed

# promtool checks the shipped alert rules. It comes out of Debian's prometheus package,
# unpacked into tests/.tools without installing it (no service is set up or started);
# where apt-get cannot fetch it, the alert tests skip and say why (under CI=true they fail).
PROMTOOL := tests/.tools/promtool

$(PROMTOOL):
	@mkdir -p tests/.tools/deb
	@if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	  cd tests/.tools/deb && { apt-get download prometheus >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
	  && dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool ../promtool \
	  || echo "note: could not fetch promtool (Debian package prometheus); the alert rule tests will skip (and fail under CI=true)" >&2; \
	else echo "note: no apt-get here; the alert rule tests will skip" >&2; fi
	@rm -rf tests/.tools/deb

promtool: $(PROMTOOL)

# libfaketime moves the wall clock of the daemon under test (LD_PRELOAD) and leaves the
# monotonic clock alone, for the clock-jump case. It comes out of Debian's libfaketime
# package the same way, never installed; where apt-get cannot fetch it, that case skips.
LIBFAKETIME := tests/.tools/libfaketime.so.1

$(LIBFAKETIME):
	@mkdir -p tests/.tools/deb
	@if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	  cd tests/.tools/deb && { apt-get download libfaketime >/dev/null 2>&1 \
	    || { apt-get update -qq >/dev/null 2>&1 && apt-get download libfaketime >/dev/null 2>&1; }; } \
	  && dpkg-deb -x libfaketime_*.deb root && cp root/usr/lib/*/faketime/libfaketime.so.1 ../libfaketime.so.1 \
	  || echo "note: could not fetch libfaketime (Debian package libfaketime); the clock-jump test will skip (and fail under CI=true)" >&2; \
	else echo "note: no apt-get here; the clock-jump test will skip" >&2; fi
	@rm -rf tests/.tools/deb

libfaketime: $(LIBFAKETIME)

# Types (mypy, the strictness in pyproject.toml) and lint (ruff) of the package and the
# tests, with zero findings: make test runs them first.
lint: venv
	$(VPY) -m mypy orchestratord tests
	$(VENV)/bin/ruff check orchestratord tests

test: venv opencode promtool libfaketime lint
	$(VPY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: venv opencode
	$(VPY) -m tests.bench.run --out $(BENCH_OUT)

faults: venv opencode promtool libfaketime
	@mkdir -p $(dir $(FAULTS_OUT)) && rm -f $(FAULTS_OUT)
	ORCHESTRATORD_FAULTS=long ORCHESTRATORD_FAULTS_REPORT=$(abspath $(FAULTS_OUT)) \
	  $(VPY) -m pytest -m faults $(PYTEST_ARGS); status=$$?; \
	  $(VPY) -m tests.support.faults $(FAULTS_OUT); exit $$status

demo: venv opencode
	$(VPY) -m tests.support.demo

docs: venv
	$(VPY) -m orchestratord config reference > docs/configuration.md.tmp || { rm -f docs/configuration.md.tmp; exit 1; }
	mv docs/configuration.md.tmp docs/configuration.md

$(BUILD_VENV)/.made:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or newer" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: $(PYTHON) is older than 3.11; set PYTHON=python3.11 or newer" >&2; exit 1; }
	$(PYTHON) -m venv $(BUILD_VENV)
	touch $@

install: $(BUILD_VENV)/.made
	@case "$(INSTALL_PYTHON)" in /*) ;; *) echo "error: INSTALL_PYTHON must be an absolute path" >&2; exit 1;; esac
	@$(INSTALL_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: INSTALL_PYTHON=$(INSTALL_PYTHON) is missing or older than 3.11; set it to a Python 3.11+ the service user can run" >&2; exit 1; }
	$(BUILD_VENV)/bin/python -m pip install --quiet --no-compile --upgrade --target "$(DESTDIR)$(PKGLIBDIR)" $(PIP_INSTALL_ARGS) '$(INSTALL_SPEC)'
	rm -rf "$(DESTDIR)$(PKGLIBDIR)/bin"
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(USERUNITDIR)" \
		"$(DESTDIR)$(SYSUSERSDIR)" "$(DESTDIR)$(TMPFILESDIR)" "$(DESTDIR)$(DOCDIR)" "$(CONFIG_DIR)"
	printf '#!%s -s\n# orchestratord, installed by make install\nimport sys\nsys.path.insert(0, "%s")\nfrom orchestratord.cli import main\nsys.exit(main())\n' \
		"$(INSTALL_PYTHON)" "$(PKGLIBDIR)" > "$(DESTDIR)$(BINDIR)/orchestratord"
	chmod 0755 "$(DESTDIR)$(BINDIR)/orchestratord"
	for unit in $(UNITS); do \
		$(INSTALL_PATHS) "packaging/systemd/$$unit" > "$(DESTDIR)$(UNITDIR)/$$unit" && chmod 0644 "$(DESTDIR)$(UNITDIR)/$$unit"; done
	for unit in $(USER_UNITS); do \
		$(INSTALL_PATHS) "packaging/systemd/user/$$unit" > "$(DESTDIR)$(USERUNITDIR)/$$unit" && chmod 0644 "$(DESTDIR)$(USERUNITDIR)/$$unit"; done
	install -m 0644 packaging/sysusers.d/opencode-orchestrator.conf "$(DESTDIR)$(SYSUSERSDIR)/opencode-orchestrator.conf"
	$(INSTALL_PATHS) packaging/tmpfiles.d/opencode-orchestrator.conf > "$(DESTDIR)$(TMPFILESDIR)/opencode-orchestrator.conf"
	chmod 0644 "$(DESTDIR)$(TMPFILESDIR)/opencode-orchestrator.conf"
	install -m 0644 README.md "$(DESTDIR)$(DOCDIR)/"
	$(INSTALL_PATHS) packaging/systemd/opencode-orchestrator.service.d/teams-in-home.conf > "$(DESTDIR)$(DOCDIR)/teams-in-home.conf"
	$(PLIST_PATHS) packaging/launchd/org.opencode-orchestrator.orchestratord.plist > "$(DESTDIR)$(DOCDIR)/org.opencode-orchestrator.orchestratord.plist"
	chmod 0644 "$(DESTDIR)$(DOCDIR)/teams-in-home.conf" "$(DESTDIR)$(DOCDIR)/org.opencode-orchestrator.orchestratord.plist"
	install -d "$(DESTDIR)$(DOCDIR)/docs"
	install -m 0644 docs/*.md "$(DESTDIR)$(DOCDIR)/docs/"
	$(CONFIG_PATHS) etc/opencode-orchestrator/orchestrator.toml > "$(DESTDIR)$(DOCDIR)/orchestrator.toml.example"
	chmod 0644 "$(DESTDIR)$(DOCDIR)/orchestrator.toml.example"
	@if [ -e "$(CONFIG_DIR)/orchestrator.toml" ]; then \
		echo "kept the existing $(CONFIG_DIR)/orchestrator.toml (the shipped one is $(DESTDIR)$(DOCDIR)/orchestrator.toml.example)"; \
	else install -m 0644 "$(DESTDIR)$(DOCDIR)/orchestrator.toml.example" "$(CONFIG_DIR)/orchestrator.toml"; fi
	@if [ "$(LAUNCHD)" = yes ]; then \
		install -d -m 0750 "$(DESTDIR)$(LOGDIR)" "$(DESTDIR)$(STATEDIR)" && \
		if [ -z "$(DESTDIR)" ] && id -u "$(LAUNCHD_USER)" >/dev/null 2>&1; then \
			chown "$(LAUNCHD_USER)" "$(LOGDIR)" "$(STATEDIR)"; \
		else echo "note: give $(LOGDIR) and $(STATEDIR) to the user $(LAUNCHD_USER) the plist runs as (see docs/installation.md#launchd)"; fi; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemd-sysusers "$(SYSUSERSDIR)/opencode-orchestrator.conf" && \
		systemd-tmpfiles --create "$(TMPFILESDIR)/opencode-orchestrator.conf" && \
		systemctl daemon-reload && \
		echo "installed; start it with: systemctl enable --now opencode-orchestrator"; fi

uninstall:
	rm -f "$(DESTDIR)$(BINDIR)/orchestratord"
	rm -rf "$(DESTDIR)$(PKGLIBDIR)" "$(DESTDIR)$(DOCDIR)"
	for unit in $(UNITS); do rm -f "$(DESTDIR)$(UNITDIR)/$$unit"; done
	for unit in $(USER_UNITS); do rm -f "$(DESTDIR)$(USERUNITDIR)/$$unit"; done
	rm -f "$(DESTDIR)$(SYSUSERSDIR)/opencode-orchestrator.conf" "$(DESTDIR)$(TMPFILESDIR)/opencode-orchestrator.conf"
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "left in place: $(CONFIG_DIR) (config), the ledger under /var/lib/opencode-orchestrator (or $(STATEDIR)) and the teams under /var/lib/opencode-serve"

clean:
	rm -rf $(VENV) $(OPENCODE_DIR)/node_modules tests/.tools .pytest_cache build *.egg-info bench-results
