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
	@# docker-compose (Debian's) validates docker-compose.yml in the tests; it needs no engine.
	@command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || { \
	  echo "installing docker-compose (apt), to validate docker-compose.yml"; \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker-compose >/dev/null 2>&1; } || \
	  echo "docker-compose could not be installed: the compose test will be skipped"; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/docpipe demo $(ARGS)

# The end-to-end tests mostly wait on real processes: five xdist workers, each with its own
# local stack (tests that must share a stack, or a module's servers, are grouped). On 2 cores,
# measured: 3 workers 3:46, 4 workers 3:04, 5 workers 2:35-2:58 (CPU-bound: 1.9 cores busy),
# and 3:13-3:44 with a CPU hog beside it.
test: setup
	$(PY) -m pytest -n 5 --dist loadgroup $(ARGS)

bench: setup
	$(PY) -m bench.rate_limits $(ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache *.egg-info
