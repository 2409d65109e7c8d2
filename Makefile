# Two commands on a fresh machine:
#   make demo   set up, then run the main job end to end on the embedded default data
#   make test   set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CALOFORGE := $(VENV)/bin/caloforge
DEMO_DIR ?= demo-output
TORCH_PIN := torch==2.13.0

.PHONY: setup test lint demo demo-quick clean

setup: $(VENV)/.installed

# torch is pinned in the set-up path only (a CPU wheel on these machines); the package itself
# requires a range so users elsewhere can bring their own build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# one pytest worker per core (pytest-xdist; each test file stays on one worker, so that its
# module fixtures are built once); every test runs torch on one thread (tests/conftest.py)
TEST_WORKERS ?= 2

# one BLAS/OpenMP thread per worker: the workers share the cores (tests/conftest.py)
test: setup lint
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# ruff (style, imports, likely bugs) and mypy (types) over the package; `make test` runs it
lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

demo: setup
	DEMO_DIR=$(DEMO_DIR) CALOFORGE=$(CALOFORGE) PYTHON=$(PY) bash scripts/demo.sh

# the same pipeline, small: a first look in a few minutes
demo-quick: setup
	DEMO_DIR=$(DEMO_DIR)-quick DEMO_TRAIN=8000 DEMO_TEST=3000 DEMO_BUDGET=2m \
	    DISTILL_BUDGET=1m BENCH_BATCHES=1,100 CALOFORGE=$(CALOFORGE) PYTHON=$(PY) bash scripts/demo.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) build site src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
