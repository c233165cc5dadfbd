#!/usr/bin/env bash
# The GPU checks of issue 4 in one run, for a lent CUDA machine (see the device notes):
# correctness of the Triton kernels at training sizes, then the benchmarks.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh      # the log lands in $OUT/gpu_check.log
#   SWEEP=1 OUT=/tmp/gpu bash scripts/gpu_check.sh   # also sweep the fused encoder's tiles
#
# It needs torch and triton with a CUDA GPU, nothing else installed: saetrain runs from the
# checkout (saetrain.kernels is linked to kernels/ as the installed package maps it).
# Decisions it informs: "top-k: grouped is N x the speed of torch.topk" (add "cuda" to
# kernels/topk.py GROUPED_DEVICES if N > 1), "encoder: fused is N x" (FUSE_ON_CUDA), the
# "kernel step (latent-major)" row against "kernel step (matmul+topk)" with the two
# "latent-major is N x the speed of token-major" lines (kernels/sparse_ops.py LATENT_MAJOR:
# True if the step row is faster), "decoder optimizer step: one pass is N x the speed of the
# 3 ops" (saetrain/optim.py FUSE_WHERE_TRITON, on: False if N < 1), "top-k: radix is N x
# the speed of torch.topk" with the "kernel step (matmul+radix)" row (kernels/topk.py
# RADIX_DEVICES: add "cuda" if both are faster), "losses: one pass is N x the speed of the
# torch ops" (kernels/loss.py FUSE_LOSSES, on: False if N < 1), "kernel step (latent+radix)" (both
# switches at once, as the defaults would be if both win), and the "autotuned" lines (the
# tiles each kernel chose). `tune-kernels` decides the same switches from whole steps and
# writes them to $OUT/tuned.json: commit that file as kernels/tuned.json, and every user on
# this GPU model starts from the choices it measured.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e saetrain/kernels ] || ln -s ../kernels saetrain/kernels
bench="python3 benchmarks/bench_kernels.py --rounds 5"
{
    # Timeouts add up to 590 s, under a device call's 600 s; the most telling lines come first.
    # The first steps compile most kernels (every autotune config of each, about 1 s apiece,
    # cached on disk for the later steps), hence their share.
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "== GPU correctness: training sizes (batch, widths, the decoder's optimizer step)"
    timeout 140 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu"
    echo "== GPU correctness: whole training steps, latent-major sums, radix select, small"
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
        -k "(training_step or latent_major or decoder_adam or radix) and not gpu"
    echo "== d_in=3072, num_latents=24576, k=32, B=4096 (the issue's GPU target)"
    timeout 150 $bench --d-in 3072 --num-latents 24576 --dtypes bf16 --parts ${SWEEP:+--sweep}
    echo "== tune-kernels at the issue's shape: \$OUT/tuned.json is kernels/tuned.json to commit"
    timeout 60 python3 -c "from saetrain.tuning import run_tune; import sys; run_tune(sys.argv[1:])" \
        --rounds 5 --out "$OUT/tuned.json"
    echo "== the same at B=16384 (at B=4096 fused Adam alone caps any step near 0.45x the floor)"
    timeout 70 $bench --d-in 3072 --num-latents 24576 --dtypes bf16 --batch 16384
    echo "== fp32 at the issue's shape"
    timeout 40 $bench --d-in 3072 --num-latents 24576 --dtypes fp32 --parts
    echo "== 10% dead: AuxK's dense-over-dead-rows path at its largest"
    timeout 30 $bench --d-in 3072 --num-latents 24576 --dtypes bf16 --dead-fraction 0.1 --rounds 3
    echo "== d_in=576, num_latents=16384, k=32, B=4096 (the CPU benchmark's shape)"
    timeout 40 $bench --dtypes fp32,bf16 --parts
} 2>&1 | tee "$OUT/gpu_check.log"
# The lines that decide defaults and report the targets, gathered at the end in run order.
{
    echo "== summary: decisions and targets (each block above, in order)"
    lines="^== |passed|failed|x floor speed|no step beats|grouped is|fused is|latent-major is"
    lines="$lines|^tuned:|a step:|REJECTED|stored for"
    grep -E "$lines|faster than dense|decoder-norm step,|one pass is|radix is" "$OUT/gpu_check.log"
} 2>&1 | tee -a "$OUT/gpu_check.log"
