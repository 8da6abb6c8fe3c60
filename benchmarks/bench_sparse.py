"""Sparse decode kernels (issue #6) against dense decode, one run.

Same shape and timing as bench_decode.py (32 query / 8 KV heads, d = 128, one query
token per sequence, pages scattered at random, CUDA events around one call after an L2
flush, median of --reps). Per (batch, context):

- ``fa3 bf16`` and ``bitdecode int4``: dense decode over the whole context, the baselines;
- ``select``: a whole selection layer, ``ops.decode_select`` (the dense decode that also
  keys every token by its best logit, then the top-k over those keys), for each token
  budget; the issue's target is at most 1.3x a dense 4-bit decode;
- ``sparse``: a reuse layer, ``ops.decode_sparse`` over ``budget`` positions per KV head
  chosen at random (the newest included); the issue's target is >= 20x faster than FA3
  bf16 dense at k = 2048 and 128K;
- ``select-pages`` and ``sparse-pages``: the same two layers at page granularity
  (``granularity: "page"``; issue #6: "whole pages or single tokens: measure which
  pays"): ``decode_select`` ranking 16-token pages by their best token, and
  ``decode_sparse`` over ``budget / 16`` pages per KV head chosen at random (the newest
  included), the same bytes as ``sparse`` read as one bulk copy per page, each page's
  place in the cache given (``sel_cache_tiles``, as the backend passes them);
  ``sparse-pages-table`` is the same layer finding the pages through the block table,
  and ``select-pages-no-tiles`` the page selection layer writing no cache places (what
  writing them costs the top-k).

The reuse rows run the backend's reuse-layer split plan (``plan_reuse_splits``). With
``--split-sweep 1,4,16,64`` the page reuse layer is also timed with each of those split
counts and no minimum of tiles per split (rows ``sparse-pages-splits``), the measurement
that plan comes from. ``--kernels`` records each kernel's GPU time per
row (torch.profiler, over eager calls: its ``span`` includes the gaps between their
launches) and ``--graph`` times CUDA-graph replays, as vLLM runs decode.

A replay of one call still pays the graph's own launch (2-3 us more than in a step on an
H100, about a quarter of a B = 1 reuse layer). ``--layers N`` also times each call as a
layer of a decode step (``ms_in_step``): one CUDA graph of N layers, each a small kernel
standing for the model's work between attention layers (so that no layer's kernels
overlap the next layer's, as they can't in a model) then the call, less a graph of the N
small kernels alone, over N. The small kernel reads twice the L2's size, as a model
reads its weights between attention layers, so no layer finds the previous one's data in
the L2 (FA3 and the dense and selection layers read the same cache in every layer; every
reuse layer reads its own random selection).

A row's ``bytes`` (and so ``gbps``) are the useful ones: the codes and parameters of the
tokens attended (136 B per token and KV head at 4 bits). The token-granular kernels
fetch more: a token's 8 B of parameters sit in a 32 B sector, and each list entry is 4 B
(at least 164 B per token, so their GB/s reads 17% or more below the traffic); a
selection layer also writes and re-reads 4 B of key per token and KV head (about 6%).
The page-granular rows read whole tiles, within 0.2% of the count.

    python benchmarks/bench_sparse.py   # -> benchmarks/results/sparse_<gpu>.json and .png
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode as dense  # noqa: E402

from vllm_bitdecode.backend.metadata import (  # noqa: E402
    MIN_TILES_PER_SPLIT,
    plan_reuse_splits,
)
from vllm_bitdecode.config import PAGE_TOKENS  # noqa: E402
from vllm_bitdecode.page_format import PageFormat, rotation_signs  # noqa: E402
from vllm_bitdecode.provenance import (  # noqa: E402
    gpu_slug,
    pyplot,
    results_doc,
    write_results,
)
from vllm_bitdecode.reference_sparse import Selection, cache_tiles  # noqa: E402

BITS = 4
TARGET_SPARSE_VS_FA3 = 20.0  # at k = 2048, 128K
TARGET_SELECT_LAYER_VS_DENSE = 1.3


def random_selection(batch: int, heads: int, context: int, budget: int,
                     gen: torch.Generator) -> torch.Tensor:
    """``[batch, heads, budget]`` int32: per row and head, ``budget`` distinct positions
    below ``context`` in ascending order, the newest (``context - 1``) always among them,
    as ``decode_select`` writes them."""
    if not 1 <= budget <= context:
        raise ValueError(f"budget {budget} must be in [1, context {context}]")
    out = torch.empty(batch, heads, budget, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            older = torch.randperm(context - 1, generator=gen)[: budget - 1].sort().values
            out[b, h, :-1] = older
            out[b, h, -1] = context - 1
    return out


class InStepTimer:
    """``timer``'s time of one call, and the cost of calls as the layers of a decode step
    (``in_step``): a CUDA graph of ``layers`` layers, each a separator kernel then its
    call, timed by ``graph_timer``, less a graph of the separators alone, over ``layers``
    (ms). ``last_fn`` is the last call timed, for a row timed by another script's code."""

    def __init__(self, timer, layers: int, graph_timer=None, separator=None):
        if layers < 0:
            raise ValueError(f"--layers must be >= 0, got {layers}")
        self.timer = timer
        self.layers = layers
        self.graph_timer = graph_timer
        self.separator = separator
        self.last_fn = None
        self._separators_ms: float | None = None  # the same graph for every row

    def __getattr__(self, name):  # last_spread, last_kernels, ... of the wrapped timer
        if name == "timer":  # not set yet (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.timer, name)

    def __call__(self, fn) -> float:
        self.last_fn = fn
        return self.timer(fn)

    def in_step(self, fns: list) -> float:
        if len(fns) != self.layers or not fns:
            raise ValueError(f"{len(fns)} layer calls for {self.layers} layers")
        sep = self.separator

        def step():
            for f in fns:
                sep()
                f()

        if self._separators_ms is None:
            self._separators_ms = self.graph_timer(lambda: [sep() for _ in fns])
        return (self.graph_timer(step) - self._separators_ms) / len(fns)


