# memcr-py: build the parasite, install into .venv, demo, test, bench.
PYTHON ?= python3
VENV ?= .venv
PREFIX ?= /opt/memcr
MEMCR_GROUP ?= memcr
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

all: parasite

parasite:
	$(MAKE) -C parasite

system:
	sh scripts/setup-system.sh

$(STAMP): pyproject.toml setup.py
	sh scripts/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# memcr and memcr-client into .venv/bin (an editable install of this tree)
install: $(STAMP) parasite

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/ruff check memcr memcr_client tests bench scripts
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python bench/bench.py

# a py-spy flame graph of one checkpoint and restore: make profile ARGS='-z lz4'
profile: install
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python bench/profile.py -- $(ARGS)

# a self-contained copy for non-root deployment (docs/SECURITY.md), as root
install-system: system
	sh scripts/install-system.sh $(PREFIX) $(MEMCR_GROUP)

clean:
	$(MAKE) -C parasite clean
	rm -rf build dist *.egg-info

.PHONY: all parasite system install install-system demo test bench profile clean
