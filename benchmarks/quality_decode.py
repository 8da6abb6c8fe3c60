"""Perplexity through the decode path, on the shipped model, through vLLM itself.

``quality.py`` scores held-out text with prompt log-probabilities: the whole window goes
through the prefill path, which stays dense in sparse mode (issue #6), so there a sparse
configuration's perplexity equals dense 4-bit's by construction. This script scores the
same windows (``stdlib_llama.ppl_windows``, 2K tokens) one token per step instead: each
window is a request whose prompt is its first token (BOS) and which then generates the
rest of the window, teacher-forced by ``vllm_bitdecode.testing.forced_decode.ForcedTokens``
(each step returns the model's raw log-probability of the forced token). Every predicted
token is then read through the decode kernels and, in sparse mode, from the selection once
the sequence is ``min_seq_len`` long. The prefill perplexity of the same windows is
measured by the same engine, so each configuration reports both; for a dense one they
should agree (a check of the method), for a sparse one the difference is sparse decode's
cost. Each configuration runs in its own subprocess (``quality.run_config``), eager, prefix
caching off; the NLL is kept per window and per 512-position bin of the predicted token,
so that the cost can be read by position and over the clean windows
(``quality.clean_perplexity``'s rule).

    python benchmarks/quality_decode.py                       # DEFAULT_CONFIGS
    python benchmarks/quality_decode.py --configs bf16,int4,int4-sparse256 --quick

Writes benchmarks/results/quality_decode_<gpu>.json (device, date, commit) and
quality_decode_<gpu>.png (perplexity by position against bf16's), after every
configuration; a later run with the same model and settings merges into the file.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402

from vllm_bitdecode import stdlib_llama as data  # noqa: E402
from vllm_bitdecode.provenance import gpu_slug, pyplot, results_doc, write_results  # noqa: E402

DEFAULT_CONFIGS = "bf16,int4,int4-sparse256,int4-sparse256-pages,int2-channel-g32-b128"
CONTEXT = 2048
POSITION_BIN = 512  # the predicted token's position, binned (sparse starts at 512)
PROMPT_TOKENS = 1  # BOS: every later token is generated
# bf16's decode and prefill perplexities differ by the two kernels' rounding only; more
# than this means the forced decode does not score what the prefill scores
METHOD_TOLERANCE_PCT = 0.5


def settings(quick: bool, context: int = CONTEXT) -> dict[str, Any]:
    return {"ppl_tokens": 65536 if quick else 262144, "context": context,
            "position_bin": POSITION_BIN, "prompt_tokens": PROMPT_TOKENS}


# ---- worker (one engine, in its own process) ------------------------------------------------


def decode_bin_nll(window: Sequence[int], output: Any, prompt_tokens: int,
                   position_bin: int) -> list[float]:
    """One window's NLL per ``position_bin`` positions of the predicted token, from a
    forced generation's output (``forced_decode.forced_sampling_params(window[prompt:])``).
    Raises if the generation did not follow the window (the forcing failed)."""
    want = list(window[prompt_tokens:])
    got = list(output.token_ids)
    if got != want:
        same = zip(got, want, strict=False)
        bad = next((i for i, (a, b) in enumerate(same) if a != b), min(len(got), len(want)))
        raise RuntimeError(f"forced generation left the window at step {bad} of {len(want)} "
                           f"({len(got)} tokens generated)")
    steps = output.logprobs
    if steps is None or len(steps) != len(want):
        raise RuntimeError(f"{len(steps or [])} logprob steps for {len(want)} tokens")
    nll = [0.0] * (1 + (len(window) - 1) // position_bin)
    for i, (t, step) in enumerate(zip(want, steps, strict=True)):
        nll[(prompt_tokens + i) // position_bin] -= step[t].logprob
    return nll


def bin_tokens(length: int, prompt_tokens: int, position_bin: int) -> list[int]:
    """How many predicted tokens of a window of ``length`` fall in each position bin."""
    n = [0] * (1 + (length - 1) // position_bin)
    for pos in range(prompt_tokens, length):
        n[pos // position_bin] += 1
    return n


def run_worker(spec: dict[str, Any], llm: Any = None) -> dict[str, Any]:
    """Prefill and forced-decode NLLs of the held-out windows on one engine (``llm``: a
    stand-in for tests; default a vllm.LLM with the ForcedTokens logits processor)."""
    import torch

    from vllm_bitdecode.testing.forced_decode import ForcedTokens, forced_sampling_params

    st = spec["settings"]
    held = data.heldout_tokens(spec["model"], data.load_tokenizer(spec["model"]))
    t0 = time.time()
    if llm is None:
        from vllm import LLM

        llm = LLM(**quality.engine_kwargs(spec), logits_processors=[ForcedTokens])
    res: dict[str, Any] = {
        "engine_start_s": time.time() - t0,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    wins = data.ppl_windows(held, st["context"], st["ppl_tokens"])
    t0 = time.time()
    res["prefill_nll"] = quality.prefill_window_nll(llm, wins)
    res["prefill_s"] = time.time() - t0
    p = st["prompt_tokens"]
    t0 = time.time()
    outs = llm.generate([{"prompt_token_ids": w[:p]} for w in wins],
                        [forced_sampling_params(w[p:]) for w in wins], use_tqdm=False)
    res["decode_s"] = time.time() - t0
    res["decode_bin_nll"] = [decode_bin_nll(w, o.outputs[0], p, st["position_bin"])
                             for w, o in zip(wins, outs, strict=True)]
    res["window"] = len(wins[0])
    del llm
    return res


def worker_main(spec_path: str, out_path: str) -> None:
    import json

    quality.save_result(run_worker(json.loads(Path(spec_path).read_text())), out_path)


# ---- parent -------------------------------------------------------------------------------


def _ppl(nll: float, tokens: int) -> float:
    mean = nll / tokens
    return math.exp(mean) if mean < 700 else math.inf  # exp overflows past ~709


def summarize(name: str, res: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    n = res["window"]
    per_bin = bin_tokens(n, st["prompt_tokens"], st["position_bin"])
    windows = res["decode_bin_nll"]
    bins = [sum(w[b] for w in windows) for b in range(len(per_bin))]
    tokens = len(windows) * (n - 1)
    return {
        "label": quality.CONFIGS[name]["label"],
        "engine": {k: v for k, v in quality.CONFIGS[name].items() if k != "label"},
        "window": n, "windows": len(windows), "bin_tokens": per_bin,
        "ppl_prefill": _ppl(sum(res["prefill_nll"]), tokens),
        "ppl_decode": _ppl(sum(bins), tokens),
        "ppl_decode_by_bin": [_ppl(b, len(windows) * k) for b, k in zip(bins, per_bin,
                                                                          strict=True)],
        "prefill_nll": res["prefill_nll"], "decode_bin_nll": windows,
        "seconds": {k: round(res[k], 1) for k in ("engine_start_s", "prefill_s", "decode_s",
                                                  "wall_s")},
    }


def _prefill_ppl(c: dict[str, Any], keep: list[int]) -> float:
    """Prefill perplexity over the windows ``keep``."""
    return _ppl(sum(c["prefill_nll"][i] for i in keep), len(keep) * (c["window"] - 1))


def _decode_ppl(c: dict[str, Any], keep: list[int], bins: slice = slice(None)) -> float:
    """Decode perplexity over the windows ``keep`` and the position ``bins``."""
    nll = sum(sum(c["decode_bin_nll"][i][bins]) for i in keep)
    return _ppl(nll, len(keep) * sum(c["bin_tokens"][bins]))


def compare(doc: dict[str, Any], spans: Sequence[tuple[int, int]] = ()) -> None:
    """Each configuration's decode perplexity against its own prefill perplexity, against
    bf16's decode perplexity, and (sparse) against dense 4-bit's; over every window and
    over the clean ones (no token of ``spans``), and over the positions sparse decode
    reaches (the bins from ``min_seq_len`` on)."""
    configs = doc["configs"]
    for name, c in configs.items():
        keep = data.clean_windows(c["windows"], c["window"], spans)
        d: dict[str, Any] = {
            "decode_vs_prefill_pct": 100 * (c["ppl_decode"] / c["ppl_prefill"] - 1),
            "clean_windows": len(keep),
            "ppl_decode_clean": _decode_ppl(c, keep),
            "ppl_prefill_clean": _prefill_ppl(c, keep),
        }
        sparse = c["engine"].get("bitdecode", {}).get("sparse")
        first = (sparse or {}).get("min_seq_len", doc["settings"]["position_bin"])
        late = slice(first // doc["settings"]["position_bin"], None)
        d["ppl_decode_clean_from"] = {"position": late.start * doc["settings"]["position_bin"],
                                      "ppl": _decode_ppl(c, keep, late)}
        for base_name, key in (("bf16", "vs_bf16_pct"), ("int4", "vs_int4_pct")):
            base = configs.get(base_name)
            if base is None or name == base_name or (key == "vs_int4_pct" and not sparse):
                continue
            if base["window"] != c["window"] or base["windows"] != c["windows"]:
                d[key] = {"error": "other windows"}
                continue
            d[key] = {
                "decode": 100 * (c["ppl_decode"] / base["ppl_decode"] - 1),
                "decode_clean": 100 * (d["ppl_decode_clean"]
                                       / _decode_ppl(base, keep) - 1),
                "decode_clean_from": 100 * (d["ppl_decode_clean_from"]["ppl"]
                                            / _decode_ppl(base, keep, late)
                                            - 1),
                "prefill_clean": 100 * (d["ppl_prefill_clean"]
                                        / _prefill_ppl(base, keep) - 1),
            }
        c["compared"] = d


def failure(name: str, c: dict[str, Any]) -> str | None:
    """Why configuration ``name``'s summary fails the run, if it does: a perplexity that
    is not finite (a NaN logit still lets the forcing pick its token, so only the scores
    show it), or bf16's decode perplexity off its prefill perplexity (the method check)."""
    if not all(map(math.isfinite, (c["ppl_prefill"], c["ppl_decode"]))):
        return f"perplexity not finite: prefill {c['ppl_prefill']}, decode {c['ppl_decode']}"
    gap = c["compared"]["decode_vs_prefill_pct"]
    if name == "bf16" and abs(gap) > METHOD_TOLERANCE_PCT:
        return (f"bf16 decode perplexity {gap:+.2f}% off its prefill perplexity "
                f"(tolerance {METHOD_TOLERANCE_PCT}%)")
    return None


