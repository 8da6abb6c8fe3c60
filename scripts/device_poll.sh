#!/usr/bin/env bash
# Follow scripts/device_pipeline.sh on the lent GPU machine: wait up to <seconds> for
# <marker> (e.g. "STEP ALLDONE" or "STEP bench_decode") in its progress file, then pack the
# results folder into $OUT/pipeline.tgz (one file: a call returns only a few) and print
# the progress.
#     bash scripts/device_poll.sh <seconds> <marker>
D="${PIPELINE_DIR:-/tmp/pipeline}"
end=$(( $(date +%s) + $1 ))
while [ "$(date +%s)" -lt "$end" ]; do
  grep -q "$2" "$D/progress" 2>/dev/null && break
  sleep 5
done
[ -n "${OUT:-}" ] && tar -C "$(dirname "$D")" -czf "$OUT/pipeline.tgz" --exclude='*.sass' "$(basename "$D")"
cat "$D/progress" 2>/dev/null
command -v nvidia-smi > /dev/null &&
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
exit 0
