# Each target sets up its own virtual environment (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The oldest supported JAX, for the compatibility job.
OLD_JAX ?= 0.6.2
OLD_VENV := .venv-jax$(OLD_JAX)
OLD_STAMP := $(OLD_VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The main job needs only the bench extra: a quicker first set-up.
BENCH_STAMP := $(VENV)/.installed-bench-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST := -m pytest -q -n 2

.PHONY: bench bench-full test test-slow test-all test-old-jax lint docs examples package clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(BENCH_STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

$(OLD_STAMP): pyproject.toml
	python3 -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLD_VENV)/bin/python -m pip install -q -e '.[test,bench,examples]' 'jax==$(OLD_JAX)' 'jaxlib==$(OLD_JAX)'
	touch $@

bench: $(BENCH_STAMP)  ## the main job, small default (< 2 min with set-up); writes build/bench/
	$(PY) -m benchmarks.run $(ARGS)

bench-full: $(BENCH_STAMP)  ## the large shapes (about an hour); the peers run where installed: pip install -e '.[torch]' liger-kernel
	$(PY) -m benchmarks.run --full $(ARGS)

test: $(STAMP)  ## the fast test set (doctests and README included), 2 workers
	$(PY) $(PYTEST) -m "not slow" $(ARGS)

test-slow: $(STAMP)  ## the slow set only
	$(PY) $(PYTEST) -m slow $(ARGS)

test-all: $(STAMP)  ## everything
	$(PY) $(PYTEST) $(ARGS)

test-old-jax: $(OLD_STAMP)  ## on the oldest supported JAX: the fast set with every value of every parameter
	JAXSCE_FAST_CASES=all $(OLD_VENV)/bin/python $(PYTEST) -m "not slow" $(ARGS)

lint: $(STAMP)  ## ruff (lint + format) and pyright (basic) on the package
	$(VENV)/bin/ruff check jaxsce tests benchmarks examples docs .ci
	$(VENV)/bin/ruff format --check jaxsce tests benchmarks examples docs .ci
	$(VENV)/bin/pyright --pythonpath $(PY)

package:  ## build the sdist and wheel, check them, install the wheel in a fresh venv and smoke-test it from outside the tree
	rm -rf build/dist build/venv-package build/venv-wheel
	python3 -m venv build/venv-package
	build/venv-package/bin/python -m pip install -q build twine
	build/venv-package/bin/python -m build -q --outdir build/dist .
	build/venv-package/bin/python -m twine check --strict build/dist/*
	python3 -m venv build/venv-wheel
	build/venv-wheel/bin/python -m pip install -q build/dist/*.whl
	cd "$$(mktemp -d)" && $(CURDIR)/build/venv-wheel/bin/python $(CURDIR)/.ci/smoke.py

docs: $(STAMP)  ## HTML documentation in build/docs/html, warnings as errors
	$(PY) -m sphinx -W --keep-going -q -b html docs build/docs/html

examples: $(STAMP)
	$(PY) examples/digits_cnn.py
	$(PY) examples/next_token.py
	$(PY) examples/policy_gradient.py
	$(PY) examples/distill.py

clean:
	rm -rf $(VENV) $(OLD_VENV) build .pytest_cache .hypothesis
