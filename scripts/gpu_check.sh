#!/usr/bin/env bash
# Build the extension and run every GPU test, then the capacity / step-time benchmark.
# On the GPU machine, after the vLLM kit is installed (docs/gpu-runs.md):
#     bash scripts/gpu_check.sh            # results and logs under ${OUT:-/tmp/bitdecode-out}
# Set SKIP_BENCH=1 to run only the tests; E2E_BENCH=1 also runs benchmarks/bench_e2e.py
# (E2E_ARGS passes it arguments, e.g. E2E_ARGS="--backends bf16,int4").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bitdecode-out}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== build"
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }

echo "== GPU tests"
python3 -m pytest -q -rs -p no:cacheprovider tests/gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== capacity and decode step time"
  python3 benchmarks/capacity_and_step.py --out "$OUT/capacity.json" 2>&1 | tail -8 | tee "$OUT/bench.log"
fi
if [ "${E2E_BENCH:-0}" = 1 ]; then
  echo "== end-to-end benchmark (benchmarks/bench_e2e.py ${E2E_ARGS:-})"
  python3 benchmarks/bench_e2e.py --out "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log"
fi
exit "$status"
