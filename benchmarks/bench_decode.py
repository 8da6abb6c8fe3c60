"""Paged decode: vLLM's FlashAttention-3 (bf16 / fp8 KV) vs BITDECODE (4 / 2 bit), one run.

32 query / 8 KV heads, d = 128, one query token per sequence, every sequence at the same
context length, pages scattered at random. Each case is timed with CUDA events around
a single call, after an L2 flush, median of --reps; effective bandwidth counts the KV
bytes the kernel must read (K + V, plus scales for BITDECODE). Also times the
quantize-on-write kernel against vLLM's reshape_and_cache_flash for the same tokens.
With --channel-k it also times per-channel K mode (issue #7: ``decode_kc``, the own page
from the residual) at both bit widths, records with ``"k_mode": "channel"`` (the others
``"token"``); the issue's target is within 10% of per-token mode at the same bits.
Each record's ``gpu`` holds the SM clock, power and the driver's reasons for a lowered
clock, sampled every 10 ms (vllm_bitdecode.testing.gpu_monitor.GpuSampler) from one interval before
its timed calls to one after them, the timed span's length ``window_s`` and the sampled
span's ``sampled_s``: most rows' calls take 3-12 ms (H200, 2026-12-02), and counting
only the samples inside them left 11 rows of 48 with none; with one interval either side
every row had 2-16 (same day, decode_6d300b8_h200.json). NVML's power is a one-second
average: over such short windows it mostly reflects the rows before.

With --cross-layer 32 it also times the per-token decode over a cache laid out as vLLM's
offloading connector asks (all layers' pages of a block together), where a layer's pages
lie 32 pages apart instead of side by side.

    python benchmarks/bench_decode.py   # -> benchmarks/results/decode_<gpu>.json and .png
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vllm_bitdecode.backend.metadata import MIN_TILES_PER_SPLIT, decode_slots, plan_num_splits
from vllm_bitdecode.config import K_PARAMS
from vllm_bitdecode.page_format import PageFormat, rotation_signs
from vllm_bitdecode.provenance import (
    gpu_slug,
    pyplot,
    results_doc,
    save_figure,
    write_results,
)
from vllm_bitdecode.testing.baselines import (
    FA3_GRAPH_MAX_SPLITS,
    fa3_decode_schedule,
    fa3_paged_decode,
)
from vllm_bitdecode.testing.gpu_monitor import GpuSampler

HQ, HKV, D = 32, 8, 128
# how the FA3 rows are timed (recorded in the results; before 2026-12-05 each timed call
# also ran FA3's scheduling kernel, 2-3 us that vLLM spends once per step)
FA3_METHOD = (f"tile schedule made outside the timed call, num_splits <= "
              f"{FA3_GRAPH_MAX_SPLITS} (vLLM 0.20 under full CUDA graphs)")
BLOCK = 16
GROUP = 128  # channels per quantization group (V, and K in per-token mode)
DTYPE = torch.bfloat16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = torch.float8_e4m3fn


class Timer:
    """Median GPU time of one call, after an L2 flush so every read comes from HBM.

    ``graph=True`` captures the call in a CUDA graph once and times its replay, as vLLM
    runs decode: for kernels of a few microseconds this keeps host launch cost out of
    the figure (eager timing relies on the flush keeping the GPU busy while the host
    issues the call). ``kernels=True``: each call also leaves the per-kernel GPU times of
    ``fn`` in ``last_kernels`` (see ``kernels``)."""

    def __init__(self, reps: int, graph: bool = False, kernels: bool = False):
        self.reps = reps
        self.graph = graph
        self.record_kernels = kernels
        self.last_kernels: dict[str, float] | None = None
        self.last_window = (0.0, 0.0)  # the last timed calls' span on the Unix clock
        self.last_spread: list[float] = []  # the last timed calls' 10th and 90th percentiles
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        fn()  # warm up (and JIT / autotune outside the timed region)
        self.last_kernels = self.kernels(fn) if self.record_kernels else None
        if self.graph:
            fn = _captured(fn)
        times = []
        t0 = time.time()
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        self.last_window = (t0, time.time())
        # the spread beside the median, so that an outlying reading shows in the results
        deciles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        self.last_spread = [deciles[0], deciles[-1]]
        return statistics.median(times)

    def kernels(self, fn) -> dict[str, float]:
        """Per-kernel GPU time of one call (us, median over --reps, L2 flushed before
        each), and ``"span"``: first kernel start to last kernel end, gaps included."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(self.reps):
                self.flush.zero_()
                torch.cuda.synchronize()  # one call's kernels per window, flush apart
                fn()
                torch.cuda.synchronize()
        cuda = torch.autograd.DeviceType.CUDA
        kernels = sorted((e for e in prof.events()
                          if e.device_type == cuda and e.time_range.elapsed_us() > 0),
                         key=lambda e: e.time_range.start)
        flush_names = {k.name for k in kernels[:1]}  # each rep starts with the flush
        per_name: dict[str, list[float]] = {}
        spans, rep = [], []
        for e in kernels + [None]:
            if e is None or e.name in flush_names:
                if rep:
                    spans.append(rep[-1].time_range.end - rep[0].time_range.start)
                    for k in rep:
                        per_name.setdefault(k.name, []).append(k.time_range.elapsed_us())
                rep = []
            else:
                rep.append(e)
        out = {name[:80]: statistics.median(t) for name, t in per_name.items()}
        out["span"] = statistics.median(spans) if spans else float("nan")
        return out


