#!/usr/bin/env bash
# Set up (see setup.sh), then the whole gate, in CI's order: ruff, ruff
# format, mypy --strict, the import-linter contracts, pytest (which also
# checks the house rules a grep can check: tests/test_source_rules.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}

echo "== ruff check";          $PYTHON -m ruff check .
echo "== ruff format --check"; $PYTHON -m ruff format --check .
echo "== mypy --strict";       $PYTHON -m mypy
LINT_IMPORTS=$($PYTHON -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "lint-imports"))')
echo "== import-linter";       "$LINT_IMPORTS"
echo "== pytest";              $PYTHON -m pytest -q "$@"
