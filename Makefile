# Two commands do all set-up: `make test` and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LINT_PATHS := tfdml tests train.py export benchmarks tools
# oneDNN (fast CPU kernels) for every target unless set: TF 2.20 leaves it off
# on AVX2 CPUs, about 2x slower training (docs/benchmarks.md, "oneDNN").
export TF_ENABLE_ONEDNN_OPTS ?= 1

.PHONY: test test-fast lint format demo clean-venv data-packages

$(VENV)/.installed: requirements.txt requirements-serving.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-serving.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# Debian font packages and Fashion-MNIST for the offline data sets (root: apt-get).
data-packages:
	bash tools/install_fonts.sh

# pytest exits 5 when no test ran; make treats every non-zero exit as failure.
test: lint data-packages
	$(PY) -m pytest -n 2 --timeout=900 -q -p no:cacheprovider tests

# The fast path while editing: no lint, no data packages (no root needed),
# no slow or distributed tests (pyproject.toml markers); a few minutes.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q -p no:cacheprovider -m "not slow and not distributed" tests

demo: $(VENV)/.installed data-packages
	$(PY) -m tfdml.demo

clean-venv:
	rm -rf $(VENV)
