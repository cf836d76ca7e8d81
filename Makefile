# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser the report test opens report.html in (Debian's package; Playwright drives it, nothing is downloaded).
CHROMIUM := /usr/bin/chromium

.PHONY: demo test lint browser postgres bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo --out demo-output --force

# pip check: the installed versions satisfy every package's requirements (pyproject.toml bounds the ones that broke us);
# ruff: lint and formatting (pyproject.toml's [tool.ruff]) before the tests, so that CI refuses what they refuse.
test: $(STAMP) browser postgres
	$(BIN)/python -m pip check
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/python -m pytest

# Nothing to do when Chromium is there; as root it is installed with apt-get, otherwise make stops and says how.
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing Chromium for the report test (apt-get install chromium)"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium && test -x $(CHROMIUM); \
	else \
		echo "make test needs Chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium' (or make test as root), then make test again" >&2; exit 1; \
	fi

# The PostgreSQL server the sweep test starts a throwaway cluster of (Debian's package); installed as Chromium is.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing PostgreSQL for the sweep test (apt-get install postgresql)"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql && ls /usr/lib/postgresql/*/bin/initdb >/dev/null; \
	else \
		echo "make test needs PostgreSQL's server: run 'sudo apt-get install -y postgresql' (or make test as root), then make test again" >&2; exit 1; \
	fi

bench: $(STAMP)
	$(BIN)/python bench/rle_speed.py
	$(BIN)/python bench/inspect_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache test-artefacts
