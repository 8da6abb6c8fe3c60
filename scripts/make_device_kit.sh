#!/usr/bin/env bash
# Build the vLLM kit for the lent GPU machine in parts small enough to travel beside this
# repository: each `run` carries the working tree (tracked files, ~40 MB with the shipped
# model) plus what it names, 64 MiB in all, so the shared kit's 59 MB parts no longer fit.
#
#     bash scripts/make_device_kit.sh [.kit]     # ~4 minutes; WITH_FA2=1 is the default
#     WITH_RAY=1 bash scripts/make_device_kit.sh  # + Ray (tensor parallel through Ray)
#     TRANSFORMERS_5=1 bash scripts/make_device_kit.sh .kit/t5
#         # transformers 5 and the packages beside it at the versions a fresh
#         # `pip install vllm==0.20.0` resolved in CI (.ci/run's log, 2026-12-03) instead
#         # of the shared kit's transformers 4.57.6, so the GPU tests see what users get
#
# Writes <dest>/p00 ... (at most 17 MB each) and <dest>/install.sh, which waits until all
# N parts have arrived. On a fresh machine: N calls back to back, the k-th carrying its part
# and <dest>/install.sh and running `bash .kit/install.sh`; the last one goes on with
# `&& export PYTHONPATH=/tmp/site && <build and tests>` (docs/gpu-runs.md).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-.kit}"
PART_BYTES=12000000  # the working tree (~50 MiB) plus one part must stay under 64 MiB
SHARED_KIT="$HERE/../../shared/device/make-vllm-kit.sh"
[ -f "$SHARED_KIT" ] || { echo "missing $SHARED_KIT (the shared device kit)" >&2; exit 1; }
SCRATCH=()  # temporary folders, removed on exit
trap 'rm -rf "${SCRATCH[@]}"' EXIT

if [ "${TRANSFORMERS_5:-0}" = 1 ]; then
  # The shared kit script reads its pins beside itself: run a copy with these swapped in.
  KIT_COPY="$(mktemp -d)"
  SCRATCH+=("$KIT_COPY")
  cp "$(dirname "$SHARED_KIT")"/* "$KIT_COPY/"
  grep -viE '^(transformers|tokenizers|huggingface_hub|xgrammar)==' \
    "$(dirname "$SHARED_KIT")/vllm-kit-requirements.txt" > "$KIT_COPY/vllm-kit-requirements.txt"
  cat >> "$KIT_COPY/vllm-kit-requirements.txt" <<'PINS'
transformers==5.25.0
tokenizers==0.23.3
huggingface_hub==2.4.0
xgrammar==0.2.3
hf-xet==1.8.0
kernels==0.19.1
typer==0.29.2
click==8.5.1
shellingham==1.5.4
rich==15.0.0
markdown-it-py==4.3.0
mdurl==0.1.2
pygments==2.21.0
tomlkit==0.15.3
fsspec==2026.9.0
filelock==4.3.2
safetensors==0.8.0
PINS
  SHARED_KIT="$KIT_COPY/make-vllm-kit.sh"
fi
WITH_FA2="${WITH_FA2:-1}" bash "$SHARED_KIT" "$DEST"
cat $(ls "$DEST"/p[0-9] | sort) > "$DEST/kit.tar.xz"
rm -f "$DEST"/p[0-9] "$DEST"/p[0-9][0-9]
if [ "${WITH_RAY:-0}" = 1 ]; then
  # Ray and the two run-time packages of its own that the image may lack, as a second
  # xz stream of a second tar archive (install.sh reads both with tar --ignore-zeros)
  WORK="$(mktemp -d)"
  SCRATCH+=("$WORK")
  PLAT=""
  for n in $(seq 17 39); do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
  PIPX="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
  PIPX="$PIPX $PLAT --platform manylinux2014_x86_64 --platform any"
  python3 -m pip download -q $PIPX -d "$WORK/whl" ray msgpack click 2>&1 | grep -v "is ignored" || true
  python3 -m pip install -q $PIPX --no-compile --target "$WORK/site" "$WORK"/whl/*.whl 2>&1 \
    | grep -v WARNING || true
  rm -rf "$WORK/site/bin"
  tar -C "$WORK/site" -cf - . | xz -9 -T0 >> "$DEST/kit.tar.xz"
fi
split -b "$PART_BYTES" -d -a 2 "$DEST/kit.tar.xz" "$DEST/p"
rm "$DEST/kit.tar.xz"
N=$(ls "$DEST"/p[0-9][0-9] | wc -l)

cat > "$DEST/install.sh" <<EOF
#!/usr/bin/env bash
# On the GPU machine: keep the part(s) carried with this command in /tmp/kit (which lasts
# while the machine stays warm) and unpack the kit into /tmp/site once all $N have arrived.
set -euo pipefail
mkdir -p /tmp/kit
for p in "\$(dirname "\$0")"/p[0-9][0-9]; do [ -f "\$p" ] && cp "\$p" /tmp/kit/; done
if [ -f /tmp/site/.kit-complete ]; then echo "[kit] already installed in /tmp/site"; exit 0; fi
have=\$(ls /tmp/kit | tr '\n' ' ')
if [ "\$(ls /tmp/kit/p[0-9][0-9] | wc -l)" -ne $N ]; then
  echo "[kit] have \$have of $N parts; waiting"; exit 0
fi
mkdir -p /tmp/site
cat \$(ls /tmp/kit/p[0-9][0-9] | sort) | xz -d -T0 | tar -x --ignore-zeros -C /tmp/site
touch /tmp/site/.kit-complete
echo "[kit] installed vLLM kit in /tmp/site (\$(du -sh /tmp/site | cut -f1)); export PYTHONPATH=/tmp/site"
EOF
chmod +x "$DEST/install.sh"
ls -l "$DEST" >&2
echo "[kit] done: $N parts of at most $PART_BYTES bytes; send one per command" >&2
