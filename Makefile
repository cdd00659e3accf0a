# Two entry points for a fresh checkout: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## train on the embedded defaults (synthetic data, offline Lite0, MLflow under mlruns/)
	$(BIN)/defect-train

test: $(STAMP)  ## the default (fast) test suite
	$(BIN)/pytest -q

test-all: $(STAMP)  ## including the slow end-to-end runs
	$(BIN)/pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

ui: $(STAMP)  ## the MLflow UI on this project's store: http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs .pytest_cache
