#!/usr/bin/env bash
# A time-boxed pipeline for the lent GPU machine: build, then the steps of a plan in one
# lane per GPU, each lane's steps one after another. Start it in the background so that it
# outlives the `run` call, and follow it with scripts/device_poll.sh in calls back to back
# (the machine is given back 30 s after a call ends):
#
#     setsid nohup bash scripts/device_pipeline.sh scripts/plans/kernels.plan <commit> \
#         > /tmp/pipeline.log 2>&1 &
#     bash scripts/device_poll.sh 540 "STEP ALLDONE"    # -> $OUT/pipeline.tgz
#
# A plan has one step per line, `<lane> <name> <seconds> <command ...>`: lane is a GPU
# index (the command sees only that GPU) or `all` (after every lane has finished, with
# every GPU); `#` starts a comment. Plans joined by `+` run as one, each lane's steps in
# the order given, so one build serves them; `plan:a,b` takes only steps a and b of a
# plan (a.plan+b.plan:x runs all of a and step x of b). `{D}` in a command becomes
# the results folder. On a machine with fewer GPUs than the plans have lanes, the steps
# run one at a time in plan order (lane n on GPU n mod the count). Each step appends
# `STEP <name> rc=<rc> secs=<s> :: <last line of its log>` to {D}/progress (rc 124: its
# time ran out); logs are {D}/<name>.log. <commit> goes to BITDECODE_COMMIT, which the
# benchmarks write into their JSON (the machine's copy of .git can be stale).
# Everything (plans, build, steps) runs from a private copy of the tree, PIPELINE_SRC:
# every `run` call writes the working tree over the repository root again, polls included,
# and on 2026-12-01 an engine that started importing while a poll's copy was written
# failed with `cannot import name 'ops' from 'vllm_bitdecode'`. The tree here may then
# also change while the pipeline runs. The build lands in the copy: a later command that
# wants it (NO_BUILD=1, or a test by hand) runs from there, `cd /tmp/pipeline_src`.
# Environment: PIPELINE_DIR (default /tmp/pipeline), PIPELINE_SRC (default
# /tmp/pipeline_src), NO_BUILD=1 skips the build, PIPELINE_GPUS overrides the GPU count
# that nvidia-smi gives.
set -u
PLAN="$1"
COMMIT="${2:-unknown}"
D="${PIPELINE_DIR:-/tmp/pipeline}"
SRC="${PIPELINE_SRC:-/tmp/pipeline_src}"
mkdir -p "$D"
: > "$D/progress"
# the kit's parts are large and only the install reads them
rm -rf "$SRC" && mkdir -p "$SRC" && tar --exclude=./.kit -cf - . | tar -C "$SRC" -xf - &&
  cd "$SRC" || { echo "STEP ALLDONE copy-failed $SRC" >> "$D/progress"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" BITDECODE_COMMIT="$COMMIT"

step() {  # step <name> <seconds> <command ...>
  local name=$1 secs=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout "$secs" bash -c "$*" < /dev/null > "$D/$name.log" 2>&1  # stdin: not the plan
  rc=$?
  echo "STEP $name rc=$rc secs=$(( $(date +%s) - t0 )) :: $(tail -1 "$D/$name.log" | cut -c1-160)" \
    >> "$D/progress"
}

# the plans' steps, with {D} filled in: "<lane>\t<name>\t<seconds>\t<command>"; read
# before the build, so that a wrong plan or step name costs no device time
plan_steps() {  # plan_steps <file>[:<name>,<name>...]
  local file=${1%%:*} only= out n
  [ "$file" != "$1" ] && only=${1#*:}
  [ -f "$file" ] || { echo "STEP ALLDONE no-plan $file" >> "$D/progress"; return 1; }
  out=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$file" |
    awk -v d="$D" -v only=",$only," '{lane=$1; name=$2; secs=$3; $1=$2=$3=""; sub(/^ +/, "");
      gsub(/\{D\}/, d); if (only == ",," || index(only, "," name ","))
      print lane "\t" name "\t" secs "\t" $0}')
  for n in ${only//,/ }; do  # a misspelt step would otherwise run nothing, silently
    grep -q $'\t'"$n"$'\t' <<< "$out" ||
      { echo "STEP ALLDONE no-step $n in $file" >> "$D/progress"; return 1; }
  done
  echo "$out"
}
IFS=+ read -ra plan_parts <<< "$PLAN"
steps=$(for part in "${plan_parts[@]}"; do plan_steps "$part" || exit 1; done) || exit 1
dup=$(cut -f2 <<< "$steps" | sort | uniq -d | head -1)
[ -z "$dup" ] || { echo "STEP ALLDONE step-twice $dup" >> "$D/progress"; exit 1; }  # one log each
# an A/B plan's base is the tree with docs/patches/$AB_PATCH reversed: without it the
# base steps would run the patched build under the base's name (2026-12-03: AB_PATCH was
# given to the poll instead of the pipeline)
if grep -qF '$AB_PATCH' <<< "$steps" && [ ! -f "docs/patches/${AB_PATCH:-}" ]; then
  echo "STEP ALLDONE no-ab-patch '${AB_PATCH:-}': set AB_PATCH to a file of docs/patches" \
    >> "$D/progress"
  exit 1
fi

command -v nvidia-smi > /dev/null &&
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$D/gpu.txt"
gpus=${PIPELINE_GPUS:-}  # unknown (no nvidia-smi here): a lane per plan lane
[ -z "$gpus" ] && [ -s "$D/gpu.txt" ] && gpus=$(wc -l < "$D/gpu.txt")
if [ "${NO_BUILD:-0}" != 1 ]; then
  step build 600 python3 -m pip install --no-build-isolation --no-deps -e .
  grep -q "^STEP build rc=0 " "$D/progress" || { echo "STEP ALLDONE build-failed" >> "$D/progress"; exit 1; }
fi

run_step() {  # run_step <lane> <name> <seconds> <command>: lane n on GPU n (mod the count)
  if [ "$1" = all ]; then step "$2" "$3" "$4"; return; fi
  local gpu=$1
  [ -n "$gpus" ] && gpu=$(( $1 % gpus ))
  CUDA_VISIBLE_DEVICES=$gpu step "$2" "$3" "$4"
}
run_steps() {  # run_steps [<lane>]: that lane's steps, or without one every step, in order
  while IFS=$'\t' read -r l name secs cmd; do
    if [ -z "${1:-}" ] || [ "$l" = "$1" ]; then run_step "$l" "$name" "$secs" "$cmd"; fi
  done <<< "$steps"
}
lane() {  # lane <lane>: its steps in order
  run_steps "$1"
  echo "STEP LANE$1DONE" >> "$D/progress"
}
lanes=$(cut -f1 <<< "$steps" | grep -v '^all$' | sort -u)
if [ -n "$gpus" ] && [ "$(wc -w <<< "$lanes")" -gt "$gpus" ]; then
  # fewer GPUs than lanes (an x2 plan on one GPU): every step in plan order, one at a time
  echo "STEP SERIAL $gpus GPU(s) for lanes" $lanes >> "$D/progress"
  run_steps
else
  for l in $lanes; do lane "$l" & done
  wait
  grep -q $'^all\t' <<< "$steps" && lane all
fi
echo "STEP ALLDONE" >> "$D/progress"
