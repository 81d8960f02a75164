# Developer entry points; `make ci` runs what .ci/run runs (the README's test command) on a clean clone.
PY := .venv/bin/python
.PHONY: setup lint format typecheck test-quick test demo ci config-reference

setup:  ## apt packages, .venv, accord (editable) with its dev tools
	bash launch/setup.sh

lint:  ## ruff check + format check, and the import rules of CONTRIBUTING.md
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest -q tests/test_layers.py

format:  ## apply ruff's fixes and formatting
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

typecheck:  ## mypy on src/ (settings in pyproject.toml)
	.venv/bin/mypy

test-quick:  ## everything in-process (no launcher, no ranks, no commands): ~3 minutes on 2 cores
	$(PY) -m pytest -q -m "not slow" tests

test:  ## the whole suite (17.8 minutes on 2 cores in its last run, 2026-12-04; the budget is 20)
	$(PY) -m pytest -q tests

config-reference:  ## rewrite the README's config reference from accord train --print-config
	$(PY) .ci/config_reference.py

demo:  ## the whole chain on embedded data (about 4 minutes on 2 cores)
	.venv/bin/accord demo

ci: setup lint typecheck test  ## what .ci/run does
