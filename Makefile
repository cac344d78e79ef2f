# Quick start targets (README): `make demo` runs the main job, `make test` the test suite.
# Both create the virtualenv in $(VENV) on first use. torch is pinned to the CPU build that CI's
# machines carry; elsewhere set TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# (or a CUDA index) to choose the build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/build-engine build recipes/default.yaml --bench

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check trt_pipeline tests bench scripts

clean:
	rm -rf $(VENV) .pytest_cache
