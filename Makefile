# Two set-up commands: `make demo` (the whole pipeline, offline, local Ray) and `make test`.
# Both create .venv and install the project into it first (re-installs when pyproject.toml changes).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import synthfar_ray, torch, torchvision, ray, diffusers" # fail here if the install did not work
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/synthfar pipeline configs/pipeline/demo.yaml

# Two xdist workers: much of the suite waits on Ray, subprocesses and storage rather than computing.
# Each module goes whole to one worker (--dist loadfile) in the order tests/conftest.py gives (longest
# first; --no-loadscope-reorder, or xdist puts the modules with the most tests first); each worker has
# its own local Ray cluster and S3 endpoint.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder --timeout=1500 --durations=25 tests

# The edit-test loop: pure-Python and single-process tests (no Ray, no end-to-end jobs). CI runs `test`.
# Two xdist workers handing out single tests (--dist load): 88-111 s against 141-147 s in one process
# (2026-12-07, 469 tests); whole modules per worker (loadfile) took 108 s.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n 2 --timeout=300 -m "not slow and not ray" tests

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/train.py

clean:
	rm -rf runs .pytest_cache
