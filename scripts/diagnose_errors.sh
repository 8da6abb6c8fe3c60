#!/usr/bin/env bash
# Does a TORCH_CHECK failure inside the extension reach Python as a RuntimeError on this
# machine? Each case runs in its own interpreter so that a crash is reported, not fatal.
cd "$(dirname "$0")/.."
g++ --version | head -1
so=$(python3 -c "import vllm_bitdecode._C as m; print(m.__file__)")
ldd "$so" | grep -E "stdc|gcc_s|c10|torch_python" || true
run() {
  python3 -X faulthandler -c "
import torch, vllm_bitdecode.ops as o
q = torch.zeros(1, 8, 128, dtype=torch.bfloat16, device='cuda')
try:
    $1
    print('no error raised')
except RuntimeError as e:
    print('RuntimeError:', str(e).splitlines()[0][:120])
" > /tmp/diag.out 2>&1
  echo "[$2] exit $? :: $(grep -v '^  File' /tmp/diag.out | head -3 | tr '\n' ' ')"
}
run "torch.empty(-1, device='cuda')" "torch's own check"
run "o.decode_ctas_per_sm(q, 4, 128, 17)" "occupancy, bad gqa"
run "o.decode(q, q, torch.zeros(4, 2, 2176, dtype=torch.uint8, device='cuda'), torch.zeros(1, 4, dtype=torch.int32, device='cuda'), torch.ones(1, dtype=torch.int32, device='cuda'), q, q, None, 0.1, 3, 128, 16, 1, 8)" "decode, bits=3"
if command -v gdb > /dev/null; then
  gdb -batch -ex run -ex bt --args python3 -c "import torch, vllm_bitdecode.ops as o; o.decode_ctas_per_sm(torch.zeros(1, dtype=torch.bfloat16, device='cuda'), 4, 128, 17)" 2>&1 | grep -E "^#" | head -25
fi
