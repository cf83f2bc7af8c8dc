#!/usr/bin/env bash
# Set up (see setup.sh), then the whole gate, in CI's order: ruff, ruff
# format, mypy --strict, the import-linter contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}

echo "== ruff check";          $PYTHON -m ruff check .
echo "== ruff format --check"; $PYTHON -m ruff format --check .
echo "== mypy --strict";       $PYTHON -m mypy
LINT_IMPORTS=$($PYTHON -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "lint-imports"))')
echo "== import-linter";       "$LINT_IMPORTS"
echo "== ORDERING comments"
# Every fence / acquire / release call must follow an "ORDERING:" line.
bad=$(awk 'FNR==1{prev=""} /(fence_|_acquire\(|_release\()/ && $0 !~ /^\s*(#|def |"|from |import )/ && prev !~ /ORDERING:/ {print FILENAME":"FNR": "$0} {prev=$0}' \
    $(git ls-files 'vubackend/*.py') || true)
if [ -n "$bad" ]; then echo "$bad"; echo "missing # ORDERING: comment" >&2; exit 1; fi
echo "== pytest";              $PYTHON -m pytest -q "$@"
