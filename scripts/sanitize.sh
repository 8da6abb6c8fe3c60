#!/usr/bin/env bash
# compute-sanitizer over the quantize and decode kernels (split-K reduction included) on
# small cases: memcheck, racecheck and synccheck. On the GPU machine, after the build:
#     bash scripts/sanitize.sh                 # logs under ${OUT:-/tmp/bitdecode-out}
# The cases are kernel tests chosen to be small: a bf16 / 4-bit and an fp16 / 2-bit run of
# the odd-length decode test (1..2049 tokens, splits 1, planned and 64), the wide-GQA test
# (second head tile, empty columns), the bit-exact quantize test, the sparse decode kernel
# (gathered tiles), the selection layer (decode_select: keys from the decode, the
# clustered radix top-k, 8 and 4 CTAs per row), page granularity (the top-k over 16-token
# pages, the sparse kernel over page lists) and per-channel K mode's write and decode.
# SANITIZE_CASES replaces the list of test ids; SANITIZE_TOOLS the list of tools.
# Exit status: 0 only if every tool reports 0 errors and the tests pass under it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bitdecode-out}"
mkdir -p "$OUT"
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
T=tests/gpu/test_kernels.py
S=tests/gpu/test_sparse_kernels.py
SEL=tests/gpu/test_selection_kernel.py
# parametrize ids run from the innermost decorator out; dtype0 is bf16, dtype1 fp16
CASES="${SANITIZE_CASES:-$T::test_decode_matches_dequantized_reference[True-4-128-4-dtype0]
$T::test_decode_matches_dequantized_reference[False-8-32-2-dtype1]
$T::test_decode_wide_and_uneven_gqa_groups[12-128-4-dtype0]
$T::test_decode_wide_and_uneven_gqa_groups[12-64-4-dtype0]
$T::test_quantize_matches_reference_bit_for_bit[True-16-128-4-dtype0]
$S::test_sparse_matches_reference[True-4-4-dtype0]
$SEL::test_select_matches_reference[bf16-4-128-4-rot-shared]
$SEL::test_rows_on_the_same_pages_keep_their_own_selection[per_head]
$SEL::test_every_cluster_size[10-per_head]
$SEL::test_select_pages_matches_reference[bf16-4-128-4-shared-64]
$SEL::test_select_pages_matches_reference[bf16-4-64-4-per_head-16]
$S::test_sparse_pages_match_reference[dtype0-4-4-True-64]
tests/gpu/test_kc_write_kernel.py::test_write_matches_reference_step_by_step[bf16-4-16-fp16-params]
tests/gpu/test_kc_read_kernels.py::test_decode_kc_matches_reference[bf16-4-128-4-16]
tests/gpu/test_kc_read_kernels.py::test_dequantize_kc_matches_reference_bit_for_bit[fp16-2-32-64-fp16-params]}"
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
  log="$OUT/sanitize_$tool.log"
  echo "== compute-sanitizer --tool $tool"
  "$SANITIZER" --tool "$tool" --error-exitcode 99 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider $CASES \
    > "$log" 2>&1
  rc=$?
  ran=$(grep -Eo "[0-9]+ passed" "$log" | tail -1)
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
  echo "   exit $rc; tests: ${ran:-none passed}; ${summary:-no summary line}"
  if [ "$rc" != 0 ] || [ -z "$ran" ]; then status=1; tail -30 "$log"; fi
done
exit $status
