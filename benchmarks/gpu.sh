#!/usr/bin/env bash
# The benchmark suite on a lent GPU machine (H100/H200 with JAX and torch, no internet).
# Run from the repository root through the device tool, carrying the diffusers wheel:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=330)
# It writes ${OUT:-.}/RESULTS_gpu.md (this GPU's section), ${OUT:-.}/RESULTS.md (the whole
# file) and ${OUT:-.}/bench_gpu.log. Fold the section in here with:
#   python benchmarks/run_all.py --merge <files_at>/RESULTS_gpu.md
# One suite only, e.g. the runtime loop against the static one (issue 22; about 60 s):
#   run(command="bash benchmarks/gpu.sh --only dynamic_steps", timeout_s=330)
# The serving engine against the batching policies (issue 27):
#   run(command="bash benchmarks/gpu.sh --only engine", timeout_s=330)
# The test suite on the GPU is tests/gpu.sh.
set -uo pipefail
source "$(dirname "$0")/../benchmarks/gpu_env.sh"
# The suite stops starting new parts after --budget seconds; timeout (GPU_TIMEOUT) is the hard stop.
# Extra arguments go to run_all.py (e.g. --quick for a smoke check). The SD-1.5-config UNet
# (benchmarks/sd_unet.py: about 16 compilations of an 860M-parameter UNet, several minutes) comes
# last in the suite; run it on its own with
#   run(command="GPU_TIMEOUT=540 bash benchmarks/gpu.sh --only sd_unet --budget 420", carry=[".whl"], timeout_s=570)
timeout "${GPU_TIMEOUT:-280}" python3 benchmarks/run_all.py --budget 200 "$@" 2>&1 | tee "$OUT_DIR/bench_gpu.log"
