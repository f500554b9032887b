# `make run` and `make test` each create .venv with pip when it is missing, then install the project with the
# pinned versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
UPGRADE_VENV := .venv-upgrade
FROM ?= $(VENV)

.PHONY: run test test-fast format install install-test constraints upgrade-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps are rebuilt whenever pyproject.toml or constraints.txt changes.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt --editable .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt --editable '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(PY) run.py $(ARGS)

# Lint and format check first (ruff, configured in pyproject.toml): `make format` fixes what it can. The tests run
# on WORKERS pytest-xdist processes, one file per process at a time (a file's tests share its fixtures and order);
# tests/conftest.py gives each worker and the commands it starts one thread. WORKERS=0: one process.
WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(WORKERS) --dist loadfile

test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTEST) $(ARGS)

# The same without the tests marked slow (those that start `python run.py` or train beyond a few steps): every module
# still runs in-process. The summary ends "left out by -m 'not slow': M tests": what only `make test` runs.
test-fast: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTEST) -m "not slow" $(ARGS)

format: install-test
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Rewrites constraints.txt from the venv FROM (.venv; FROM=$(UPGRADE_VENV) after upgrade-check).
constraints:
	@test -x $(FROM)/bin/python || { echo "no $(FROM): run make test (or make upgrade-check) first"; exit 1; }
	{ echo "# Every package of the tested environment, pinned: make run / make test install with -c constraints.txt."; \
	  echo "# Generated, do not edit: regenerate with \`make constraints\` (pip freeze --exclude-editable of .venv),"; \
	  echo "# or \`make constraints FROM=$(UPGRADE_VENV)\` after \`make upgrade-check\` passes (README, Installs)."; \
	  $(FROM)/bin/python -m pip freeze --exclude-editable; } > constraints.txt

# Not run by CI: the newest versions pyproject.toml allows in a fresh $(UPGRADE_VENV), the tests there, then the
# versions that differ from constraints.txt.
upgrade-check:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --editable '.[test]'
	$(UPGRADE_VENV)/bin/python -m pytest $(ARGS); status=$$?; \
	$(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable \
	  | $(UPGRADE_VENV)/bin/python scripts/upgrade_check.py; exit $$status

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) outputs