def plot(doc: dict[str, Any], path: Path) -> str | None:
    plt = pyplot()
    base = doc["configs"].get("bf16")
    if plt is None or base is None or len(doc["configs"]) == 1:
        return None  # nothing beside bf16 to draw
    fig, ax = plt.subplots(figsize=(7, 4))
    b = doc["settings"]["position_bin"]
    for name, c in doc["configs"].items():
        if name == "bf16":
            continue
        xs = [b * (i + 0.5) for i in range(len(c["bin_tokens"]))]
        ys = [100 * (p / q - 1) for p, q in zip(c["ppl_decode_by_bin"],
                                                base["ppl_decode_by_bin"], strict=True)]
        ax.plot(xs, ys, "o-", label=c["label"])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(f"position of the predicted token (bins of {b})")
    ax.set_ylabel("decode perplexity vs bf16 decode (%)")
    ax.set_title(f"{doc['model']}: teacher-forced decode, {doc['device']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_table(doc: dict[str, Any]) -> None:
    print(f"{'config':<24}{'prefill':>10}{'decode':>10}{'dec/pre':>9}{'vs bf16':>9}"
          f"{'vs int4':>9}  (perplexity; the last two: clean windows, decode from "
          "min_seq_len)")
    for name, c in doc["configs"].items():
        d = c.get("compared", {})
        vb = d.get("vs_bf16_pct", {}).get("decode_clean_from")
        vi = d.get("vs_int4_pct", {}).get("decode_clean_from")
        print(f"{name:<24}{c['ppl_prefill']:>10.3f}{c['ppl_decode']:>10.3f}"
              f"{d.get('decode_vs_prefill_pct', float('nan')):>+8.2f}%"
              + (f"{vb:>+8.2f}%" if vb is not None else f"{'':>9}")
              + (f"{vi:>+8.2f}%" if vi is not None else ""))


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma-separated, from {', '.join(quality.CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="64K tokens (33 windows), not 256K")
    ap.add_argument("--context", type=int, default=CONTEXT,
                    help="window length in tokens (decode steps per request: one less)")
    ap.add_argument("--model", default=str(data.MODEL_DIR))
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/quality_decode_<gpu>.json)")
    quality.add_engine_args(ap, timeout=400)
    args = ap.parse_args()
    quality.exit_on_sigterm()
    if args.worker:
        worker_main(*args.worker)
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in quality.CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration(s) {bad}; choose from {list(quality.CONFIGS)}")
    if not 2 * POSITION_BIN <= args.context < quality.MAX_MODEL_LEN:
        raise SystemExit(f"--context must lie in [{2 * POSITION_BIN}, "
                         f"{quality.MAX_MODEL_LEN - 1}]")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} has no config.json: train the model first "
                         "(tools/train_tiny_llama.py)")
    st = settings(args.quick, args.context)
    spans = quality.heldout_near_duplicates(model_dir)
    fp = quality.model_fingerprint(model_dir)
    out_path = Path(args.out) if args.out else None
    doc: dict[str, Any] | None = None
    failures: dict[str, str] = {}
    not_run: list[str] = []
    t_all, slowest = time.time(), 0.0
    for name in names:
        if time.time() - t_all + slowest > args.budget:
            not_run.append(name)
            print(f"== {name}: not started (--budget {args.budget:.0f} s)", flush=True)
            continue
        print(f"== {name}: {quality.CONFIGS[name]['label']}", flush=True)
        res, took = quality.try_config(name, model_dir, st, args,
                                       quality.REF_DIR / "logs_decode", failures, __file__,
                                       deadline=t_all + args.budget)
        slowest = max(slowest, took)
        if res is None:
            continue
        if out_path is None:
            out_path = (data.REPO_ROOT / "benchmarks" / "results"
                        / f"quality_decode_{gpu_slug(res['device'])}.json")
        if doc is None:
            doc = {"model": data.MODEL_NAME, "model_fingerprint": fp, "settings": st,
                   "configs": {}}
            if out_path.exists():
                old = json.loads(out_path.read_text())
                if old.get("model_fingerprint") == fp and old.get("settings") == st:
                    doc["configs"] = old["configs"]
        doc["configs"][name] = summarize(name, res, st)
        doc.update(results_doc(res["device"], failures=failures, not_run=not_run))
        compare(doc, spans)
        write_results(doc, out_path)
        c = doc["configs"][name]
        bad = failure(name, c)
        if bad:
            print(f"   {bad}", flush=True)
            failures[name] = bad
            doc["failures"] = failures
            write_results(doc, out_path)
        print(f"   ppl prefill {c['ppl_prefill']:.3f}, decode {c['ppl_decode']:.3f} "
              f"({res['wall_s']:.0f} s: decode {res['decode_s']:.0f} s)", flush=True)
    if doc is None or out_path is None:
        raise SystemExit(f"no configuration ran: failed {list(failures)}, not run {not_run}")
    doc.update(failures=failures, not_run=not_run)
    write_results(doc, out_path)
    png = plot(doc, out_path.with_suffix(".png"))
    print_table(doc)
    print(f"wrote {out_path}" + (f" {png}" if png else ""))
    if failures or not_run:
        raise SystemExit(f"failed: {list(failures)}; not run: {not_run}")


if __name__ == "__main__":
    main()
