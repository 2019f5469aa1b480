# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (if missing or older than pyproject.toml) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# When $(PYTHON) is 3.11: a Python 3.12 that can make a venv, where one is found (on PATH, or
# installed by pyenv), for the tests' uvloop pass. From 3.12 on, the tasks callspeak starts with
# callspeak.tasks.start_task run their first steps at once, so both ways of starting them are
# tested. Empty: that pass runs on $(PYTHON) too.
ifeq ($(origin PYTHON312), undefined)
PYTHON312 := $(shell $(PYTHON) -c 'import sys; sys.exit(sys.version_info >= (3, 12))' 2>/dev/null && \
	for p in python3.12 "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null \
	&& { echo "$$p"; break; }; done)
endif
VENV312 ?= .venv-3.12

.PHONY: demo test test-asyncio test-uvloop lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

$(VENV312)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet -e '.[local,dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/callspeak demo --wav demo.wav

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples scripts
	$(BIN)/ruff format --check src tests bench examples scripts
	$(BIN)/mypy

# The suite twice, both passes at once: each spends most of its time waiting on loopback
# sockets and on audio played in real time (about a fifth of a core), so side by side they take
# about the time of one. -O prints each pass's output whole, once it is done; each has a
# temporary directory of its own (pytest's shared one is cleaned by whichever run starts last).
test: lint
	$(MAKE) --no-print-directory -j2 -O test-asyncio test-uvloop

test-asyncio: $(STAMP)
	mkdir -p .pytest-tmp
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest --cov --cov-report=term:skip-covered \
		--basetemp=.pytest-tmp/asyncio

# again on uvloop, the loop `callspeak serve` runs on (its transports differ from asyncio's),
# under Python 3.12 where one is found (see PYTHON312)
ifneq ($(strip $(PYTHON312)),)
test-uvloop: $(VENV312)/.installed
	mkdir -p .pytest-tmp
	TEST_EVENT_LOOP=uvloop PYTHONASYNCIODEBUG=1 $(VENV312)/bin/pytest -q \
		--basetemp=.pytest-tmp/uvloop
else
test-uvloop: $(STAMP)
	mkdir -p .pytest-tmp
	TEST_EVENT_LOOP=uvloop PYTHONASYNCIODEBUG=1 $(BIN)/pytest -q --basetemp=.pytest-tmp/uvloop
endif

bench: $(STAMP)
	$(BIN)/python bench/time_to_first_audio.py

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .pytest-tmp .mypy_cache .ruff_cache .coverage demo.wav
