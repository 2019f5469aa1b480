# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (if missing or older than pyproject.toml) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/callspeak demo --wav demo.wav

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples scripts
	$(BIN)/ruff format --check src tests bench examples scripts
	$(BIN)/mypy

test: lint
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest --cov --cov-report=term:skip-covered
	# again on uvloop, the loop `callspeak serve` runs on (its transports differ from asyncio's)
	TEST_EVENT_LOOP=uvloop PYTHONASYNCIODEBUG=1 $(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/time_to_first_audio.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage demo.wav
