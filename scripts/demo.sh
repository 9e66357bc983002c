#!/usr/bin/env bash
# The main job: set up if needed, then train the embedded tiny MoE LM with the loop and groupmoe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m groupmoe demo "$@"
