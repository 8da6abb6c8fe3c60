"""Sparse decode at token or page granularity (issue #6), on the CPU, with the shipped model.

Issue #6 asks whether the reuse layers should gather single tokens (TidalDecode) or whole
pages (Quest-like) and to measure which pays. ``benchmarks/bench_sparse.py`` times the
kernel side; this script measures the quality side without kernels: it runs the shipped
model with Hugging Face transformers in float32 on the CPU (K and V rounded to bf16, as vLLM
stores them in a bf16 cache, or with ``--kv int4`` read back through the reference quantizer
as the 4-bit cache returns them, ``tools/simulate_kv_quant.py``) with the backend's layer plan
(``config.auto_selection_layers``: dense layers before the first selection layer, reuse
layers after it) and the selection rule of ``reference_sparse.select`` ("max_logit": the
best scaled logit over the query heads of a KV head):

- ``token-k<K>``: the newest position plus the K - 1 best older ones;
- ``page-k<K>``: the query's own page plus the K / 16 - 1 older 16-token pages with the best
  page score (the best token score in the page); the same number of tokens read;
- ``tokenown-k<K>``: the query's own page plus the K - 16 best older tokens outside it,
  which separates what the own page (the most recent tokens) is worth from what whole
  pages are.

Every query that decode would make sparse is sparse here: in the retrieval prompts the
positions that generate the answer after the first token (prefill gives the first one), in
the perplexity windows every position from ``min_seq_len`` (twice the budget, the
backend's default) on. Retrieval counts an answer right when every answer token is the
argmax at its position (teacher forcing), which is what greedy decoding would produce.

    python tools/simulate_sparse.py                                   # defaults below
    python tools/simulate_sparse.py --modes dense,token-k256,page-k256 --contexts 2048 --trials 4
    python tools/simulate_sparse.py --kv int4 --modes dense,page-k256 --trials 0 --ppl-windows 8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from simulate_kv_quant import Mode, quantize_kv  # noqa: E402

from vllm_bitdecode import config as bd_config  # noqa: E402
from vllm_bitdecode import stdlib_llama as data  # noqa: E402
from vllm_bitdecode.provenance import results_doc, write_results  # noqa: E402

PAGE = bd_config.PAGE_TOKENS  # a selected page: one 16-token tile of the page format
DEFAULT_MODES = "dense,token-k256,page-k256,token-k512,page-k512"


def parse_mode(name: str) -> tuple[str, int]:
    """``dense`` -> ("dense", 0); ``token-k256`` / ``page-k256`` -> (granularity, budget)."""
    if name == "dense":
        return "dense", 0
    kind, _, k = name.partition("-k")
    if kind not in ("token", "page", "tokenown") or not k.isdigit() or int(k) < 2 * PAGE:
        raise SystemExit(f"unknown mode {name!r}: dense, token-k<K>, page-k<K> or "
                         "tokenown-k<K> (K >= 32)")
    if kind == "page" and int(k) % PAGE:
        raise SystemExit(f"mode {name!r}: a page budget must be a multiple of {PAGE}")
    return kind, int(k)


def selection_mask(scores: torch.Tensor, kind: str, budget: int,
                   sparse_rows: torch.Tensor) -> torch.Tensor:
    """Which keys each query attends to in the reuse layers: [kv_heads, T, T] bool.

    scores: [kv_heads, T, T] selection scores (query, key), any value above the diagonal.
    sparse_rows: [T] bool, the queries decode makes sparse; the others keep every earlier
    key. A sparse query q keeps itself (the newest position) and the budget - 1 best older
    keys (token), or its own page and the budget / PAGE - 1 best older pages (page), or its
    own page and the budget - PAGE best older keys outside it (tokenown)."""
    heads, t, _ = scores.shape
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    older = pos[None, :] < pos[:, None]
    mask = causal.expand(heads, t, t).clone()
    rows = sparse_rows & (pos + 1 > budget)  # shorter rows keep every position anyway
    if not rows.any():
        return mask
    s = scores[:, rows].masked_fill(~older[rows], float("-inf"))  # [heads, r, T]
    keep = torch.zeros_like(s, dtype=torch.bool)
    q = pos[rows]
    if kind == "token":
        top = s.topk(budget - 1, dim=-1).indices
        keep.scatter_(-1, top, True)
        keep[:, torch.arange(len(q)), q] = True
    elif kind == "tokenown":
        in_own = pos[None, :] // PAGE == (q // PAGE)[:, None]  # [r, T]
        top = s.masked_fill(in_own, float("-inf")).topk(budget - PAGE, dim=-1).indices
        keep.scatter_(-1, top, True)
        keep |= in_own
    else:
        pad = (-t) % PAGE
        page_scores = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        page_scores = page_scores.unflatten(-1, (-1, PAGE)).amax(-1)  # [heads, r, pages]
        own = q // PAGE
        pages = torch.arange(page_scores.shape[-1])
        page_scores = page_scores.masked_fill(pages[None, None, :] >= own[None, :, None],
                                              float("-inf"))
        top = page_scores.topk(budget // PAGE - 1, dim=-1).indices
        chosen = torch.zeros_like(page_scores, dtype=torch.bool).scatter_(-1, top, True)
        chosen |= pages[None, None, :] == own[None, :, None]
        keep = chosen.repeat_interleave(PAGE, dim=-1)[..., :t]
    mask[:, rows] = keep & causal[rows]
    return mask


class SparseAttention:
    """The attention of every layer, for the mode set with ``use``: dense layers attend
    causally, the selection layer too and leaves the selection mask, reuse layers attend
    under it. ``sparse_rows`` is set per sequence before the forward pass."""

    def __init__(self, num_layers: int, kv: Mode | None = None):
        self.selection = bd_config.auto_selection_layers(num_layers)
        self.kv = kv or Mode("bf16")  # what K and V read back as (simulate_kv_quant)
        self.use("dense")

    def use(self, mode: str) -> None:
        self.kind, self.budget = parse_mode(mode)
        self.sparse_rows: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.kept = 0.0  # mean fraction of earlier keys a sparse query keeps, last pass

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        layer = module.layer_idx
        q = query.float()[0]  # [H, T, D]
        k, v = (x[0] for x in quantize_kv(key, value, self.kv))  # [KVH, T, D]
        heads, t, d = q.shape
        groups = heads // k.shape[0]
        scale = scaling if scaling is not None else d**-0.5
        logits = (q @ k.repeat_interleave(groups, 0).transpose(-1, -2)) * scale  # [H, T, T]
        pos = torch.arange(t)
        allowed = (pos[None, :] <= pos[:, None]).expand(heads, t, t)
        sparse = self.kind != "dense" and layer >= self.selection[0]
        if sparse and layer not in self.selection:
            allowed = self.mask.repeat_interleave(groups, 0)
        if sparse and layer in self.selection:
            best = logits.unflatten(0, (-1, groups)).amax(1)  # per KV head: [KVH, T, T]
            self.mask = selection_mask(best, self.kind, self.budget, self.sparse_rows)
            rows = self.sparse_rows & (pos + 1 > self.budget)
            if rows.any():
                self.kept = float(self.mask[:, rows].sum(-1).float().mean() /
                                  (pos[rows].float() + 1).mean())
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out = p @ v.repeat_interleave(groups, 0)  # [H, T, D]
        return out.unsqueeze(0).transpose(1, 2).contiguous(), None


def load_model(model_dir: Path, attention: SparseAttention):
    from transformers import AttentionInterface, LlamaForCausalLM

    name = "bitdecode_sparse_sim"
    AttentionInterface.register(name, attention)
    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.config._attn_implementation = name
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = name
    return model.eval()


@torch.no_grad()
def run_mode(model, attention: SparseAttention, windows, examples, min_seq_len: int) -> dict:
    window_nll, n = [], 0
    for w in windows:
        ids = torch.tensor([w])
        attention.sparse_rows = torch.arange(len(w)) + 1 >= min_seq_len
        logits = model(ids).logits[0, :-1].float()
        window_nll.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:],
                                                                  reduction="sum")))
        n += len(w) - 1
    nll = sum(window_nll)
    right: dict[str, list[int]] = {}
    for ex in examples:
        ids = torch.tensor([ex.tokens])
        # prefill gives the first answer token; the later ones come from decode steps
        attention.sparse_rows = torch.arange(len(ex.tokens)) >= ex.prompt_len
        logits = model(ids).logits[0]
        predicted = logits[ex.prompt_len - 1 : len(ex.tokens) - 1].argmax(-1)
        ok = bool((predicted == ids[0, ex.prompt_len :]).all())
        key = f"{ex.task}@{ex.prompt_len + data.ANSWER_MAX_TOKENS}"  # the grid's context
        right.setdefault(key, []).append(int(ok))
    return dict(ppl=math.exp(nll / n) if n else None, window_nll=window_nll,
                retrieval={k: sum(v) / len(v) for k, v in right.items()},
                trials={k: len(v) for k, v in right.items()},
                kept_fraction=attention.kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(data.MODEL_DIR))
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--trials", type=int, default=4, help="per task, context and depth")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-context", type=int, default=2048)
    ap.add_argument("--kv", default="bf16",
                    help="K and V as the cache reads them back: bf16, or a per-token mode of "
                    "tools/simulate_kv_quant.py (int4, int4-norot, int2-g32, ...); the "
                    "selection then scores the quantized keys, as the kernels do")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kv = Mode.parse(args.kv)
    if kv.own_page or kv.k_per_channel:
        raise SystemExit(f"--kv {args.kv}: only per-token modes (no -kc, no -own)")
    torch.manual_seed(0)
    model_dir = Path(args.model)
    tok = data.load_tokenizer(model_dir)
    held = data.heldout_tokens(model_dir, tok)
    windows = data.ppl_windows(held, args.ppl_context, args.ppl_windows * args.ppl_context)
    windows = windows[: args.ppl_windows]
    tasks = data.RetrievalTasks(tok)
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    examples = [ex for task in data.TASKS
                for ex in data.eval_grid(tasks, held, task, contexts, depths, args.trials)]
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    attention = SparseAttention(num_layers, kv)
    model = load_model(model_dir, attention)
    results = {}
    for mode in args.modes.split(","):
        _, budget = parse_mode(mode)
        attention.use(mode)
        t0 = time.time()
        res = run_mode(model, attention, windows, examples, max(2 * budget, 1))
        res["seconds"] = time.time() - t0
        results[mode] = res
        retrieval = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(res["retrieval"].items()))
        print(f"{mode:<12} ppl@{args.ppl_context} {res['ppl']:.3f}  {retrieval}  "
              f"(kept {100 * res['kept_fraction']:.1f}% of the keys, {res['seconds']:.0f} s)",
              flush=True)
    doc = results_doc("cpu", tool="simulate_sparse", model=str(model_dir), kv=args.kv,
                      num_layers=num_layers,
                      selection_layers=list(bd_config.auto_selection_layers(num_layers)),
                      page=PAGE, settings=vars(args), results=results)
    if args.json:
        write_results(doc, Path(args.json))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
