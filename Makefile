# Two commands for a fresh machine: `make demo` and `make test`.
#
# Never `python -m ...` from here: with the working directory first on sys.path, the source
# directory operator/ would shadow the standard library's operator module. The venv's console
# scripts put their own directory first instead.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench dashboards clean

$(BIN)/.installed: pyproject.toml
	cd / && $(PYTHON) -m venv $(CURDIR)/$(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(BIN)/.installed  ## run the email example on the in-memory driver
	$(BIN)/luaq run examples/email/app.yaml --input examples/email/messages.jsonl --until-idle

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runtime operator dashboards

test: lint  ## lint, type-check and run the whole suite
	$(BIN)/pytest

dashboards: $(BIN)/.installed  ## rebuild charts/luaq/dashboards/luaq.json from dashboards/luaq_dashboard.py
	$(BIN)/python dashboards/luaq_dashboard.py

bench: $(BIN)/.installed
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
