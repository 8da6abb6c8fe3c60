#!/usr/bin/env bash
# Every GPU test, spread over the GPUs of the machine: the single-GPU test files are dealt
# out to one pytest per GPU (CUDA_VISIBLE_DEVICES), then the multi-GPU files run with all
# of them. On the lent GPU machine, after the build (scripts/gpu_check.sh builds too):
#     bash scripts/gpu_tests_parallel.sh [pytest arguments]
# Logs: ${OUT:-/tmp/bitdecode-out}/gpu_tests_gpu<i>.log and gpu_tests_multi.log.
# Exit status: 0 only if every pytest passed.
# The whole suite takes longer than one 600 s call of the lent machine. Either run part of
# it per call (GPU_TEST_FILES="tests/gpu/a.py tests/gpu/b.py" replaces the single-GPU list,
# GPU_TEST_MULTI=0 skips the multi-GPU files), or start it with setsid, which survives the
# end of a call, and poll its logs with short calls back to back:
#     setsid nohup bash scripts/gpu_tests_parallel.sh > build/dev/gpu_tests.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bitdecode-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
gpus=$(nvidia-smi -L | wc -l)
[ "$gpus" -ge 1 ] || { echo "no GPU"; exit 1; }

# the files that need one GPU, the longest first so that dealing them out balances
SINGLE=(tests/gpu/test_kernels.py tests/gpu/test_serving.py tests/gpu/test_sparse_kernels.py
        tests/gpu/test_soak.py tests/gpu/test_vllm_e2e.py tests/gpu/test_isolation.py
        tests/gpu/test_serve.py tests/gpu/test_numerical_edges.py tests/gpu/test_selection_kernel.py
        tests/gpu/test_sparse_e2e.py tests/gpu/test_kc_write_kernel.py tests/gpu/test_kc_read_kernels.py
        tests/gpu/test_channel_k_e2e.py tests/gpu/test_channel_k_lifetime.py
        tests/gpu/test_spec_decode.py tests/gpu/test_host_copies.py)
MULTI=(tests/gpu/test_tensor_parallel.py)
for f in tests/gpu/test_*.py; do  # a new file must be placed in one of the lists
  case " ${SINGLE[*]} ${MULTI[*]} " in *" $f "*) ;; *) echo "unlisted GPU test file: $f"; exit 1;; esac
done
if [ -n "${GPU_TEST_FILES:-}" ]; then
  # shellcheck disable=SC2206 # a space-separated list on purpose
  SINGLE=($GPU_TEST_FILES)
fi
[ "${GPU_TEST_MULTI:-1}" = 0 ] && MULTI=()

declare -a share pids
for i in "${!SINGLE[@]}"; do share[$((i % gpus))]+=" ${SINGLE[$i]}"; done
# The CPU references share the cores: torch's default of one thread per core in each of
# the pytest processes ran them about 2x slower on 2 GPUs / 32 cores (2026-11-30).
threads=$(( $(nproc) / gpus )); [ "$threads" -ge 1 ] || threads=1
for g in $(seq 0 $((gpus - 1))); do
  [ -n "${share[$g]:-}" ] || continue
  echo "== GPU $g:${share[$g]}"
  # shellcheck disable=SC2086 # the file list splits on purpose
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} CUDA_VISIBLE_DEVICES=$g \
    python3 -m pytest -q -rs -p no:cacheprovider ${share[$g]} "$@" \
    > "$OUT/gpu_tests_gpu$g.log" 2>&1 &
  pids[$g]=$!
done
status=0
for g in "${!pids[@]}"; do
  wait "${pids[$g]}" || status=1
  echo "-- GPU $g: $(tail -1 "$OUT/gpu_tests_gpu$g.log")"
done
if [ "${#MULTI[@]}" -gt 0 ]; then
  echo "== all GPUs: ${MULTI[*]}"
  python3 -m pytest -q -rs -p no:cacheprovider "${MULTI[@]}" "$@" > "$OUT/gpu_tests_multi.log" \
    2>&1 || status=1
  echo "-- all GPUs: $(tail -1 "$OUT/gpu_tests_multi.log")"
fi
exit $status
