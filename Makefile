# Two commands from a fresh clone (each creates .venv on first use and reuses it after):
#   make book   builds the book to _build/html
#   make test   runs every test: lint, gradient tests, the book build
# and, to re-execute the chapters (full sizes, best device; slow) and refresh the
# reproducibility appendix:
#   make notebooks   (only some: make notebooks CHAPTERS="02_maml 08_omniglot")
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: book test lint format env clean notebooks

env: $(STAMP)

# Reinstall whenever the project's requirements change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,test,dev]"
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

notebooks: $(STAMP)
	$(BIN)/python tools/notebooks.py run $(CHAPTERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf _build .pytest_cache .ruff_cache
