"""Verifying drafts (speculative decoding): T query tokens per sequence over paged KV.

What one attention layer costs when each of a batch's sequences verifies T - 1 drafts
(T query tokens, the last at the sequence's last position, each seeing the positions up
to its own), for T = 1 (a plain decode step), 2 and 4, in one run:

- ``fa3``: vLLM's FlashAttention-3 over bf16 KV, the T tokens of a sequence in one
  varlen call (what FLASH_ATTN runs);
- ``rows``: BITDECODE 4-bit with one decode row per query token, each row a sequence of
  its own that ends at its token and reads every page again (the rows that the backend
  keeps for sparse mode and for more drafts, backend/metadata.py decode_rows);
- ``tokens``: BITDECODE 4-bit with the T tokens beside the query heads in the kernel's
  MMA columns (``decode`` with ``query_start_loc``), every page read once.

32 query / 8 KV heads, d = 128, pages scattered at random; CUDA events around one call
after an L2 flush, median of --reps (bench_decode.Timer). Effective bandwidth counts the
KV bytes of one read of every sequence's context, so the rows' re-reads show as a lower
figure.

    python benchmarks/bench_verify.py   # -> benchmarks/results/verify_<gpu>.json and .png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode as dense  # noqa: E402
from bench_decode import BLOCK, DTYPE, GROUP, HKV, HQ, D, Timer  # noqa: E402

from vllm_bitdecode.backend.metadata import (  # noqa: E402
    MIN_TILES_PER_SPLIT,
    decode_slots,
    plan_num_splits,
)
from vllm_bitdecode.page_format import PageFormat, rotation_signs  # noqa: E402
from vllm_bitdecode.provenance import (  # noqa: E402
    gpu_slug,
    pyplot,
    results_doc,
    save_figure,
    write_results,
)

BITS = 4


def bench_bitdecode(batch: int, context: int, tokens: int, packed: bool, timer: Timer,
                    gen: torch.Generator) -> tuple[float, int]:
    """(ms, splits) of one 4-bit decode call verifying ``tokens`` per sequence, packed
    beside the heads or as one row per token."""
    from vllm_bitdecode import ops

    fmt = PageFormat(D, BITS, GROUP, BLOCK)
    table, num_blocks = dense.block_table(batch, context, gen)
    cache = dense.fill_pages(num_blocks, fmt)
    q = torch.randn(batch * tokens, HQ, D, dtype=DTYPE, device="cuda")
    out = torch.empty_like(q)
    signs = rotation_signs(D).cuda()
    if packed:  # the kernel of gqa x tokens query rows, planned over the sequences
        seqs, gqa_rows = batch, HQ // HKV * tokens
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        qsl = torch.arange(0, batch * tokens + 1, tokens, dtype=torch.int32, device="cuda")
    else:  # row j of a sequence ends at its token: context - (tokens - 1 - j)
        seqs, gqa_rows = batch * tokens, HQ // HKV
        after = torch.arange(tokens - 1, -1, -1, dtype=torch.int32, device="cuda")
        lens = (context - after).repeat(batch)
        table = table.repeat_interleave(tokens, dim=0)
        qsl = None
    num_sms, ctas_per_sm = decode_slots(DTYPE, BITS, GROUP, gqa_rows, torch.device("cuda"))
    splits = plan_num_splits(seqs, HKV, num_sms, ctas_per_sm)
    po = torch.empty(splits * batch * tokens * HQ * D, device="cuda")
    pl = torch.empty(splits * batch * tokens * HQ, device="cuda")

    def run():
        ops.decode(out, q, cache, table, lens, po, pl, signs, D**-0.5, BITS, GROUP, BLOCK,
                   splits, MIN_TILES_PER_SPLIT, qsl, tokens if packed else 1)

    return timer(run), splits


def relative_to_one_token(records: list[dict]) -> None:
    """Each record's ``vs_one_token``: its time over the same implementation's one-token
    step at that batch and context (BITDECODE's rows and tokens share the one-token
    call, recorded as ``tokens``)."""
    def key(r: dict) -> tuple:
        return ("fa3" if r["impl"] == "fa3" else "tokens", r["batch"], r["context"])

    one = {key(r): r["ms"] for r in records if r["tokens"] == 1}
    for r in records:
        r["vs_one_token"] = r["ms"] / one[key(r)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--tokens", default="1,2,4", help="query tokens per sequence (1 + drafts)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    timer = Timer(args.reps)
    gen = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name()
    copy_gbps = dense.copy_bandwidth(timer)
    fmt = PageFormat(D, BITS, GROUP, BLOCK)
    records = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            for tokens in map(int, args.tokens.split(",")):
                fa3, fa3_bytes = dense.bench_fa3(batch, context, "bf16", timer, gen,
                                                 query_len=tokens)
                case = []
                for impl in ("rows", "tokens"):
                    if impl == "rows" and tokens == 1:
                        continue  # one token: rows and tokens are the same call
                    ms, splits = bench_bitdecode(batch, context, tokens, impl == "tokens",
                                                 timer, gen)
                    case.append(dict(impl=impl, kv=f"int{BITS}", ms=ms, num_splits=splits,
                                     bytes=batch * context * HKV * fmt.bytes_per_token_head))
                case.append(dict(impl="fa3", kv="bf16", ms=fa3, bytes=fa3_bytes))
                for r in case:
                    r.update(batch=batch, context=context, tokens=tokens,
                             gbps=r["bytes"] / r["ms"] / 1e6,
                             speedup_vs_fa3_bf16=fa3 / r["ms"])
                    print(f"B={batch:<2} L={context:<7} T={tokens} {r['impl']:<6} "
                          f"{r['ms']:8.4f} ms {r['gbps']:7.0f} GB/s "
                          f"x{r['speedup_vs_fa3_bf16']:.2f} vs FA3 bf16", flush=True)
                records += case
                torch.cuda.empty_cache()
    relative_to_one_token(records)
    doc = results_doc(gpu, copy_gbps=copy_gbps, heads=dict(q=HQ, kv=HKV, d=D),
                      block_size=BLOCK, group_size=GROUP, bits=BITS, records=records)
    out = Path(args.out or f"benchmarks/results/verify_{gpu_slug(gpu)}.json")
    write_results(doc, out)
    plot(doc, out.with_suffix(".png"))


def plot(doc: dict, path: Path) -> None:
    """Per (batch, context): time of one layer against query tokens per sequence."""
    plt = pyplot()
    if plt is None:
        return

    cases = sorted({(r["batch"], r["context"]) for r in doc["records"]})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 4), squeeze=False)
    labels = {"fa3": "FA3 bf16", "rows": "BITDECODE 4-bit, a row per token",
              "tokens": "BITDECODE 4-bit, tokens beside the heads"}
    for ax, (batch, context) in zip(axes[0], cases, strict=True):
        for impl, label in labels.items():
            pts = sorted((r["tokens"], r["ms"]) for r in doc["records"]
                         if (r["batch"], r["context"]) == (batch, context)
                         and (r["impl"] == impl or (impl == "rows" and r["impl"] == "tokens"
                                                    and r["tokens"] == 1)))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_title(f"B={batch} x {context // 1024}K")
        ax.set_xlabel("query tokens per sequence (1 + drafts)")
        ax.set_ylabel("ms per layer")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, "verifying drafts, 32/8 heads, d=128", doc)


if __name__ == "__main__":
    main()
