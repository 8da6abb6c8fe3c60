#!/usr/bin/env bash
# CPU test suite (no GPU needed). Exits non-zero on any failure, including "no tests collected".
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi

rc=0
"$PY" -m pytest -q tests/cpu "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test_cpu.sh: pytest collected no tests in tests/cpu; treating as failure" >&2
fi
exit "$rc"
