#!/usr/bin/env bash
# Checks saetrain's SAELens and sparsify exports/imports against the real libraries:
#   bash scripts/check_interop.sh            # venv in /tmp/peers-venv (override with PEERS_VENV)
# Creates a separate venv that sees this environment's packages (so the installed torch and
# saetrain are reused), installs sae-lens and eai-sparsify there, then runs
# scripts/check_interop.py, which exits non-zero when any output differs by more than 1e-5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PEERS_VENV:-/tmp/peers-venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# torch first and pinned: an unpinned resolve can pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q sae-lens eai-sparsify
"$VENV/bin/python" -c "import saetrain" 2>/dev/null || "$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" scripts/check_interop.py "$@"
