#!/usr/bin/env bash
# End-to-end `fit` on a lent CUDA machine (see the device notes): the tiny recipe on the GPU
# (Triton kernels, fused Adam, the stream's buffers on the device), a SIGKILL mid-run and a
# resume, two layers x two SAE sizes from one pass, and fsdp2 (FSDP2 over NCCL, one GPU: the
# sharded path on CUDA, compared with the plain run). Needs torch, triton, lightning and
# transformers there; jsonargparse travels as wheels in .whl/ (see the device README).
#   OUT=/tmp/gpu bash scripts/gpu_fit_check.sh
set -u
OUT=${OUT:-/tmp/gpu_fit}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
W=/tmp/gpufit
{
    python3 - <<'PY'
import json, random
from lmfixtures import make_model, make_tokenizer, random_sentence
tok = make_tokenizer()
make_model("phi3", len(tok)).save_pretrained("/tmp/gpufit/model")
tok.save_pretrained("/tmp/gpufit/model")
rng = random.Random(0)
with open("/tmp/gpufit/chat.jsonl", "w") as f:
    for _ in range(300):
        msgs = []
        for _t in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": random_sentence(rng)},
                     {"role": "assistant", "content": random_sentence(rng)}]
        f.write(json.dumps({"messages": msgs}) + "\n")
PY
    fit="python3 -m saetrain fit --config recipes/tiny.yaml --data.model $W/model --data.source.path $W/chat.jsonl --out_dir $W/runs --trainer.accelerator gpu --trainer.max_steps 60 --checkpoint_every 10"
    echo "== whole run on the GPU"
    $fit --run_name whole 2>&1 | grep -E "error|Error|exported|stopped" ; python3 -c "import json; e=json.load(open('$W/runs/whole/cfg.json'))['extra']; print('val_fvu', e['val_fvu'], 'dead', e['dead_fraction'], 'tokens', e['tokens_seen'])"
    echo "== SIGKILL after step 10, resume"
    $fit --run_name killed --trainer.callbacks+=killers.Slow > $OUT/killed.log 2>&1 &
    pid=$!
    while [ ! -f $W/runs/killed/lightning/step10.ckpt ]; do sleep 0.1; done; sleep 0.5; kill -9 $pid; wait $pid
    $fit --run_name killed --ckpt_path $W/runs/killed/lightning/last.ckpt 2>&1 | grep -E "error|Error|exported|stopped"
    python3 - <<'PY'
from safetensors.torch import load_file
a = load_file("/tmp/gpufit/runs/whole/sae.safetensors"); b = load_file("/tmp/gpufit/runs/killed/sae.safetensors")
for k in a: print(k, "max |diff| vs the uninterrupted run:", float((a[k] - b[k]).abs().max()))
PY
    echo "== two layers x two sizes from one pass"
    $fit --run_name multi --data.layer "[0, 1]" --model.sae_variants '[{"k": 4}, {"k": 8}]' 2>&1 | grep -E "error|Error|exported|stopped"
    echo "== fsdp2 on one GPU (NCCL), against the whole run"
    $fit --run_name fsdp2 --trainer.strategy fsdp2 2>&1 | grep -E "error|Error|exported|stopped"
    python3 - <<'PY'
from safetensors.torch import load_file
a = load_file("/tmp/gpufit/runs/whole/sae.safetensors"); b = load_file("/tmp/gpufit/runs/fsdp2/sae.safetensors")
for k in a: print(k, "max |diff| fsdp2 vs the plain run:", float((a[k] - b[k]).abs().max()))
PY
} 2>&1 | tee "$OUT/gpu_fit_check.log"