def separator_kernel():
    """A stand-in for the model's work between two attention layers: a reduction over
    twice the L2's size, as the layers' weights are read in between (and reads, so no
    dirty lines are left to write back during the next layer). Nothing a layer read is
    left in the L2 for the next one, and as a plain launch it starts only after the
    previous layer's last kernel ends: without it, a layer's first kernel (a programmatic
    launch) could start under the previous layer's combine."""
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    weights = torch.ones(2 * l2_bytes // 4, dtype=torch.float32, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")
    return lambda: torch.sum(weights, dim=0, out=total)


def sweep_splits(requested: list[int], planned: int) -> list[int]:
    """The split counts of --split-sweep that the planned split-K buffers can hold."""
    if any(s < 1 for s in requested):
        raise ValueError(f"split counts must be positive, got {requested}")
    return [s for s in requested if s <= planned]


def bench_cases(batch: int, context: int, budgets: list[int], timer: InStepTimer,
                gen: torch.Generator, split_sweep: list[int] = ()) -> list[dict]:
    from vllm_bitdecode import ops

    def row_of_last_call(in_step: list | None = None, **row) -> dict:
        """The row of the call just timed; ``in_step``: its layers' calls in a step."""
        row["ms_p10_p90"] = timer.last_spread
        if timer.last_kernels is not None:  # where a few-microsecond layer's time goes
            row["kernels_us"] = timer.last_kernels
        if in_step:
            row["ms_in_step"] = timer.in_step(in_step)
        return row

    def timed(fn, in_step: list | None = None, **row) -> dict:
        return row_of_last_call(in_step, ms=timer(fn), **row)

    fmt = PageFormat(dense.D, BITS, dense.GROUP, dense.BLOCK)
    ms, nbytes = dense.bench_fa3(batch, context, "bf16", timer, gen)
    # FA3's call is made inside bench_fa3: every layer of its step repeats it (the
    # separator between layers leaves nothing of it in the L2), as for the dense and
    # selection layers below
    rows = [row_of_last_call([timer.last_fn] * timer.layers, impl="fa3", kind="dense",
                             kv="bf16", ms=ms, bytes=nbytes)]
    table, num_blocks = dense.block_table(batch, context, gen)
    cache = dense.fill_pages(num_blocks, fmt)
    q, out, splits, po, pl, lens = dense.decode_inputs(batch, context, BITS)
    signs = rotation_signs(dense.D).cuda()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    scale = dense.D**-0.5
    per_token = fmt.bytes_per_token_head * dense.HKV * batch
    dense_bytes = context * per_token

    def run_dense():
        ops.decode(out, q, cache, table, lens, po, pl, signs, scale, BITS, dense.GROUP,
                   dense.BLOCK, splits, MIN_TILES_PER_SPLIT)

    rows.append(timed(run_dense, [run_dense] * timer.layers, impl="bitdecode", kind="dense",
                      kv=f"int{BITS}", bytes=dense_bytes, num_splits=splits))
    keys = torch.zeros(batch * context * dense.HKV, dtype=torch.int32, device="cuda")
    offsets = torch.arange(batch, dtype=torch.int64, device="cuda") * context
    for budget in budgets:

        for unit, suffix in ((1, ""), (PAGE_TOKENS, "-pages")):
            units = budget // unit
            positions = torch.empty(batch, dense.HKV, units, dtype=torch.int32, device="cuda")
            counts = torch.empty(batch, dtype=torch.int32, device="cuda")
            # pages: the lists as places in the cache too, as the backend passes them
            tiles = torch.empty_like(positions) if unit > 1 else None

            def run_select(positions=positions, counts=counts, unit=unit, tiles=tiles):
                ops.decode_select(out, q, cache, table, lens, po, pl, signs, scale, BITS,
                                  dense.GROUP, dense.BLOCK, splits, MIN_TILES_PER_SPLIT,
                                  positions, counts, keys, offsets, 0, False, unit, tiles)

            # with --kernels, the decode (and combine) beside the top-k: where the
            # selection layer's time over a dense decode goes
            rows.append(timed(run_select, [run_select] * timer.layers, impl="bitdecode",
                              kind="select" + suffix, kv=f"int{BITS}", budget=budget,
                              bytes=dense_bytes, num_splits=splits))
            if unit > 1:  # the same layer without the cache places, this run's A/B
                no_tiles = functools.partial(run_select, tiles=None)
                rows.append(timed(no_tiles, [no_tiles] * timer.layers, impl="bitdecode",
                                  kind="select-pages-no-tiles", kv=f"int{BITS}",
                                  budget=budget, bytes=dense_bytes, num_splits=splits))
            # a random selection of the same size (the newest unit kept), as select writes
            positions.copy_(random_selection(batch, dense.HKV, context // unit, units, gen))
            counts.fill_(units)

            # the reuse layer's own split plan, as the backend runs it
            reuse = plan_reuse_splits(batch, dense.HKV, num_sms, budget, splits)

            def tiles_of(positions: torch.Tensor, counts=counts, unit=unit) -> torch.Tensor | None:
                return None if unit == 1 else cache_tiles(
                    Selection(positions.cpu(), counts.cpu()), table.cpu(), dense.BLOCK).cuda()

            first_tiles = tiles_of(positions)

            def run_sparse(positions=positions, tiles=first_tiles, counts=counts, unit=unit,
                           n=reuse, min_tiles=MIN_TILES_PER_SPLIT):
                ops.decode_sparse(out, q, cache, table, lens, positions, counts, po, pl,
                                  signs, scale, BITS, dense.GROUP, dense.BLOCK, n,
                                  min_tiles, False, unit, tiles)

            # in a step, each reuse layer reads its own selection
            selections = [random_selection(batch, dense.HKV, context // unit, units,
                                           gen).cuda() for _ in range(timer.layers)]
            layers = [functools.partial(run_sparse, s, tiles_of(s)) for s in selections]
            rows.append(timed(run_sparse, layers, impl="bitdecode", kind="sparse" + suffix,
                              kv=f"int{BITS}", budget=budget, bytes=budget * per_token,
                              num_splits=reuse))
            if unit == 1:
                continue
            # the same pages found through the block table (no cache tiles), this run's A/B
            layers_table = [functools.partial(run_sparse, s, None) for s in selections]
            rows.append(timed(functools.partial(run_sparse, tiles=None), layers_table,
                              impl="bitdecode", kind="sparse-pages-table", kv=f"int{BITS}",
                              budget=budget, bytes=budget * per_token, num_splits=reuse))
            for n in sweep_splits(list(split_sweep), splits):
                # with --layers, in a step too: each layer its own selection, as above
                rows.append(timed(lambda n=n: run_sparse(n=n, min_tiles=1),
                                  [functools.partial(f, n=n, min_tiles=1) for f in layers],
                                  impl="bitdecode", kind="sparse-pages-splits",
                                  kv=f"int{BITS}", budget=budget, bytes=budget * per_token,
                                  num_splits=n, min_tiles_per_split=1))
    return rows


def summarize(rows: list[dict], key: str = "ms") -> dict:
    """The issue's two kernel ratios for one (batch, context), from each row's ``key``;
    where every row has an ``ms_in_step``, the same ratios from it follow as
    ``<name>_in_step``."""
    fa3 = next(r[key] for r in rows if r["impl"] == "fa3")
    dense_ms = next(r[key] for r in rows if r["impl"] == "bitdecode" and r["kind"] == "dense")
    out = {}
    for r in rows:
        if r["kind"] == "sparse":
            out[f"sparse_k{r['budget']}_vs_fa3_bf16"] = fa3 / r[key]
            out[f"sparse_k{r['budget']}_vs_dense_int{BITS}"] = dense_ms / r[key]
        elif r["kind"] == "sparse-pages":
            tokens = next(t[key] for t in rows
                          if t["kind"] == "sparse" and t["budget"] == r["budget"])
            out[f"sparse_pages_k{r['budget']}_vs_fa3_bf16"] = fa3 / r[key]
            out[f"sparse_pages_k{r['budget']}_vs_sparse_tokens"] = tokens / r[key]
            if key == "ms" and "kernels_us" in r and "kernels_us" in rows[0]:
                # GPU time, launches left out
                out[f"sparse_pages_k{r['budget']}_vs_fa3_bf16_gpu_span"] = (
                    rows[0]["kernels_us"]["span"] / r["kernels_us"]["span"])
        elif r["kind"] == "sparse-pages-table":  # > 1: the cache tiles pay
            pages = next(t[key] for t in rows
                         if t["kind"] == "sparse-pages" and t["budget"] == r["budget"])
            out[f"sparse_pages_k{r['budget']}_table_vs_cache_tiles"] = r[key] / pages
        elif r["kind"] == "select":
            out[f"selection_layer_k{r['budget']}_vs_dense_int{BITS}"] = r[key] / dense_ms
        elif r["kind"] == "select-pages":
            out[f"page_selection_layer_k{r['budget']}_vs_dense_int{BITS}"] = r[key] / dense_ms
        elif r["kind"] == "select-pages-no-tiles":  # > 1: what the cache places cost
            pages = next(t[key] for t in rows
                         if t["kind"] == "select-pages" and t["budget"] == r["budget"])
            out[f"page_selection_layer_k{r['budget']}_cache_tiles_vs_none"] = pages / r[key]
    if key == "ms" and all("ms_in_step" in r for r in rows if _ratio_row(r)):
        out |= {f"{k}_in_step": v for k, v in summarize(rows, "ms_in_step").items()}
    return out


def _ratio_row(r: dict) -> bool:
    """Whether ``summarize`` reads the row (the split sweep's rows it leaves out)."""
    return r["kind"] != "sparse-pages-splits"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--budgets", default="256,2048")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--split-sweep", default="",
                    help="comma-separated split counts for the page reuse layer, e.g. 1,4,16,64")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays of each call instead of eager calls")
    ap.add_argument("--kernels", action="store_true",
                    help="also record per-kernel GPU times (torch.profiler) per dense/sparse row")
    ap.add_argument("--layers", type=int, default=0,
                    help="also time each call as a layer of a step, in a CUDA graph of this "
                         "many layers (ms_in_step); 0: not")
    ap.add_argument("--group-size", type=int, default=dense.GROUP, choices=(32, 64, 128),
                    help="V's quantization group (and K's, per token); default 128")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dense.GROUP = args.group_size  # read by every bench function, as bench_decode's flag
    split_sweep = [int(s) for s in args.split_sweep.split(",") if s]
    in_step = (dense.Timer(args.reps, graph=True), separator_kernel()) if args.layers else ()
    timer = InStepTimer(dense.Timer(args.reps, graph=args.graph, kernels=args.kernels),
                        args.layers, *in_step)
    gen = torch.Generator().manual_seed(0)
    gpu = torch.cuda.get_device_name()
    budgets = [int(b) for b in args.budgets.split(",")]
    cases = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            rows = bench_cases(batch, context, budgets, timer, gen, split_sweep)
            for r in rows:
                r.update(batch=batch, context=context, gbps=r["bytes"] / r["ms"] / 1e6)
                in_step = f"  {r['ms_in_step']:8.4f} ms in a step" if "ms_in_step" in r else ""
                print(f"B={batch:<3} L={context:<7} {_label(r):<24} {r['kv']:<5} "
                      f"{r['ms']:8.4f} ms {r['gbps']:7.0f} GB/s{in_step}", flush=True)
                if "kernels_us" in r:
                    print("      " + ", ".join(f"{k.split('(')[0][-40:]} {v:.1f} us"
                                            for k, v in r["kernels_us"].items()), flush=True)
            summary = summarize(rows)
            print("   " + ", ".join(f"{k} x{v:.2f}" for k, v in summary.items()), flush=True)
            cases.append(dict(batch=batch, context=context, records=rows, summary=summary))
            torch.cuda.empty_cache()
    doc = results_doc(gpu, heads=dict(q=dense.HQ, kv=dense.HKV, d=dense.D),
                      block_size=dense.BLOCK, group_size=dense.GROUP, bits=BITS,
                      timing="cuda graph replay" if args.graph else "eager call",
                      layers_in_step=args.layers,
                      targets=dict(sparse_k2048_128k_vs_fa3_bf16=TARGET_SPARSE_VS_FA3,
                                   selection_layer_vs_dense=TARGET_SELECT_LAYER_VS_DENSE),
                      cases=cases)
    group = "" if dense.GROUP == 128 else f"g{dense.GROUP}_"  # not over the default's file
    out = Path(args.out or f"benchmarks/results/sparse_{group}{gpu_slug(gpu)}.json")
    write_results(doc, out)
    plot(doc, out.with_suffix(".png"))


def _label(r: dict) -> str:
    label = f"{r['impl']} {r['kind']}" + (f" k={r['budget']}" if "budget" in r else "")
    return label + (f" s={r['num_splits']}" if r["kind"] == "sparse-pages-splits" else "")


def plot(doc: dict, path: Path) -> None:
    """One bar per row and case (a single replay's time), with the row's time as a layer
    of a step marked on its bar where it was taken (--layers)."""
    plt = pyplot()
    if plt is None:
        return

    cases = doc["cases"]
    fig, ax = plt.subplots(figsize=(2.2 * len(cases) + 6, 4.2))
    labels = list(dict.fromkeys(_label(r) for case in cases for r in case["records"]
                                if _ratio_row(r)))  # a sweep: JSON only
    width = 0.8 / len(labels)
    marked = False
    for i, label in enumerate(labels):
        xs, ys, steps = [], [], []
        for c, case in enumerate(cases):
            row = next((r for r in case["records"] if _label(r) == label), None)
            xs.append(c + i * width)
            ys.append(row["ms"] if row else 0.0)
            if row and "ms_in_step" in row:
                steps.append((c + i * width, row["ms_in_step"]))
        ax.bar(xs, ys, width, label=label)
        if steps:
            ax.plot(*zip(*steps, strict=True), "k_", markersize=9, markeredgewidth=2,
                    label=None if marked else "as a layer of a step")
            marked = True
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"B={c['batch']}, {c['context'] // 1024}K" for c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer call (CUDA-graph replay)" if doc.get("timing") ==
                  "cuda graph replay" else "ms per layer call")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    pages = f"{doc.get('bits', 4)}-bit pages, group {doc.get('group_size', 128)}"
    ax.set_title(f"sparse decode, {pages}, 32/8 heads, d=128\n{doc['device']} "
                 f"({doc['date']}, {doc.get('commit', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
