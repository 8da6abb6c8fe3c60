#!/usr/bin/env bash
# Fail unless `import vllm_bitdecode` with PYTHONPATH=<dir>:/tmp/site finds <dir>'s copy, as
# a benchmark script does (its own folder first, not the repository root; run from `/` so
# that the current folder's package does not answer instead):
#     bash scripts/imports_from.sh /tmp/g64
[ $# -eq 1 ] && [ "${1#/}" != "$1" ] || { echo "usage: imports_from.sh <absolute dir>"; exit 2; }
dir=${1%/}
(cd / && PYTHONPATH="$dir:/tmp/site" python3 -c "
import sys, vllm_bitdecode as m
from vllm_bitdecode import ops  # noqa: F401  (the copy's own build)
ok = m.__file__.startswith('$dir/')
print(('imports ' if ok else 'NOT imported from $dir: ') + m.__file__)
sys.exit(0 if ok else 1)")
