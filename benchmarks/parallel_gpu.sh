#!/usr/bin/env bash
# parallel_sampling.py on a lent GPU machine: wall time at batch 1 of `parallel_sample` against
# `sample` at S = 100, with the demo's trained digits UNet (its real round counts) and with a
# 64x64x4 latent-size UNet (random weights, run for the digits model's round counts). Rounds
# and quality are device-independent and measured on the CPU, so they are skipped here.
# Carry the demo's cached parameters (no scikit-learn or training needed on the GPU then):
#   mkdir -p .demo_cache && cp ~/.cache/ddim_jax/digits_unet_* .demo_cache/
#   echo /.demo_cache/ >> .git/info/exclude
#   device tool: run(command="bash benchmarks/parallel_gpu.sh", carry=[".demo_cache"], timeout_s=360)
# Writes ${OUT:-.}/RESULTS_gpu.md (this GPU's section) and ${OUT:-.}/parallel_gpu.log; fold the
# section into RESULTS.md with: python benchmarks/run_all.py --merge <files_at>/RESULTS_gpu.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
export DDIM_JAX_DEMO_CACHE="${DDIM_JAX_DEMO_CACHE:-.demo_cache}"
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 python3 benchmarks/run_all.py --only parallel_sampling --budget 240 \
  --out "$OUT_DIR/RESULTS_parallel.md" "$@" 2>&1 | tee "$OUT_DIR/parallel_gpu.log"
