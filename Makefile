# The single entry point: CI calls these same targets.
VENV ?= .venv
PY := $(VENV)/bin/python
export DOCKER_BUILDKIT := 0
export TESTCONTAINERS_RYUK_DISABLED := true
export TESTCONTAINERS_CONNECTION_MODE := docker_host
export TESTCONTAINERS_HOST_OVERRIDE := 127.0.0.1

.PHONY: install system venv images engine-images lint typecheck test test-fast bench dev demo clean

install: system venv images

system:
	bash scripts/install-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev]'
	$(PY) -c "import asman, nats, cbor2, playwright, schemathesis, yaml"
	touch $@

images: venv
	$(PY) -m asman.peer.images

# Snakemake for the workflow-engine test (tests/gateway/test_tes_snakemake.py): a host venv and
# a job image built from Debian packages (debootstrap, ~2 min once; cached, keyed on the
# package lists). The test builds them itself when missing; this builds them ahead.
engine-images: venv
	$(PY) tests/workflow_engines.py

lint: venv
	$(VENV)/bin/ruff check asman tests bench
	$(VENV)/bin/ruff format --check asman tests bench

typecheck: venv
	$(VENV)/bin/mypy

# The README's test command. Installs what it needs, then runs every test.
test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: venv
	$(VENV)/bin/pytest -q -x -m "not slow"

bench: install
	$(PY) -m bench

dev: install
	$(VENV)/bin/asman dev

# Quick start: asman dev + one real job with an input and output files, printed.
demo:
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
