#!/usr/bin/env bash
# Create .venv with a CPU-friendly torch pin and groupmoe installed (editable) with test extras,
# plus the transformers 4.x overlay .transformers4 for the 4.x tests.
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
# The transformers 4.x tests (marker transformers4) run against a real 4.x release: an overlay
# of it and the hub/tokenizers versions it pins, put first on PYTHONPATH by scripts/test.sh
# (torch, peft and groupmoe itself still come from .venv; transformers pulls no torch).
T4=4.57.6
if [ ! -d ".transformers4/transformers-$T4.dist-info" ]; then
  echo "setup: installing transformers==$T4 into .transformers4"
  rm -rf .transformers4
  .venv/bin/python -m pip install -q --target .transformers4 "transformers==$T4"
fi
