#!/usr/bin/env bash
# Follow scripts/device_pipeline.sh on the lent GPU machine: wait up to <seconds> for
# <marker> (an extended regex, e.g. "STEP ALLDONE" or "STEP bench_decode|ALLDONE") in its
# progress file, then pack the results folder into $OUT/pipeline.tgz (one file: a call
# returns only a few) and print the progress. (Until 2026-12-02 the marker was a basic
# regex, in which "a|b" matches only itself: such a poll waited out its whole time.)
#     bash scripts/device_poll.sh <seconds> <marker>
D="${PIPELINE_DIR:-/tmp/pipeline}"
# a machine given back while idle comes back bare: say so at once instead of waiting
[ -f "$D/progress" ] || { echo "no pipeline on this machine ($D/progress missing): a fresh one?"; exit 1; }
end=$(( $(date +%s) + $1 ))
while [ "$(date +%s)" -lt "$end" ]; do
  grep -qE "$2" "$D/progress" 2>/dev/null && break
  sleep 5
done
[ -n "${OUT:-}" ] && tar -C "$(dirname "$D")" -czf "$OUT/pipeline.tgz" --exclude='*.sass' "$(basename "$D")"
cat "$D/progress" 2>/dev/null
command -v nvidia-smi > /dev/null &&
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
exit 0
