# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: install test test-interop train bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -x -q

# Strict state-dict loading against the published PyTorch layer (needs torch and ../shared/reference,
# or SESSA_REFERENCE_DIR): installs the `interop` extra, then runs the interop tests.
test-interop: install
	$(PY) -m pip install -q -e '.[test,interop]'
	$(PY) -m pytest -x -q tests/test_guard_interop.py tests/test_core_convert.py

train: install
	$(PY) train.py

bench: install
	$(PY) benchmarks/feedback_solve.py

clean:
	rm -rf $(VENV) build *.egg-info
