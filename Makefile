# One command each, on a fresh machine: `make demo` runs a sample batch, `make test` runs the tests.
# Both set themselves up first: a virtualenv with docpipe and its dev extras, and redis-server.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.docpipe-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench clean

setup: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/docpipe demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) -m bench.rate_limits $(ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache *.egg-info