def _captured(fn):
    """``fn`` captured in a CUDA graph; returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up on the side stream, as torch.cuda.graph capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def block_table(batch: int, context: int, gen: torch.Generator,
                device: str | torch.device = "cuda") -> tuple[torch.Tensor, int]:
    """Each sequence's pages for ``context`` tokens (the last one partial where 16 does
    not divide it), all of them in a random order."""
    per_seq = -(-context // BLOCK)
    num_blocks = batch * per_seq
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    return perm.view(batch, per_seq).to(device), num_blocks


def bench_fa3(batch, context, kv, timer, gen, query_len: int = 1,
              num_splits: int = FA3_GRAPH_MAX_SPLITS) -> tuple[float, int]:
    """FA3 over paged bf16 / fp8 K/V: each sequence's last ``query_len`` tokens attend
    (1: decode; more: a prefill chunk, as bench_prefill.py times it). As vLLM 0.20 runs
    it: the tile schedule made once outside the timed call (vLLM makes it once per step
    for every layer) and the splits bounded as under its full CUDA graphs (``num_splits``
    0: FA3's own choice, as vLLM runs a step too large for its graphs)."""
    table, num_blocks = block_table(batch, context, gen)
    k = torch.randn(num_blocks, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch * query_len, HQ, D, dtype=DTYPE, device="cuda")
    kw = {}
    if kv == "fp8":
        k, v, q = k.to(FP8), v.to(FP8), q.to(FP8)
        ones = torch.ones(batch, HKV, dtype=torch.float32, device="cuda")
        kw = dict(q_descale=ones, k_descale=ones, v_descale=ones)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * query_len
    seqused = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    # FA3 writes an fp8 query's output in bf16 only ("For FP8 input, output must have
    # dtype BF16"), whatever the model dtype
    out = torch.empty(batch * query_len, HQ, D, dtype=torch.bfloat16 if kv == "fp8" else DTYPE,
                      device="cuda")
    schedule = fa3_decode_schedule(q, k, seqused, context, cu_q, query_len, num_splits)

    def run():
        fa3_paged_decode(q, k, v, table, seqused, context, D**-0.5, out=out, cu_seqlens_q=cu_q,
                         max_seqlen_q=query_len, scheduler_metadata=schedule,
                         num_splits=num_splits, **kw)

    ms = timer(run)
    return ms, batch * context * HKV * D * 2 * k.element_size()


def fill_pages(num_blocks: int, fmt: PageFormat, device: str | torch.device = "cuda",
               layers: int = 1) -> torch.Tensor:
    """Quantize random K/V into every page with the BITDECODE kernel itself. ``layers`` > 1
    lays the cache out as vLLM's offloading connector does (one tensor of (blocks, layers,
    heads, bytes)) and returns layer 0's view, whose pages lie ``layers`` pages apart; the
    other layers' pages are left unwritten (nothing reads them)."""
    from vllm_bitdecode import ops

    cache = torch.empty(num_blocks, layers, HKV, fmt.head_region_bytes, dtype=torch.uint8,
                        device=device)[:, 0]
    chunk = 1 << 16
    signs = rotation_signs(D).to(device)
    for start in range(0, num_blocks * BLOCK, chunk):
        n = min(chunk, num_blocks * BLOCK - start)
        k = torch.randn(n, HKV, D, dtype=DTYPE, device=device)
        slots = torch.arange(start, start + n, device=device)
        ops.quantize_to_pages(k, torch.randn_like(k), slots, cache, signs, fmt.bits,
                              fmt.group_size, BLOCK)
    return cache


def decode_inputs(batch: int, context: int, bits: int, channel_k: bool = False,
                  k_param_bits: int = 16):
    """Query, output, split plan (from the occupancy of the kernel that runs, as the
    backend makes it), split-K buffers, lengths."""
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    num_sms, ctas_per_sm = decode_slots(DTYPE, bits, GROUP, HQ // HKV, torch.device("cuda"),
                                        channel_k, k_param_bits)
    splits = plan_num_splits(batch, HKV, num_sms, ctas_per_sm)
    po = torch.empty(splits * batch * HQ * D, device="cuda")
    pl = torch.empty(splits * batch * HQ, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, torch.empty_like(q), splits, po, pl, lens


def bench_bitdecode(batch, context, bits, timer, gen, layers: int = 1) -> tuple[float, int, int]:
    from vllm_bitdecode import ops

    fmt = PageFormat(D, bits, GROUP, BLOCK)
    table, num_blocks = block_table(batch, context, gen)
    cache = fill_pages(num_blocks, fmt, layers=layers)
    q, out, splits, po, pl, lens = decode_inputs(batch, context, bits)
    signs = rotation_signs(D).cuda()

    def run():
        ops.decode(out, q, cache, table, lens, po, pl, signs, D**-0.5, bits, GROUP, BLOCK, splits,
                   MIN_TILES_PER_SPLIT)

    ms = timer(run)
    return ms, batch * context * HKV * fmt.bytes_per_token_head, splits


def fill_pages_kc(table: torch.Tensor, num_blocks: int, context: int, layout):
    """Channel-mode pages and residuals for every sequence, written by ``write_tokens_kc``
    (each sequence prefilled in page-aligned chunks, residual slot = batch row)."""
    from vllm_bitdecode import ops

    fmt = layout.fmt
    batch = table.shape[0]
    cache = torch.empty(num_blocks, HKV, layout.head_region_bytes, dtype=torch.uint8,
                        device="cuda")
    residual = torch.empty(batch, 2, HKV, BLOCK, D, dtype=DTYPE, device="cuda")
    chunk = 1 << 15
    for b in range(batch):
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            pos = torch.arange(start, start + n, device="cuda")
            slots = table[b, pos // BLOCK].long() * BLOCK + pos % BLOCK
            k = torch.randn(n, HKV, D, dtype=DTYPE, device="cuda")
            ops.write_tokens_kc(
                k, torch.randn_like(k), slots,
                torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                torch.tensor([start + n], dtype=torch.int32, device="cuda"),
                torch.tensor([b], dtype=torch.int32, device="cuda"),
                cache, residual, fmt.bits, fmt.group_size, BLOCK, layout.k_param_bits)
    return cache, residual


def bench_bitdecode_kc(batch, context, bits, timer, gen,
                       k_param_bits: int = 16) -> tuple[float, int, int]:
    from vllm_bitdecode import ops
    from vllm_bitdecode.reference_kc import KCPageLayout

    layout = KCPageLayout(PageFormat(D, bits, GROUP, BLOCK), k_param_bits)
    table, num_blocks = block_table(batch, context, gen)
    cache, residual = fill_pages_kc(table, num_blocks, context, layout)
    q, out, splits, po, pl, lens = decode_inputs(batch, context, bits, True, k_param_bits)
    row_slot = torch.arange(batch, dtype=torch.int32, device="cuda")

    def run():
        ops.decode_kc(out, q, cache, residual, table, lens, row_slot, po, pl, D**-0.5, bits,
                      GROUP, BLOCK, splits, MIN_TILES_PER_SPLIT, k_param_bits)

    ms = timer(run)
    # the own page's tile is copied too, and its K and V come from the residual
    own = (context - 1) // BLOCK * BLOCK
    nbytes = batch * HKV * (own * layout.bytes_per_token_head
                            + (context - own) * (layout.bytes_per_token_head + 2 * 2 * D))
    return ms, int(nbytes), splits


def bench_write(num_tokens: int, timer: Timer) -> dict:
    """Quantize-on-write vs vLLM's bf16 reshape_and_cache_flash, same tokens and slots."""
    from vllm import _custom_ops as vllm_ops

    from vllm_bitdecode import ops

    fmt = PageFormat(D, 4, 128, BLOCK)
    num_blocks = 4 * num_tokens // BLOCK + 1
    slots = torch.randperm(num_blocks * BLOCK, device="cuda")[:num_tokens]
    k = torch.randn(num_tokens, HKV, D, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    kc = torch.empty(num_blocks, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    vc = torch.empty_like(kc)
    one = torch.ones((), dtype=torch.float32, device="cuda")
    ms_ref = timer(lambda: vllm_ops.reshape_and_cache_flash(k, v, kc, vc, slots, "auto", one, one))
    cache = torch.empty(num_blocks, HKV, fmt.head_region_bytes, dtype=torch.uint8, device="cuda")
    signs = rotation_signs(D).cuda()
    ms = timer(lambda: ops.quantize_to_pages(k, v, slots, cache, signs, 4, 128, BLOCK))
    return {"num_tokens": num_tokens, "reshape_and_cache_flash_ms": ms_ref,
            "bitdecode_quantize_ms": ms, "ratio": ms / ms_ref}


def bench_case(batch: int, context: int, args: argparse.Namespace, timer: Timer,
               gen: torch.Generator, copy_gbps: float) -> list[dict]:
    """One (batch, context) case: FA3 bf16 and fp8, then BITDECODE at 4 and 2 bits (and
    channel K with --channel-k), one record each; ``window`` is when its calls were timed."""
    base = {}
    rows = []

    def row(**fields) -> dict:  # a record of the timer's last call
        return dict(fields, window=timer.last_window, ms_p10_p90=timer.last_spread)

    for kv in ("bf16", "fp8"):
        ms, nbytes = bench_fa3(batch, context, kv, timer, gen)
        base[kv] = ms
        rows.append(row(impl="fa3", kv=kv, ms=ms, bytes=nbytes))
    for bits in (4, 2):
        ms, nbytes, splits = bench_bitdecode(batch, context, bits, timer, gen)
        rows.append(row(impl="bitdecode", kv=f"int{bits}", k_mode="token", ms=ms,
                        bytes=nbytes, num_splits=splits))
        all_layers = (batch * context * HKV * args.cross_layer
                      * PageFormat(D, bits, GROUP, BLOCK).bytes_per_token_head)
        if args.cross_layer > 1 and all_layers / 1e9 <= args.max_gb:
            ms, nbytes, splits = bench_bitdecode(batch, context, bits, timer, gen,
                                                 layers=args.cross_layer)
            rows.append(row(impl="bitdecode", kv=f"int{bits}", k_mode="token",
                            layout="cross_layer", layers=args.cross_layer, ms=ms,
                            bytes=nbytes, num_splits=splits))
        for k_params in (args.k_params.split(",") if args.channel_k else []):
            ms, nbytes, splits = bench_bitdecode_kc(batch, context, bits, timer, gen,
                                                    K_PARAMS[k_params])
            rows.append(row(impl="bitdecode", kv=f"int{bits}", k_mode="channel",
                            k_params=k_params, ms=ms, bytes=nbytes, num_splits=splits))
    for r in rows:
        r.update(batch=batch, context=context, gbps=r["bytes"] / r["ms"] / 1e6,
                 speedup_vs_fa3_bf16=base["bf16"] / r["ms"],
                 speedup_vs_fa3_fp8=base["fp8"] / r["ms"])
        r["fraction_of_copy_bw"] = r["gbps"] / copy_gbps
        kv = r["kv"] + ("-kc" if r.get("k_mode") == "channel" else "") + (
            "8" if r.get("k_params") == "fp8" else "") + ("-xl" if r.get("layout") else "")
        print(f"B={batch:<3} L={context:<7} {r['impl']:<9} {kv:<8} "
              f"{r['ms']:8.3f} ms {r['gbps']:7.0f} GB/s  x{r['speedup_vs_fa3_bf16']:.2f} "
              f"vs bf16  x{r['speedup_vs_fa3_fp8']:.2f} vs fp8", flush=True)
    return rows


def main() -> None:
    # --block-size / --group-size / --dtype set what every bench function reads
    global BLOCK, GROUP, DTYPE
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--max-gb", type=float, default=40.0, help="skip cases whose bf16 KV is larger")
    ap.add_argument("--out", default=None)
    ap.add_argument("--channel-k", action="store_true",
                    help="also time per-channel K mode (decode_kc) at 4 and 2 bits")
    ap.add_argument("--k-params", default="fp16",
                    help="with --channel-k: K-parameter widths to time, a comma list of "
                         "fp16 and fp8 (default fp16)")
    ap.add_argument("--block-size", type=int, default=BLOCK,
                    help="tokens per page for every implementation, FA3 included (default 16)")
    ap.add_argument("--group-size", type=int, default=GROUP, choices=(32, 64, 128),
                    help="BITDECODE's quantization group (default 128; channel mode's "
                         "quality configs use 32)")
    ap.add_argument("--cross-layer", type=int, default=1, metavar="LAYERS",
                    help="also time the per-token decode over one layer of a cache laid "
                         "out for vLLM's offloading connector, (blocks, LAYERS, heads, "
                         "bytes), pages LAYERS apart; rows with layout cross_layer (cases "
                         "whose whole cache would pass --max-gb are skipped)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                    help="the model dtype: queries, unquantized K/V and BITDECODE's page "
                         "parameters (default bf16)")
    args = ap.parse_args()
    BLOCK, GROUP, DTYPE = args.block_size, args.group_size, DTYPES[args.dtype]

    timer = Timer(args.reps)
    gen = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth(timer)
    print(f"{gpu}: device copy {copy_gbps:.0f} GB/s (read + write)", flush=True)
    records = []
    with GpuSampler(interval_s=0.01) as sampler:
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                if batch * context * HKV * D * 4 / 1e9 <= args.max_gb:
                    records += bench_case(batch, context, args, timer, gen, copy_gbps)
                    torch.cuda.empty_cache()
    for r in records:
        r["gpu"] = gpu_around(sampler, r.pop("window"))
    writes = [bench_write(n, timer) for n in (64, 4096, 65536)]
    for w in writes:
        print(f"write {w['num_tokens']:>6} tokens: reshape_and_cache_flash "
              f"{w['reshape_and_cache_flash_ms']:.4f} ms, quantize "
              f"{w['bitdecode_quantize_ms']:.4f} ms (x{w['ratio']:.2f})")
    doc = results_doc(gpu, copy_gbps=copy_gbps, heads=dict(q=HQ, kv=HKV, d=D),
                      block_size=BLOCK, group_size=GROUP, dtype=args.dtype, fa3=FA3_METHOD,
                      records=records,
                      quantize_on_write=writes)
    out = Path(args.out or f"benchmarks/results/decode_{gpu_slug(gpu)}.json")
    write_results(doc, out)
    plot(doc, out.with_suffix(".png"))


def gpu_around(sampler: GpuSampler, window: tuple[float, float]) -> dict | None:
    """The GPU's clock and power around one row's timed calls: the samples from one
    sampling interval before ``window`` to one after, so that a window shorter than the
    interval still holds one."""
    start, end = window
    margin = sampler.interval_s
    out = sampler.summary([(start - margin, end + margin)])
    if out is not None:
        out.update(window_s=end - start, sampled_s=end - start + 2 * margin)
    return out


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return

    contexts = sorted({r["context"] for r in doc["records"]})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts, strict=True):
        for impl, kv in (("fa3", "bf16"), ("fa3", "fp8"), ("bitdecode", "int4"),
                         ("bitdecode", "int2")):
            for k_mode, k_params, layout in (("token", "fp16", None),
                                             ("token", "fp16", "cross_layer"),
                                             ("channel", "fp16", None),
                                             ("channel", "fp8", None)):
                pts = sorted((r["batch"], r["gbps"]) for r in doc["records"]
                             if r["context"] == ctx and r["impl"] == impl and r["kv"] == kv
                             and r.get("k_mode", "token") == k_mode
                             and r.get("k_params", "fp16") == k_params
                             and r.get("layout") == layout)
                if pts:
                    label = f"{impl} {kv}" + (
                        f" per-channel K ({k_params} params)" if k_mode == "channel" else "") + (
                        " cross-layer pages" if layout else "")
                    style = layout or (k_params if k_mode == "channel" else k_mode)
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label,
                            ls={"token": "-", "fp16": "--", "fp8": ":", "cross_layer": "-."}[
                                style])
        ax.axhline(doc["copy_gbps"], color="gray", ls="--", lw=1, label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"context {ctx // 1024}K")
        ax.set_xlabel("batch")
        ax.set_ylabel("effective GB/s (KV bytes read / time)")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, "paged decode, 32/8 heads, d=128", doc)


if __name__ == "__main__":
    main()
