# memcr-py: build the parasite, install into .venv, demo, test, bench.
PYTHON ?= python3
VENV ?= .venv
# make install-system: where, the daemon's user, its group (alone may start the launcher), the clients' group
# (-g), the targets' group (-G), the folders for the sockets and the dumps (docs/SECURITY.md)
PREFIX ?= /opt/memcr
MEMCR_USER ?= memcr
MEMCR_GROUP ?= memcr
MEMCR_CLIENTS ?= memcr-clients
MEMCR_TARGETS ?= memcr-targets
MEMCR_RUN ?= /run/memcr
MEMCR_STATE ?= /var/lib/memcr
# 1: install under /tmp, /var/tmp, /home, /root or /run/user, which memcr.service cannot see (a start by hand only)
MEMCR_ALLOW_TMP_PREFIX ?=
BIN := $(VENV)/bin
PY_PATHS := memcr memcr_client tests bench scripts parasite setup.py
STAMP := $(VENV)/.installed-stamp

all: parasite

parasite:
	$(MAKE) -C parasite

system:
	sh scripts/setup-system.sh

$(STAMP): pyproject.toml setup.py memcr_client/pyproject.toml
	sh scripts/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the client first: memcr-py depends on it, and it is this tree's, not PyPI's
	$(BIN)/python -m pip install -q -e ./memcr_client
	$(BIN)/python -m pip install -q -e '.[test]'
	# a venv from before the split: removing the old memcr-py took the memcr-client script with it
	test -x $(BIN)/memcr-client || $(BIN)/python -m pip install -q --no-deps --force-reinstall -e ./memcr_client
	touch $@

# memcr and memcr-client into .venv/bin (editable installs of this tree)
install: $(STAMP) parasite

demo: install
	$(BIN)/python scripts/demo.py

# seconds, and no root for the checks themselves: lint and format of every Python file, types, the unit tests
check: install
	$(BIN)/ruff check $(PY_PATHS)
	$(BIN)/ruff format --check $(PY_PATHS)
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests/unit

# the checks, then the whole suite, with a few round trips per real app (tests/apps)
test: check apps
	MEMCR_APP_CYCLES=$${MEMCR_APP_CYCLES:-3} $(BIN)/python -m pytest -q --ignore=tests/unit

# the real apps alone, each parked and woken 100 times (MEMCR_APP_CYCLES=N for another count)
test-apps: install apps
	MEMCR_APP_CYCLES=$${MEMCR_APP_CYCLES:-100} $(BIN)/python -m pytest -q tests/apps

apps:
	sh scripts/setup-apps.sh

# the suite in emulated arm64 Debian machines, as root (scripts/arm64/vm.py; its first run takes minutes):
# one on bookworm's kernel (6.1), one on bullseye's (5.10), each with its files (docs/kernels.md); one kernel
# alone: make test-arm64 ARM64_KERNELS=bullseye; another command: make test-arm64 ARGS='-- sh -c "uname -r"'
ARM64_KERNELS ?= bookworm bullseye
test-arm64:
	$(PYTHON) scripts/arm64/vm.py $(foreach k,$(ARM64_KERNELS),--kernel $(k)) $(ARGS)

bench: install apps
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench

# a py-spy flame graph of one checkpoint and restore: make profile ARGS='-z lz4'
profile: install
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.flame -- $(ARGS)

# a self-contained copy for non-root deployment (docs/SECURITY.md), as root
install-system: system
	PREFIX=$(PREFIX) MEMCR_USER=$(MEMCR_USER) MEMCR_GROUP=$(MEMCR_GROUP) MEMCR_CLIENTS=$(MEMCR_CLIENTS) \
	MEMCR_TARGETS=$(MEMCR_TARGETS) MEMCR_RUN=$(MEMCR_RUN) MEMCR_STATE=$(MEMCR_STATE) \
	MEMCR_ALLOW_TMP_PREFIX=$(MEMCR_ALLOW_TMP_PREFIX) sh deploy/install-system.sh

# take away what install-system made, as root, given the install's PREFIX (it lists the rest in PREFIX/share)
uninstall-system:
	PREFIX=$(PREFIX) sh deploy/uninstall-system.sh

clean:
	$(MAKE) -C parasite clean
	rm -rf build dist *.egg-info memcr_client/build memcr_client/*.egg-info

.PHONY: all parasite system apps install install-system uninstall-system demo check test test-apps test-arm64 bench profile clean
