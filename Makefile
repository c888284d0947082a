# Each target sets up its own virtual environment (.venv) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: bench bench-full test lint examples clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

bench: $(STAMP)  ## the main job: custom gradient vs autodiff, small default (< 3 min)
	$(PY) -m benchmarks.run $(ARGS)

bench-full: $(STAMP)  ## the large shapes of the core and fused issues
	$(PY) -m benchmarks.run --full $(ARGS)

test: $(STAMP)  ## the test suite (doctests included)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxsce tests benchmarks examples
	$(VENV)/bin/ruff format --check jaxsce tests benchmarks examples

examples: $(STAMP)
	$(PY) examples/digits_cnn.py
	$(PY) examples/next_token.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
