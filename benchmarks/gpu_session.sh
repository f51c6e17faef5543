#!/usr/bin/env bash
# One call on the GPU machine (device tool): rayfleet importable without installing (its top-level folders
# linked as the `rayfleet` namespace), vLLM's three imported names from benchmarks/gpu_stubs when vLLM is
# absent; then the GPU tests and the GPU migration benchmark, outputs under $OUT.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SITE=/tmp/rayfleet-site
mkdir -p "$SITE/rayfleet"
for part in actors control_plane kernels policies; do ln -sfn "$REPO/$part" "$SITE/rayfleet/$part"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import vllm" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$REPO/benchmarks/gpu_stubs"
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
cd "$REPO"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
df -h /dev/shm | tee -a "$OUT/gpu.txt"
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 240 python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_kernels.py tests/test_kv_transfer_gpu.py "$@" \
  2>&1 | tail -25 | tee "$OUT/gpu-tests.txt"
timeout 420 python3 benchmarks/bench_gpu_migration.py ${BENCH_ARGS:-} --out "$OUT/bench-gpu-migration.md" 2>&1 | tee "$OUT/bench.log" | tail -40
