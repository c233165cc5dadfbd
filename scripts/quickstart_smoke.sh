#!/usr/bin/env bash
# The README's quickstart command, run from the repo root on a few steps (CI runs this): it loads
# the real GGUF model, reads the ShareGPT corpus, trains 3 steps and exports an SAE, which is
# then loaded back. Takes about a minute on 2 cores.
#   bash scripts/quickstart_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$PY" -m saetrain fit --config recipes/quickstart.yaml --out_dir "$out" --run_name smoke \
  --trainer.max_steps 3 --trainer.val_check_interval 3 --checkpoint_every 3 \
  --data.buffer_size 8192 --data.document_buffer 50 \
  --data.val_documents 4 --data.val_every 1 --data.val_tokens 1024
"$PY" - "$out/smoke" <<'PY'
import sys

import saetrain

sae = saetrain.load_sae(sys.argv[1])
extra = sae.cfg.extra
assert extra["steps"] == 3 and extra["tokens_seen"] == 3 * 2048, extra
print(f"quickstart smoke: exported {sae.cfg.num_latents} latents, k {sae.cfg.k}, "
      f"d_in {sae.cfg.d_in}, {extra['tokens_seen']} tokens, val FVU {extra.get('val_fvu'):.3f}")
PY
