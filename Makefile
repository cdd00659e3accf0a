# Two entry points for a fresh checkout: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint docs docs-serve ui serve clean

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
	$(BIN)/ruff check src tests scripts examples docs/hooks

docs: $(STAMP)  ## the documentation site into site/ (strict: a broken link or a missing page fails)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)  ## the site on http://127.0.0.1:8000, rebuilt on every change
	$(BIN)/mkdocs serve

ui: $(STAMP)  ## the MLflow UI on this project's store: http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

# `make serve`: the champion of this project's store on 127.0.0.1:$(PORT). The store is spelled out
# (MLflow's own default is ./mlflow.db, which left a stray database in the current directory);
# the venv goes on PATH (MLflow starts `uvicorn` by name). SERVE_ROOTS (':'-separated folders)
# lets clients send server paths under them; otherwise they send images as image_b64.
STORE ?= $(CURDIR)/mlruns
MODEL ?= models:/defect-classifier@champion
PORT ?= 5001
SERVE_ROOTS ?=
serve: $(STAMP)  ## serve $(MODEL) over HTTP on 127.0.0.1:$(PORT)
	cd $(STORE) && PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=sqlite:///$(STORE)/mlflow.db DEFECT_SERVE_ROOTS=$(SERVE_ROOTS) \
		$(CURDIR)/$(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local -h 127.0.0.1 -p $(PORT)

clean:
	rm -rf outputs .pytest_cache site
