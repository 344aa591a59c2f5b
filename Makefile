# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench crds chart-docs dashboards constraints clean

PIP := $(BIN)/pip install --quiet --disable-pip-version-check

$(BIN)/python:
	cd / && $(PYTHON) -m venv $(CURDIR)/$(VENV)

# The runtime alone (`make demo`), and everything the suite and the tools need.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime  ## run the email example on the in-memory driver
	$(BIN)/luaq run examples/email/app.yaml --input examples/email/messages.jsonl --until-idle

# mypy sees the sources under their import names (luaq.runtime, luaq.operator) through links.
TYPECHECK := $(VENV)/typecheck

$(TYPECHECK)/luaq:
	mkdir -p $@
	ln -sfn $(CURDIR)/runtime $@/runtime
	ln -sfn $(CURDIR)/operator $@/operator

lint: $(VENV)/.test $(TYPECHECK)/luaq
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p luaq.runtime -p luaq.operator
	$(BIN)/mypy dashboards

test: lint  ## lint, type-check, start RabbitMQ (installing it and prometheus if missing), run the suite
	tests/services.sh
	$(BIN)/pytest

crds: $(VENV)/.test  ## write the CRDs from the models (luaq.operator.resource): crds/ and the chart's template
	$(BIN)/python -m luaq.operator.crd crds --chart-template charts/luaq/templates/crd-queueconsumers.yaml

chart-docs: $(VENV)/.test  ## write charts/luaq/README.md from the chart's values.yaml and Chart.yaml
	$(BIN)/python scripts/chart_docs.py

dashboards: $(VENV)/.test  ## rebuild charts/luaq/dashboards/luaq.json from dashboards/luaq_dashboard.py
	$(BIN)/python dashboards/luaq_dashboard.py

# The image's dependencies (Dockerfile), pinned: what `.[operator]` resolves to today.
PINNING := $(VENV)/constraints
constraints:  ## re-pin constraints.txt to the newest versions pyproject.toml allows
	rm -rf $(PINNING)
	cd / && $(PYTHON) -m venv $(CURDIR)/$(PINNING)
	$(PINNING)/bin/pip install --quiet --disable-pip-version-check --only-binary=:all: '.[operator]'
	{ echo '# The versions the image installs (Dockerfile): written by `make constraints`.'; \
	  $(PINNING)/bin/pip freeze --exclude luaq; } > constraints.txt
	rm -rf $(PINNING)

bench: $(VENV)/.test
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
