# The two set-up commands: `make run` (open the studio) and `make test` (run the whole test suite).
# Both create/reuse .venv and install what is missing; `make test` also installs Debian's chromium for UI tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test browser install

run: $(VENV)/.installed
	$(PY) launch.py $(ARGS)

test: $(VENV)/.installed browser
	$(PY) -m pytest -q $(ARGS) tests

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# Playwright drives the system Chromium; its own browser download is not possible everywhere.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }
