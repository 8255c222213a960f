# Two commands matter: `make all` (run the whole course, regenerate figures/) and `make test`.
# Both create the virtual environment when it is missing and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cirlib-installed
KERNEL := cirlib
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PYTEST_NB := --nbval --nbval-current-env --nbval-sanitize-with tests/notebooks/sanitize.cfg --nbval-cell-timeout 1200

.PHONY: all test lint test-arithmetic unit nbtest env fashion-mnist data notebooks refs perf clean-quick

all: notebooks

# --- environment -----------------------------------------------------------------------------
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]} ($(PYTHON)); run make PYTHON=python3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[notebooks,test]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cirlib)" >/dev/null
	@touch $@

env: $(STAMP)

# --- data ------------------------------------------------------------------------------------
# Fashion-MNIST: the Debian package when present or installable, else the official files
# (SHA256-checked); cirlib.data.fashion_mnist names both options when neither works.
fashion-mnist: env
	@$(PY) -m cirlib.data.fashion_mnist >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian package dataset-fashion-mnist"; \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || true; \
	  fi; }
	$(PY) -m cirlib.data.fashion_mnist --download

data: fashion-mnist
	$(PY) -m cirlib.data.benchmarks

# --- the course ------------------------------------------------------------------------------
# No -p: the parameters cells default to the full run, so papermill leaves no injected cell behind.
notebooks: data
	@for nb in $(NOTEBOOKS); do \
	  echo "== papermill $$nb"; \
	  $(VENV)/bin/papermill "$$nb" "$$nb" -k $(KERNEL) --cwd notebooks --log-level WARNING || exit 1; \
	done

# References of the notebook regression tests, regenerated from scratch (CI starts from a clean
# clone, so quick-mode data, checkpoints or caches left over from older code must not leak in):
# 1. every notebook executed in quick mode into tests/notebooks/ (nbval compares the text of its
#    outputs, numbers masked); 2. the result tables of that run recorded in tests/notebooks/expected/;
# 3. the same quick run repeated under other arithmetic set-ups (record_results.py SETUPS), whose spread
#    sizes the tolerances in tests/notebooks/tolerances.json (about 8 minutes).
refs: fashion-mnist clean-quick
	@mkdir -p tests/notebooks
	@for nb in $(NOTEBOOKS); do \
	  echo "== papermill (quick) $$nb"; \
	  $(TEST_PRECISION) $(VENV)/bin/papermill "$$nb" "tests/notebooks/$$(basename $$nb)" -k $(KERNEL) --cwd notebooks -p quick True --log-level WARNING || exit 1; \
	done
	$(TEST_PRECISION) $(PY) tests/notebooks/record_results.py reference
	$(TEST_PRECISION) $(PY) tests/notebooks/record_results.py spread

# --- tests -----------------------------------------------------------------------------------
# Quick runs start from an empty data/quick, as the references in tests/notebooks/ were recorded:
# what a cell prints (benchmark generation, extraction progress) depends on what is already cached.
# They run in fp32 unless CIRLIB_PRECISION says otherwise: the references are fp32 runs, and on a CPU
# with native bf16 mixed precision trains the quick models along another path, whose text (which runs
# were still improving, a verdict's sign) no tolerance can follow. Unit tests set the precision they test.
TEST_PRECISION = CIRLIB_PRECISION=$${CIRLIB_PRECISION:-fp32}
test: fashion-mnist lint clean-quick
	$(TEST_PRECISION) $(PY) -m pytest tests $(PYTEST_NB)

lint: env
	$(VENV)/bin/ruff check cirlib tests notebooks

# The whole suite under three arithmetic set-ups that each move the numbers: this CPU's own kernels;
# one torch thread with oneDNN limited to SSE4.1; ATen's generic kernels (the last two run the kernels
# of other x86 CPUs). All three in fp32, as `test` runs (see above). Each
# starts from a clean data/quick, so every quick model is retrained in that arithmetic. CI runs this.
# The real-layout notebook run checks that cells run, not numbers, so it runs in the first pass only.
test-arithmetic: fashion-mnist
	$(MAKE) test
	PYTEST_ADDOPTS="-m 'not real_layout'" CIRLIB_PRECISION=fp32 OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=SSE41 \
	  $(MAKE) test
	PYTEST_ADDOPTS="-m 'not real_layout'" ATEN_CPU_CAPABILITY=default $(MAKE) test

# Library tests only: no notebook execution (nbval, real-layout run, result tables of a quick run, browser).
unit: env
	$(PY) -m pytest tests --ignore=tests/notebooks --ignore=tests/test_notebook_results.py --ignore=tests/test_browser.py \
	  -m "not real_layout"

nbtest: fashion-mnist clean-quick
	$(TEST_PRECISION) $(PY) -m pytest tests/notebooks $(PYTEST_NB)

perf: data
	$(PY) tests/perf/perf_features.py
	$(PY) tests/perf/perf_combiner.py
	$(PY) tests/perf/perf_oti.py
	$(PY) tests/perf/perf_gpt_phrases.py
	$(PY) tests/perf/perf_index.py
	$(PY) tests/perf/perf_explore.py
	$(PY) tests/perf/perf_digests.py

clean-quick:
	rm -rf data/quick
