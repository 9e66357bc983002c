#!/usr/bin/env bash
# Create .venv with a CPU-friendly torch pin and groupmoe installed (editable) with test extras.
# torch is pinned here (not in the package) so a CPU-only machine never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0"
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
echo "setup: installing groupmoe[test]"
.venv/bin/python -m pip install -q -e ".[test]"
