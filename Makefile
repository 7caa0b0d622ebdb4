# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
# `make test-latest` checks the other end of the dependency ranges: the newest jax/flax/orbax
# releases on Python 3.12+ in .venv-latest, with the wandb extra (the real package, offline).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
# pytest-xdist workers: most tests are compile-bound on one core, so two workers halve the wall
# time on the 2-core CI machine (measured: 9m37s with 2 workers, ~16 min with one).
PYTEST_WORKERS ?= 2
# Newest releases need Python >= 3.12: the first of these that runs (pyenv shims may exist but not run).
PYTHON_LATEST ?= $(firstword $(foreach p,python3.12 python3.13 $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3),$(shell $(p) -c 'import sys; print(sys.executable)' 2>/dev/null)))
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed-test
# The subset `make test-latest` runs (1103 passed, 1 skipped in 4m06s on two workers, 2-core box,
# 2026-11-30; LATEST_TESTS=tests runs everything). CI runs the smaller CI_LATEST_TESTS (.ci/run)
# so that the whole CI run stays within 45 minutes on a machine up to 2x slower.
LATEST_TESTS ?= tests/model/test_fixtures.py tests/ops/test_blocked.py tests/ops/test_parity_matrix.py \
	tests/ops/test_recursive.py tests/model/test_decoding.py tests/ops/test_lowering.py tests/ops/test_attention_backends.py \
	tests/train/test_config.py tests/train/test_loop.py tests/train/test_resume.py tests/train/test_loss.py \
	tests/train/test_evaluate.py tests/train/test_report.py tests/data/test_tokenizers.py tests/data/test_text.py \
	tests/tools/test_packaging.py tests/ops/test_row_stats_gpu.py tests/train/test_wandb.py \
	tests/ops/test_recursive_bf16_accuracy.py tests/data/test_data_integrity.py tests/model/test_sharding_user_model.py \
	tests/model/test_decoding_interface.py tests/ops/test_recursive_fast_paths.py tests/tools/test_accelerator_check.py \
	tests/ops/test_gpu_epilogue_kernels.py tests/ops/test_accumulate_kernel.py tests/ops/test_leaf_kernel.py \
	tests/tools/test_import_graph.py
CI_LATEST_TESTS := tests/model/test_fixtures.py tests/ops/test_lowering.py tests/train/test_loop.py \
	tests/tools/test_packaging.py tests/ops/test_row_stats_gpu.py tests/ops/test_gpu_epilogue_kernels.py \
	tests/ops/test_accumulate_kernel.py tests/ops/test_leaf_kernel.py tests/train/test_wandb.py \
	tests/model/test_sharding_user_model.py

.PHONY: install test lint test-latest test-latest-ci test-interop train bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# No -x: one failure must not throw away the rest of a ten-minute run, and a run that lists every
# failure is what a fix needs. (Timeouts in the tests only catch hangs: tests/support/processes.py's
# TIMEOUT_S, 3600 s, or SESSA_TEST_TIMEOUT_S; add -x through PYTEST_ARGS to stop at the first.)
PYTEST_ARGS ?=
# XLA's CPU backend at optimization level 0: the suite's programs are tiny, so its time is mostly
# compiling them (measured in docs/performance.md, "The test suite"). The level changes how fast the code
# runs and, within float32 rounding, the order in which some sums are added (XLA's CPU backend
# uses no fast-math at any level); tests bound such sums by their rounding, not by one order.
# Processes the tests start inherit it. `make test-latest` keeps XLA's default level.
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0
test: install
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# The formatter and linter (ruff, configured in pyproject.toml); `ruff format .` fixes the format.
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

$(STAMP_LATEST): pyproject.toml
	@test -n "$(PYTHON_LATEST)" || { echo "make test-latest needs python3.12 or python3.13 on PATH (or PYTHON_LATEST=...)"; exit 2; }
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q --upgrade --upgrade-strategy eager -e '.[test,wandb]'
	touch $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	$(PY_LATEST) -c "import sys, jax, jaxlib, flax, orbax.checkpoint as o; print('python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', jaxlib.__version__, '| flax', flax.__version__, '| orbax', o.__version__)"
	$(PY_LATEST) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS) $(LATEST_TESTS)

# What .ci/run checks of the newest releases (the whole LATEST_TESTS would push CI past 45 minutes).
test-latest-ci:
	$(MAKE) test-latest LATEST_TESTS="$(CI_LATEST_TESTS)"

# Strict state-dict loading against the published PyTorch layer (needs torch and a checkout of
# the published code, LibratioAI/sessa, named by SESSA_REFERENCE_DIR): installs the `interop` extra, then runs the interop tests.
test-interop: install
	$(PY) -m pip install -q -e '.[test,interop]'
	$(PY) -m pytest -q tests/model/test_interop.py tests/model/test_convert.py

train: install
	$(PY) train.py

bench: install
	$(PY) -m benchmarks.feedback_solve

clean:
	rm -rf $(VENV) $(VENV_LATEST) build *.egg-info
