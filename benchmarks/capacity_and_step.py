"""KV-cache capacity and decode step time, FLASH_ATTN vs BITDECODE, one GPU, one run.

Llama-3-8B shape with dummy weights (32 layers, 32/8 heads, d=128, vocab 128256);
every engine in its own subprocess with the same gpu_memory_utilization, so the
"GPU KV cache size" figures compare like for like.

    python benchmarks/capacity_and_step.py --batch 8 --context 16384

Writes benchmarks/results/capacity_<gpu>.json (device, date, commit).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vllm_bitdecode.provenance import gpu_slug, results_doc, write_results
from vllm_bitdecode.testing.engine import run_in_subprocess
from vllm_bitdecode.testing.model_dir import write_llama_config

CASES = [
    ("FLASH_ATTN", "bf16", {}),
    ("FLASH_ATTN", "fp8", {"kv_cache_dtype": "fp8"}),
    ("BITDECODE", "int4", {"bitdecode": {"bits": 4}}),
    ("BITDECODE", "int2", {"bitdecode": {"bits": 2}}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    gpu = torch.cuda.get_device_name()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_llama_config(Path(tmp) / "llama3-8b-shape"))
        for backend, kv, extra in CASES:
            spec = dict(model=model, backend=backend, gpu_memory_utilization=0.9,
                        max_model_len=args.context + 2 * args.steps + 16,
                        max_num_seqs=args.batch,
                        decode_timing=dict(batch=args.batch, context=args.context,
                                           steps=args.steps), **extra)
            res = run_in_subprocess(spec, timeout=1200)
            rec = dict(backend=backend, kv=kv, kv_cache_tokens=res["kv_cache_tokens"],
                       **res["decode_timing"])
            print(json.dumps(rec), flush=True)
            records.append(rec)
    base = records[0]
    for r in records:
        r["capacity_vs_bf16"] = r["kv_cache_tokens"] / base["kv_cache_tokens"]
        r["step_speedup_vs_bf16"] = base["ms_per_step"] / r["ms_per_step"]
    doc = results_doc(gpu, model="llama3-8b-shape dummy weights", records=records)
    out = Path(args.out or f"benchmarks/results/capacity_{gpu_slug(gpu)}.json")
    write_results(doc, out)
    print(f"{'backend':<11}{'kv':<6}{'KV tokens':>12}{'x bf16':>8}{'ms/step':>9}{'speed-up':>9}")
    for r in records:
        print(f"{r['backend']:<11}{r['kv']:<6}{r['kv_cache_tokens']:>12,}"
              f"{r['capacity_vs_bf16']:>8.2f}{r['ms_per_step']:>9.2f}{r['step_speedup_vs_bf16']:>9.2f}")


if __name__ == "__main__":
    main()
