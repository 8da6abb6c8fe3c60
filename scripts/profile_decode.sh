#!/usr/bin/env bash
# Nsight Compute profile of the decode kernel at B=8 x 128K (int4 and int2), plus its
# SASS, for the kernel notes. On the GPU machine, after the build:
#     bash scripts/profile_decode.sh      # -> ${OUT:-/tmp/bitdecode-out}/ncu_decode_8x131072_b16.txt
#     BLOCK=64 bash scripts/profile_decode.sh   # pages of 64 tokens (decodes ~11% slower, why?)
#     BATCHES=1 CONTEXTS=32768 bash scripts/profile_decode.sh   # the latency case of issue #3
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bitdecode-out}"
mkdir -p "$OUT"
BLOCK="${BLOCK:-16}" BATCHES="${BATCHES:-8}" CONTEXTS="${CONTEXTS:-131072}"
REPORT="$OUT/ncu_decode_${BATCHES}x${CONTEXTS}_b$BLOCK.txt"
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
# each bits case runs decode (+ combine with splits) twice: warm-up, one timed rep
"$NCU" --kernel-name regex:"decode_kernel|combine_kernel" --launch-count 8 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
  --section SchedulerStats --section WarpStateStats --section LaunchStats \
  --section InstructionStats --section ComputeWorkloadAnalysis --print-details all \
  python3 benchmarks/bench_decode.py --batches "$BATCHES" --contexts "$CONTEXTS" --reps 1 \
  --block-size "$BLOCK" --out /tmp/ncu_bench.json > "$REPORT" 2>&1
so=$(python3 -c "import vllm_bitdecode._C as m; print(m.__file__)")
CUOBJDUMP="$(dirname "$NCU")/cuobjdump"
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump || echo cuobjdump)
# SASS of the bf16 / 4-bit / group-128 / 8-heads kernel, and its opcode histogram
# (template arguments: T, HEAD, BITS, GROUP, HEAD_TILES, SPARSE, KC, SELECT)
FN=_ZN9bitdecode13decode_kernelI13__nv_bfloat16Li128ELi4ELi128ELi1ELb0ELb0ELi0ELb0EEEvNS_12DecodeParamsE
"$CUOBJDUMP" -sass -fun "$FN" "$so" > "$OUT/decode_bf16_4bit.sass" 2>&1 || true
grep -oE "^\s+/\*[0-9a-f]+\*/\s+[@!A-Z0-9_. ]+" "$OUT/decode_bf16_4bit.sass" \
  | awk '{op=$2; if (op ~ /^@/) op=$3; sub(/\..*/, "", op); print op}' | sort | uniq -c | sort -rn \
  > "$OUT/decode_bf16_4bit.opcodes"
head -30 "$OUT/decode_bf16_4bit.opcodes"
python3 tools/ncu_summary.py "$REPORT"
