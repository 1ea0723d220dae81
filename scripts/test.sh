#!/usr/bin/env bash
# Runs the whole test suite (unit, integration through `splitvmm up`, Linux early boot).
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not slow'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The static checks first (seconds): style, types (pyproject.toml [tool.mypy]: strict, on
# splitvmm/), and the layers of DESIGN.md (pyproject.toml [tool.importlinter]: cli -> monitor
# -> protocol/native; the monitor never imports a model).
.venv/bin/ruff check splitvmm tests bench
.venv/bin/ruff format --check splitvmm tests bench
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -ra "$@"
