# Sourced by benchmarks/gpu.sh and tests/gpu.sh on a lent GPU machine: installs a carried
# diffusers wheel (.whl/*.whl) if any, sets PYTHONPATH, makes $OUT_DIR, prints the GPU.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:.
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
