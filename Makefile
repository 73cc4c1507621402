# The two commands: `make demo` and `make test`. Each builds/refreshes .venv (Python 3.11) by itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mass-installed

.PHONY: demo test install clean-venv

install: $(STAMP)

# Re-install only when the dependency metadata changes; the package itself is editable.
$(STAMP): setup.cfg setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mass demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
