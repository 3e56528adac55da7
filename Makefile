# The two commands of README.md. Both set up (once, cached) before they run.
PY := .venv/bin/python

.PHONY: setup demo test lint

setup:
	python3 tools/bootstrap.py

demo: setup
	$(PY) tools/run_demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
