#!/usr/bin/env bash
# The test suite on a lent GPU machine (jax with CUDA preinstalled, no internet), in one call:
#   run(command="bash tests/gpu.sh", carry=[".whl"], timeout_s=330)
# The default backend is then the GPU (one device): the 8-device tests skip themselves (the
# 2026-11-26 H200 pass: 288 passed, 17 skipped, 139 s). Writes ${OUT:-.}/tests_gpu.log and
# ${OUT:-.}/tests_gpu.xml (JUnit) and ends with the list of failures (none: "GPU test pass: no failures"). Extra arguments go
# to pytest (e.g. tests/test_parallel.py -k tolerance). Stops after 280 s, so that a
# 330 s device call always gets its report back.
set -uo pipefail
source "$(dirname "$0")/../benchmarks/gpu_env.sh"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(tests)
timeout 280 python3 -m pytest -o addopts="" -p no:cacheprovider -q -rfE --durations=10 \
  --junitxml="$OUT_DIR/tests_gpu.xml" "${args[@]}" 2>&1 | tee "$OUT_DIR/tests_gpu.log"
status=${PIPESTATUS[0]}
echo
if [ "$status" -eq 124 ]; then
  echo "GPU test pass: cut at 280 s (the log has the tests that ran)"
fi
failures=$(grep -E '^(FAILED|ERROR) ' "$OUT_DIR/tests_gpu.log" || true)
if [ -z "$failures" ] && [ "$status" -eq 0 ]; then
  echo "GPU test pass: no failures"
else
  echo "GPU test pass: pytest exit status $status; failures:"
  echo "${failures:-(none listed)}"
fi
exit "$status"
