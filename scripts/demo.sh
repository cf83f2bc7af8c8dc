#!/usr/bin/env bash
# Set up (see setup.sh), then run the main job: `vubackend demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m vubackend.cli demo "$@"
