#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite, notebooks included (in smoke mode).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k export` or `-m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
