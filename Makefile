# Envelope: the two commands a newcomer needs are `make demo` and `make test`.
# Both run `make setup` first, which is idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint unit privileged bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m envelope.demo

test: setup lint
	$(PY) -m pytest tests -v -p no:cacheprovider --durations=25

lint: setup
	$(VENV)/bin/ruff check .

unit: setup
	$(PY) -m pytest tests/unit tests/golden -q -p no:cacheprovider

privileged: setup
	$(PY) -m pytest tests/privileged -v -p no:cacheprovider

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
