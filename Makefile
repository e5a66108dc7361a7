# The README's two commands: `make compare` (the main job) and `make test` (the test suite;
# `make test-zoo` runs all of its third-party model zoo).
# Both create their own virtual environment; torch is pinned through constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: compare demo rethink test test-zoo gpu-check wheel-check data clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[test]'
	@touch $@

# Debian's dataset-fashion-mnist where apt is available; the job falls back to the
# scikit-learn digits (with a notice) where it is not.
data:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		$(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq >/dev/null 2>&1 && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
		echo "notice: could not install dataset-fashion-mnist; the job will use the digits"; \
	fi

compare: $(VENV)/.installed data
	$(PY) -m smallbn compare $(ARGS)

demo: $(VENV)/.installed data
	$(PY) -m smallbn demo $(ARGS)

# The findings of "Rethinking 'Batch' in BatchNorm" on Fashion-MNIST (docs/rethink.md).
rethink: $(VENV)/.installed data
	$(PY) -m smallbn rethink $(ARGS)

# The suite; of the model zoo (tests/zoo: torchvision, timm and smp architectures through
# every method) it runs one architecture per family.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 $(ARGS)

# The whole model zoo: every architecture with every method.
test-zoo: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m zoo --zoo=all tests/zoo $(ARGS)

# On a machine with one CUDA GPU and its own torch (no virtual environment: such machines
# may reach no package registry): the CUDA tests, the benchmarks on CUDA and a ResNet-50
# training step per method, eager and compiled (benchmarks/gpu_check.py; under 7 minutes
# on one H100). Results in $(OUT), default runs/gpu_check.
OUT ?= runs/gpu_check
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py --out $(OUT) $(ARGS)

# The wheel a user installs: built with `python -m build`, installed into a fresh virtual
# environment (torch pinned through constraints.txt), checked to bring only torch and numpy
# (and what they need) and to import and run; then its test extra and the suite against it.
WHEEL_DIR := build/wheel-check
wheel-check:
	rm -rf $(WHEEL_DIR) && $(PYTHON) -m venv $(WHEEL_DIR)/build-env
	$(WHEEL_DIR)/build-env/bin/pip install --quiet build
	$(WHEEL_DIR)/build-env/bin/python -m build --wheel --outdir $(WHEEL_DIR)/dist .
	$(PYTHON) -m venv $(WHEEL_DIR)/env
	$(WHEEL_DIR)/env/bin/pip install --quiet --constraint constraints.txt $(WHEEL_DIR)/dist/smallbn-*.whl
	$(WHEEL_DIR)/env/bin/python benchmarks/wheel_check.py
	$(WHEEL_DIR)/env/bin/pip install --quiet --constraint constraints.txt "$$(ls $(WHEEL_DIR)/dist/smallbn-*.whl)[test]"
	cd $(WHEEL_DIR) && env/bin/python -m pytest -q -n 2 -p no:cacheprovider --rootdir=$(CURDIR) $(CURDIR)/tests $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
