"""One layer's prefill chunk: FLASH_ATTN's path against BITDECODE's, in one run.

vLLM's FLASH_ATTN runs a prefill chunk as one FlashAttention-3 call over the paged bf16
(or fp8) cache. BITDECODE's impl (backend/impl.py, ``_prefill``) first rotates the
chunk's Q as K was rotated, reads each request's whole context, chunk included, back from
the 4- or 2-bit pages into the prefill workspace (``dequantize_pages``), and runs the same
FlashAttention-3 over it; a context longer than ``prefill_window`` goes in windows merged
by LSE. This times the impl's own ``forward`` on a prefill-only step of one request, and
each of its parts alone: the Q rotation in two forms (``rotate_q_hadamard``, what the
impl does: a product in the model dtype with the signed Hadamard matrix over 16, exact
there, the rest of 1/sqrt(D) left to the softmax scale; ``rotate_q_fp32``, the float32
product with the orthonormal matrix that the impl did until 2026-12-02), the
dequantize, and the attention over the workspace. The cache writes are not timed here
(``bench_decode.py`` times quantize-on-write against ``reshape_and_cache_flash``). Each
call is timed after an L2 flush, median of --reps; ``vs_fa3_bf16`` is a record's time
over FA3 bf16's for the same chunk and context.

    python benchmarks/bench_prefill.py   # -> benchmarks/results/prefill_<gpu>.json
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode as dense  # noqa: E402
from bench_decode import BLOCK, DTYPE, HKV, HQ, D, Timer  # noqa: E402

from vllm_bitdecode import config as bd_config  # noqa: E402
from vllm_bitdecode.backend.metadata import (  # noqa: E402
    BitDecodeMetadata,
    BitDecodeMetadataBuilder,
    prefill_workspace_rows,
)
from vllm_bitdecode.page_format import rotation_signs  # noqa: E402
from vllm_bitdecode.provenance import gpu_slug, results_doc, write_results  # noqa: E402
from vllm_bitdecode.reference import rotation_matrix  # noqa: E402

SCALE = D**-0.5
DEVICE = torch.device("cuda")


def prefill_step(chunk: int, context: int, bits: int, gen: torch.Generator,
                 window: int):
    """The impl, its pages, Q, output and the metadata of a prefill-only step: one
    request whose last ``chunk`` tokens of ``context`` are new (already in the pages,
    as the write comes first)."""
    from vllm_bitdecode.backend import impl as impl_mod

    cfg = bd_config.BitDecodeConfig(bits=bits, prefill_window=window)
    bd_config.set_active(cfg)
    fmt = cfg.page_format(D, BLOCK)
    table, num_blocks = dense.block_table(1, context, gen, DEVICE)
    cache = dense.fill_pages(num_blocks, fmt, DEVICE)
    rows = prefill_workspace_rows(False, context, chunk, BLOCK, window)
    builder = types.SimpleNamespace(bitdecode=cfg, prefill_workspace_rows=rows,
                                    device=DEVICE, page_format=fmt)
    lens = torch.tensor([context], dtype=torch.int32)
    cam = types.SimpleNamespace(query_start_loc_cpu=torch.tensor([0, chunk], dtype=torch.int32),
                                seq_lens=lens.to(DEVICE), seq_lens_cpu_upper_bound=lens,
                                num_reqs=1, block_table_tensor=table)
    prefill = BitDecodeMetadataBuilder._build_prefill(builder, cam, 0, 0)
    md = BitDecodeMetadata(
        num_actual_tokens=chunk, slot_mapping=torch.zeros(0, dtype=torch.int64, device=DEVICE),
        num_decodes=0, decode_seq_lens=cam.seq_lens[:0], decode_block_table=table[:0],
        num_splits=1, num_decode_tokens=0, prefill=prefill, page_format=fmt,
        rotation_signs=rotation_signs(D).to(DEVICE) if cfg.rotate_k else None,
        partial_out=torch.zeros(1, device=DEVICE), partial_lse=torch.zeros(1, device=DEVICE))
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # the impl takes the model dtype from the default
    try:
        impl = impl_mod.BitDecodeAttentionImpl(HQ, D, SCALE, HKV, None, None, "auto")
    finally:
        torch.set_default_dtype(default)
    impl.prefill_workspace = torch.empty((2, rows, HKV, D), dtype=DTYPE, device=DEVICE)
    q = torch.randn(chunk, HQ, D, dtype=DTYPE, device=DEVICE)
    return impl, cache, q, torch.empty_like(q), md


def bench_bitdecode(chunk: int, context: int, bits: int, timer: Timer, gen: torch.Generator,
                    window: int) -> dict:
    """BITDECODE's prefill of the same chunk through the impl's forward, then its parts."""
    impl, cache, q, out, md = prefill_step(chunk, context, bits, gen, window)
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    fmt, groups = md.page_format, md.prefill.groups
    parts = {}
    ms = timer(lambda: impl.forward(layer, q, q, q, cache, md, output=out))
    rot = rotation_matrix(D).to(DEVICE)
    hadamard = impl._prefill_rotation(q)  # +-1 / 16 in the model dtype
    parts["rotate_q_fp32"] = timer(lambda: (q.float() @ rot).to(q.dtype))
    parts["rotate_q_hadamard"] = timer(lambda: q @ hadamard)
    # each group's K and V: views of the one workspace, as in the impl
    ws = [impl._dequantize_group(cache, g, fmt, q) for g in groups]
    parts["dequantize"] = timer(lambda: [impl._dequantize_group(cache, g, fmt, q)
                                         for g in groups])

    def attention():
        for g, (k, v) in zip(groups, ws, strict=True):  # each window's, not merged
            impl._attend_group(q[g.token_begin : g.token_end], k, v, g, SCALE,
                               out[g.token_begin : g.token_end])

    parts["attention"] = timer(attention)
    return dict(ms=ms, parts=parts, windows=len(groups),
                dequantized_tokens=sum(g.total_kv_tokens for g in groups))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", default="2048,8192", help="new tokens of the request")
    ap.add_argument("--contexts", default="8192,16384,65536",
                    help="the request's tokens after the chunk (cases with chunk > "
                         "context are skipped)")
    ap.add_argument("--window", type=int, default=bd_config.PREFILL_WINDOW_TOKENS,
                    help="BITDECODE's prefill_window (default 16384, the default setting)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    timer = Timer(args.reps)
    gen = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name()
    records = []
    for chunk in map(int, args.chunks.split(",")):
        for context in map(int, args.contexts.split(",")):
            if chunk > context:
                continue
            base = None
            rows = []
            for kv in ("bf16", "fp8"):
                # a chunk is past vLLM's CUDA-graph sizes: FA3 chooses its own splits
                ms, _ = dense.bench_fa3(1, context, kv, timer, gen, query_len=chunk,
                                        num_splits=0)
                base = base or ms
                rows.append(dict(impl="fa3", kv=kv, ms=ms))
            for bits in (4, 2):
                rows.append(dict(impl="bitdecode", kv=f"int{bits}",
                                 **bench_bitdecode(chunk, context, bits, timer, gen,
                                                   args.window)))
            for r in rows:
                r.update(chunk=chunk, context=context, vs_fa3_bf16=r["ms"] / base)
                parts = " ".join(f"{k} {v:.3f}" for k, v in r.get("parts", {}).items())
                print(f"chunk {chunk:>6} context {context:>7} {r['impl']:<9} {r['kv']:<5} "
                      f"{r['ms']:8.3f} ms  x{r['vs_fa3_bf16']:.2f} FA3 bf16  {parts}",
                      flush=True)
            records += rows
            torch.cuda.empty_cache()
    doc = results_doc(gpu, heads=dict(q=HQ, kv=HKV, d=D), block_size=BLOCK,
                      prefill_window=args.window, records=records)
    out = Path(args.out or f"benchmarks/results/prefill_{gpu_slug(gpu)}.json")
    write_results(doc, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
