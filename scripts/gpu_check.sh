#!/usr/bin/env bash
# The GPU checks of issue 4 in one run, for a lent CUDA machine (see the device notes):
# correctness of the Triton kernels at training sizes, then the benchmarks.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh      # the log lands in $OUT/gpu_check.log
#   SWEEP=1 OUT=/tmp/gpu bash scripts/gpu_check.sh   # also sweep the fused encoder's tiles
#   REHEARSE=1 OUT=/tmp/gpu bash scripts/gpu_check.sh  # every step at tiny sizes on a CPU
#
# REHEARSE runs each step of the script as a GPU session would, at tiny sizes, without a GPU:
# the pytest steps only collect their tests, the benchmarks run torch's kernels, and
# tune-kernels runs the Triton kernels under Triton's interpreter. It checks the script's
# plumbing (its flags, the files it writes, the summary's lines), so that a rare GPU session is
# not spent on a broken command; tests/test_benchmarks.py runs it in CI.
#
# It needs torch and triton with a CUDA GPU, nothing else installed: saetrain runs from the
# checkout (PYTHONPATH is the repo root).
# Decisions it informs: "top-k: grouped is N x the speed of torch.topk" (add "cuda" to
# saetrain/kernels/topk.py GROUPED_DEVICES if N > 1), "encoder: fused is N x" (FUSE_ON_CUDA), the
# "kernel step (latent-major)" row against "kernel step (matmul+topk)" with the two
# "latent-major is N x the speed of token-major" lines (saetrain/kernels/sparse_ops.py LATENT_MAJOR:
# True if the step row is faster), "decoder optimizer step: one pass is N x the speed of the
# 3 ops" (saetrain/optim.py FUSE_WHERE_TRITON, on: False if N < 1), "top-k: radix is N x
# the speed of torch.topk" with the "kernel step (matmul+radix)" row (saetrain/kernels/topk.py
# RADIX_DEVICES: add "cuda" if both are faster), "losses: one pass is N x the speed of the
# torch ops" (saetrain/kernels/loss.py FUSE_LOSSES, on: False if N < 1), "kernel step (latent+radix)" (both
# switches at once, as the defaults would be if both win), and the "autotuned" lines (the
# tiles each kernel chose). `tune-kernels` decides the same switches from whole steps and
# writes them to $OUT/tuned.json: commit that file as saetrain/kernels/tuned.json, and every user on
# this GPU model starts from the choices it measured.
set -u
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Autotuners keep their timings on disk (Triton's own switch; off under the interpreter): the
# steps after the first reuse them at the same shapes, so tune-kernels' 60 s go to its flips.
export TRITON_CACHE_AUTOTUNING=1
bench="$PY benchmarks/bench_kernels.py --rounds 5"
wide="--d-in 3072 --num-latents 24576"  # the GPU shape (k 32, 4096 tokens by default)
big_batch="--batch 16384"
# tune-kernels without saetrain.cli, which needs jsonargparse and datasets (not on the GPU image)
tune="from saetrain.tuning import run_tune; import sys; run_tune(sys.argv[1:])"
tune_env="" tune_flags=""
first=$bench collect="" scale=1
if [ -n "${REHEARSE:-}" ]; then
    export TRITON_INTERPRET=1
    # The first benchmark runs the Triton kernels under the interpreter (its lines decide the
    # defaults); the rest run torch's, which print the same rows but for those decisions.
    tiny="--rounds 1 --batch 32 --k 4"
    first="env SAETRAIN_KERNELS=triton $bench $tiny"
    bench="env SAETRAIN_KERNELS=torch $bench $tiny"
    wide="--d-in 32 --num-latents 256"
    big_batch=""
    tune_env="SAETRAIN_KERNELS=triton"
    tune_flags="--device cpu --d-in 16 --num-latents 128 --k 4 --batch 16 --rounds 1"
    collect="--collect-only"
    scale=4  # Triton's interpreter and a 2-core CI machine
fi
step() {  # step SECONDS COMMAND...: run it under a time limit; say so if it ran out or failed
    local limit=$(($1 * scale))
    shift
    timeout "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ]; then echo "TIMED OUT after ${limit} s: $*"; fi
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then echo "FAILED (exit $rc): $*"; fi
    return 0
}
{
    # Time limits add up to 590 s, under a device call's 600 s; the most telling lines come
    # first. The first steps compile most kernels (every autotune config of each, about 1 s
    # apiece, cached on disk for the later steps), hence their share.
    [ -n "${REHEARSE:-}" ] && echo "REHEARSAL: tiny sizes on the CPU, no GPU" ||
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "== GPU correctness: training sizes (batch, widths, the decoder's optimizer step)"
    step 140 $PY -m pytest -q -p no:cacheprovider $collect tests/test_kernels.py -k "gpu"
    echo "== GPU correctness: whole training steps, latent-major sums, radix select, small"
    step 60 $PY -m pytest -q -p no:cacheprovider $collect tests/test_kernels.py \
        -k "(training_step or latent_major or decoder_adam or radix) and not gpu"
    echo "== d_in=3072, num_latents=24576, k=32, B=4096 (the issue's GPU target)"
    step 150 $first $wide --dtypes bf16 --parts ${SWEEP:+--sweep}
    echo "== tune-kernels at the issue's shape: \$OUT/tuned.json is saetrain/kernels/tuned.json to commit"
    # --budget: flips stop in time for the final timing and the file (else nothing is stored)
    step 60 env $tune_env $PY -c "$tune" --rounds 5 --budget $((40 * scale)) $tune_flags \
        --out "$OUT/tuned.json"
    echo "== the same at B=16384 (at B=4096 fused Adam alone caps any step near 0.45x the floor)"
    step 70 $bench $wide --dtypes bf16 $big_batch
    echo "== fp32 at the issue's shape"
    step 40 $bench $wide --dtypes fp32 --parts
    echo "== 10% dead: AuxK's dense-over-dead-rows path at its largest"
    step 30 $bench $wide --dtypes bf16 --dead-fraction 0.1 --rounds 3
    echo "== d_in=576, num_latents=16384, k=32, B=4096 (the CPU benchmark's shape)"
    step 40 $bench --dtypes fp32,bf16 --parts
} 2>&1 | tee "$OUT/gpu_check.log"
# The lines that decide defaults and report the targets, gathered at the end in run order
# (read whole before any is appended: grep must not read its own output back from the log).
lines="^== |passed|failed|x floor speed|no step beats|grouped is|fused is|latent-major is"
lines="$lines|^tuned:|a step:|REJECTED|stored for|^TIMED OUT|^FAILED"
lines="$lines|faster than dense|decoder-norm step,|one pass is|radix is"
summary=$(grep -E "$lines" "$OUT/gpu_check.log")
printf '%s\n%s\n' "== summary: decisions and targets (each block above, in order)" "$summary" |
    tee -a "$OUT/gpu_check.log"
