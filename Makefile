# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   -- create .venv, install pinned deps + the package, run the demo
#   make test   -- same set-up, then the test suite (pytest + the C++ ctest)
# Both are idempotent: stamps skip the install steps when nothing changed.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
MAX_JOBS ?= 2
export MAX_JOBS

EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup demo test test-fast bench check clean

$(VENV)/.stamp-deps: requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-deps setup.py pyproject.toml $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.stamp-install

demo: setup
	$(VENV)/bin/prefix-attn demo

check: setup
	$(VENV)/bin/prefix-attn check

test: setup
	$(VPY) -m pytest -q tests
	if [ -x csrc/run_ctest.sh ]; then bash csrc/run_ctest.sh; fi

# Without the Triton interpreter, nvcc and HF model tests: a quick inner loop.
test-fast: setup
	$(VPY) -m pytest -q tests -m "not interpreter and not nvcc and not hf and not slow"

bench: setup
	$(VPY) bench/run_all.py

clean:
	rm -rf build *.egg-info prefix_attn/*.so .pytest_cache
