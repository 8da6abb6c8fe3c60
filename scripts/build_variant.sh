#!/usr/bin/env bash
# Build a copy of the tree with one patch of docs/patches applied or reversed, for an A/B
# whose other side is the pipeline's own build of main (scripts/plans/ab_on_main.plan):
#     bash scripts/build_variant.sh <dir> <patch file name> apply|reverse
# Prints `rc=<n>` last, which a background build's wait step looks for, and exits with it
# (ab_decode.plan's build_base step). The benchmark scripts find the copy's package first
# with PYTHONPATH=<dir>:/tmp/site.
set -u -o pipefail
[ $# -eq 3 ] || { echo "usage: build_variant.sh <dir> <patch file name> apply|reverse"; echo rc=2; exit 2; }
dir=$1 patch=docs/patches/$2 mode=$3
case $dir in
  /*) ;;
  *) echo "<dir> must be an absolute path (outside the tree), got $dir"; echo rc=2; exit 2 ;;
esac
case $dir/ in "$PWD"/*) echo "<dir> must lie outside the tree ($PWD)"; echo rc=2; exit 2 ;; esac
case $mode in apply) flag= ;; reverse) flag=-R ;; *) echo "mode: apply or reverse"; echo rc=2; exit 2 ;; esac
[ -f "$patch" ] || { echo "no $patch"; echo rc=2; exit 2; }
rm -rf "$dir" && mkdir -p "$dir" &&
  tar --exclude=./.kit --exclude=./build --exclude=./.git -cf - . | tar -C "$dir" -xf - &&
  cd "$dir" && patch $flag -p1 < "$patch" && rm -f vllm_bitdecode/*.so &&
  python3 setup.py build_ext --inplace > build.log 2>&1
rc=$?
tail -3 "$dir/build.log" 2>/dev/null
echo "rc=$rc"
exit "$rc"
