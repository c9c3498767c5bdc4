#!/usr/bin/env bash
# Set up (see setup.sh) and run the demo: baseline vs online-KD methods on Fashion-MNIST,
# printing a table and writing plots and the exported target model under runs/demo/.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --epochs 2 --subset 1000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m branchify.recipes.demo "$@"
