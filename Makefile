# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint typecheck check bench-smoke chaos soak clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("flexq needs Python >= 3.11 (found %s)" % sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flexq demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check producer worker flexq simulator tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

soak: $(STAMP)
	$(BIN)/python -m bench.chaos --churn-s 300 --jobs 3000 --drains 4 --blackout-s 0 --timeout-s 900

bench-smoke: $(STAMP)
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
