#!/usr/bin/env bash
# Runs the whole test suite (unit, integration through `splitvmm up`, Linux early boot).
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not slow'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -ra "$@"
