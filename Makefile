# Bastion: `make run` starts the archive on the embedded default; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-deps lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py src/bastion/ingest/_cscan.c src/bastion/blobs/_cwrite.c src/bastion/index/_crecord.c \
		scripts/fetch-ohif.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	./scripts/fetch-ohif.sh
	touch $(STAMP)

run: install
	$(BIN)/bastion serve

# System packages the integration tests drive (DCMTK clients, Orthanc as a peer, Chromium and Node.js for
# the browser checks of the viewer and admin page) and tests/browser's npm packages. First, so that
# `make install` finds npm for scripts/fetch-ohif.sh on a fresh machine.
test-deps:
	./scripts/install-test-deps.sh

test: test-deps
	$(MAKE) install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) bastion-data build
	find src -name '*.so' -delete
