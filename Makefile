# Two entry points for a fresh clone:
#   make demo   create .venv, install spatia with pinned versions, run the whole pipeline demo
#   make test   create .venv, install spatia with pinned versions, run the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The tests also exercise the optional SpatialData extra (~272 MB, ~1 min to install; pinned in
# constraints.txt); the demo does not need it.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,spatialdata]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/spatia demo --out demo_output

# Two xdist workers on two cores, one BLAS/torch thread each (oversubscribed threads run ~10x slower).
test: $(TEST_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) demo_output
