# The README's commands. Everything installs into ./.venv from the package registries only.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test benchmark clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch; a bare `pip install torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

benchmark: install
	$(PY) benchmarks/benchmark_transformer.py --model PixNerd-XL/16 --batch_size 1

clean:
	rm -rf $(VENV) build dist src/*.egg-info
