"""What each KV-cache mode costs in quality, on the shipped model, through vLLM itself.

Model: models/stdlib-llama-18m (trained by tools/train_tiny_llama.py). Configurations:
FLASH_ATTN with a bf16 and an fp8 KV cache, BITDECODE at 4 and 2 bits, each with and
without the K rotation. Each one runs in its own subprocess (one engine per process, as
in vllm_bitdecode/testing/engine.py), eager (no torch.compile, no CUDA graphs: start-up
dominates here, and the hooks below need eager), prefix caching off. Measured on every
configuration, with identical token inputs:

- perplexity of the held-out stdlib text (models/.../eval/heldout.txt) in windows of
  2K and 8K tokens (8191: a prompt must be shorter than max_model_len 8192), from
  vLLM's prompt logprobs: the whole window is prefilled through the backend, so every
  token after the first reads quantized K/V;
- greedy pass-key and key/value retrieval accuracy by context length (1K-8K, the
  prompt being 8 tokens shorter) and needle depth (0-100%), haystacks cut from the
  held-out text, all prompts of a configuration in one batch;
- relative error of every layer's attention output against the bf16 engine's on the
  same two prompts (8K and 2K of held-out text): once over the prefill and once over 7
  decode steps whose tokens are forced to be the same in every engine. From layer 2 on
  it includes what earlier layers' errors did to that layer's input.

    python benchmarks/quality.py                    # every configuration of CONFIGS
    python benchmarks/quality.py --quick            # 25 trials per cell, fewer tokens
    python benchmarks/quality.py --configs int2,int2-norot   # merge into the same JSON

Writes benchmarks/results/quality_<gpu>.json (device, date, commit: git or
BITDECODE_COMMIT) and quality_<gpu>_retrieval.png, quality_<gpu>_attention.png, after
every configuration (the JSON) and at the end (the PNGs). A run with --configs keeps
the other configurations' entries measured earlier with the same model files and
settings (from build/quality/, which outlives a command on the lent machine, or from
that JSON); the bf16 attention outputs are kept in build/quality/ too, and the bf16
engine is rerun first when they are missing. Configurations that would likely end
after --budget seconds are not started (listed as not run), so that one call fits a
10-minute command.

Time on an H200 (quality_h200.json, 2026-11-29): 52-61 s per configuration (19-23 s of
engine start, eager), 335 s for all six.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_bitdecode import stdlib_llama as data  # noqa: E402
from vllm_bitdecode.provenance import (  # noqa: E402
    git_commit,
    gpu_slug,
    pyplot,
    results_doc,
    write_results,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "bf16": {"backend": "FLASH_ATTN", "label": "FLASH_ATTN bf16"},
    "fp8": {"backend": "FLASH_ATTN", "kv_cache_dtype": "fp8", "label": "FLASH_ATTN fp8"},
    "int4": {"backend": "BITDECODE", "bitdecode": {"bits": 4, "rotate_k": True},
             "label": "BITDECODE 4-bit, K rotated"},
    "int4-norot": {"backend": "BITDECODE", "bitdecode": {"bits": 4, "rotate_k": False},
                   "label": "BITDECODE 4-bit, no rotation"},
    "int2": {"backend": "BITDECODE", "bitdecode": {"bits": 2, "rotate_k": True},
             "label": "BITDECODE 2-bit, K rotated"},
    "int2-norot": {"backend": "BITDECODE", "bitdecode": {"bits": 2, "rotate_k": False},
                   "label": "BITDECODE 2-bit, no rotation"},
    # sparse decode (issue #6): only generated tokens decode sparsely, so it shows in
    # retrieval; perplexity (prompt log-probs, prefill) equals int4's by construction
    "int4-sparse256": {"backend": "BITDECODE",
                       "bitdecode": {"bits": 4, "sparse": {"enabled": True, "token_budget": 256,
                                                           "granularity": "token",
                                                           "min_seq_len": 512}},
                       "label": "BITDECODE 4-bit, sparse k=256"},
    "int4-sparse256-pages": {"backend": "BITDECODE",
                             "bitdecode": {"bits": 4, "sparse": {
                                 "enabled": True, "token_budget": 256, "min_seq_len": 512,
                                 "granularity": "page"}},
                             "label": "BITDECODE 4-bit, sparse 16 pages of 16"},
    # per-channel K (issue #7): K per channel over 16-token groups, the newest page's K and
    # V exact
    "int4-channel": {"backend": "BITDECODE", "bitdecode": {"bits": 4, "k_mode": "channel"},
                     "label": "BITDECODE 4-bit, K per channel"},
    # the same with the K params in e4m3 (k_params="fp8", 16 B per token and head fewer)
    "int4-channel-fp8": {"backend": "BITDECODE",
                         "bitdecode": {"bits": 4, "k_mode": "channel", "k_params": "fp8"},
                         "label": "BITDECODE 4-bit, K per channel, fp8 params"},
    "int2-channel": {"backend": "BITDECODE", "bitdecode": {"bits": 2, "k_mode": "channel"},
                     "label": "BITDECODE 2-bit, K per channel"},
    # the CPU simulation's modes for issue #5's targets (docs/per-channel-k-design.md, 2b):
    # 4-bit with V in groups of 32 (+0.2-0.4%; H200: +0.3%), 2-bit also with 64-token pages
    # (+6.3-7.7%; H200: +5.9% / +8.04%) or 128-token pages (simulated +4.9-6.1%)
    "int4-channel-g32": {"backend": "BITDECODE",
                         "bitdecode": {"bits": 4, "k_mode": "channel", "group_size": 32},
                         "label": "BITDECODE 4-bit, K per channel, V group 32"},
    "int2-channel-g32-b64": {"backend": "BITDECODE", "block_size": 64,
                             "bitdecode": {"bits": 2, "k_mode": "channel", "group_size": 32},
                             "label": "BITDECODE 2-bit, K per channel, V group 32, block 64"},
    "int2-channel-g32-b128": {"backend": "BITDECODE", "block_size": 128,
                              "bitdecode": {"bits": 2, "k_mode": "channel", "group_size": 32},
                              "label": "BITDECODE 2-bit, K per channel, V group 32, block 128"},
    # the same with K's scale and zero point in e4m3 (96 B per token and head, not 112;
    # simulated +5.6% against +4.9% at 2K, quality_sim_k_params_fp8_2k_cpu.json)
    "int2-channel-g32-b128-fp8": {
        "backend": "BITDECODE", "block_size": 128,
        "bitdecode": {"bits": 2, "k_mode": "channel", "group_size": 32, "k_params": "fp8"},
        "label": "BITDECODE 2-bit, K per channel, V group 32, block 128, fp8 params"},
}
# Issue #5's targets: perplexity increase over bf16 (%) and retrieval points below bf16.
TARGETS = {"int4": (1.5, 1.0), "int4-norot": (1.5, 1.0), "int2": (8.0, 5.0),
           "int2-norot": (8.0, 5.0), "int4-channel": (1.5, 1.0), "int2-channel": (8.0, 5.0),
           "int4-channel-fp8": (1.5, 1.0),
           "int4-channel-g32": (1.5, 1.0), "int2-channel-g32-b64": (8.0, 5.0),
           "int2-channel-g32-b128": (8.0, 5.0), "int2-channel-g32-b128-fp8": (8.0, 5.0)}

MAX_MODEL_LEN = data.MAX_CONTEXT
PPL_CONTEXTS = (2048, 8192)
RETRIEVAL_CONTEXTS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ATTN_PROMPT_LENS = (8184, 2040)
ATTN_DECODE_TOKENS = 8
ATTN_PREFILL_STRIDE = 8
REF_DIR = data.REPO_ROOT / "build" / "quality"


def settings(quick: bool) -> dict[str, Any]:
    return {
        "trials": 25 if quick else 200,
        "ppl_tokens": 65536 if quick else 262144,
        "ppl_contexts": list(PPL_CONTEXTS),
        "retrieval_contexts": list(RETRIEVAL_CONTEXTS),
        "depths": list(DEPTHS),
        "tasks": list(data.TASKS),
        "max_model_len": MAX_MODEL_LEN,
        "attn_prompt_lens": list(ATTN_PROMPT_LENS),
        "attn_decode_tokens": ATTN_DECODE_TOKENS,
    }


# ---- worker (one engine, in its own process) ------------------------------------------------


def attention_prompts(stream: Any, lens: list[int]) -> tuple[list[list[int]], list[int]]:
    """Held-out prompts of these lengths and, for each, the text token that follows it
    (forced at every decode step)."""
    prompts, nxt = [], []
    start = 0
    for n in lens:
        body = stream[start:start + n - 1].tolist()
        prompts.append([data.BOS_ID] + body)
        nxt.append(int(stream[start + n - 1]))
        start += n
    return prompts, nxt


def _install_capture(model: Any) -> int:
    """Forward hooks on every layer's attention: keep (layer, rows, output rows).

    Prefill outputs keep every ATTN_PREFILL_STRIDE-th token (the same in all engines)."""
    import torch

    store: list[tuple[int, int, torch.Tensor]] = []
    handles = []

    def make(i: int):
        def hook(mod, args, out):
            o = out[0] if isinstance(out, tuple) else out
            o = o.detach().reshape(o.shape[0], -1)
            n = o.shape[0]
            rows = o[::ATTN_PREFILL_STRIDE] if n > 64 else o
            store.append((i, n, rows.to(torch.bfloat16).cpu()))
        return hook

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.attn.register_forward_hook(make(i)))
    model._bitdecode_quality_capture = (store, handles)
    return len(handles)


def _remove_capture(model: Any) -> list[tuple[int, int, Any]]:
    store, handles = model._bitdecode_quality_capture
    for h in handles:
        h.remove()
    del model._bitdecode_quality_capture
    return store


def capture_attention(llm: Any, prompts: list[list[int]], nxt: list[int],
                      decode_tokens: int) -> list[tuple[int, int, Any]]:
    """Every layer's attention outputs (_install_capture) over one generate of ``prompts``
    followed by ``decode_tokens`` steps, each prompt forced to its ``nxt`` token."""
    from vllm import SamplingParams

    assert llm.apply_model(_install_capture)[0] > 0
    params = [SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True,
                             allowed_token_ids=[t]) for t in nxt]
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm.apply_model(_remove_capture)[0]


def prefill_window_nll(llm: Any, wins: list[list[int]]) -> list[float]:
    """Each window's NLL of its tokens after the first, from vLLM's prompt logprobs (the
    whole window prefilled in one request)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in wins], sp, use_tqdm=False)
    nll = []
    for w, o in zip(wins, outs, strict=True):
        plp = o.prompt_logprobs
        assert plp is not None and len(plp) == len(w), (len(plp or []), len(w))
        nll.append(-sum(plp[i][w[i]].logprob for i in range(1, len(w))))
    return nll


def engine_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        model=spec["model"], attention_backend=spec["backend"], enforce_eager=True,
        skip_tokenizer_init=True, dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
        gpu_memory_utilization=spec["gpu_memory_utilization"], max_num_seqs=256,
        max_num_batched_tokens=32768, enable_prefix_caching=False, seed=0,
    )
    if spec["backend"] == "BITDECODE":
        kw["additional_config"] = {"bitdecode": spec["bitdecode"]}
    if "kv_cache_dtype" in spec:
        kw["kv_cache_dtype"] = spec["kv_cache_dtype"]
    if "block_size" in spec:
        kw["block_size"] = spec["block_size"]
    return kw


def run_worker(spec: dict[str, Any], llm: Any = None) -> dict[str, Any]:
    """All measurements on one engine (``llm``: a stand-in for tests; default a vllm.LLM)."""
    import torch
    from vllm import SamplingParams

    model_dir = spec["model"]
    st = spec["settings"]
    tok = data.load_tokenizer(model_dir)
    held = data.heldout_tokens(model_dir, tok)
    tasks = data.RetrievalTasks(tok)
    t0 = time.time()
    if llm is None:
        from vllm import LLM

        llm = LLM(**engine_kwargs(spec))
    res: dict[str, Any] = {
        "engine_start_s": time.time() - t0,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    # attention outputs per layer, prefill + forced decode steps
    t0 = time.time()
    prompts, nxt = attention_prompts(held, st["attn_prompt_lens"])
    res["attention_capture"] = capture_attention(llm, prompts, nxt, st["attn_decode_tokens"])
    res["attention_s"] = time.time() - t0

    # perplexity from prompt logprobs
    t0 = time.time()
    res["perplexity"] = {}
    for ctx in st["ppl_contexts"]:
        wins = data.ppl_windows(held, min(ctx, MAX_MODEL_LEN - 1), st["ppl_tokens"])
        nll = prefill_window_nll(llm, wins)
        n = sum(len(w) - 1 for w in wins)
        res["perplexity"][str(ctx)] = {"window": len(wins[0]), "windows": len(wins),
                                       "tokens": n, "ppl": math.exp(sum(nll) / n),
                                       "window_nll": nll}
    res["perplexity_s"] = time.time() - t0

    # retrieval, all cells of both tasks in one batch
    t0 = time.time()
    examples = []
    for task in st["tasks"]:
        examples += data.eval_grid(tasks, held, task, st["retrieval_contexts"], st["depths"],
                                   st["trials"], max_new_tokens=data.ANSWER_MAX_TOKENS)
    sp = SamplingParams(max_tokens=data.ANSWER_MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": e.prompt} for e in examples], sp, use_tqdm=False)
    cells: dict[str, dict[str, Any]] = {}
    for e, o in zip(examples, outs, strict=True):
        text = tok.decode(list(o.outputs[0].token_ids))
        ok = data.answer_correct(text, e.answer)
        ctx = e.prompt_len + data.ANSWER_MAX_TOKENS
        cell = cells.setdefault(f"{e.task}/{ctx}/{e.depth:.2f}", {"right": 0, "n": 0, "bits": ""})
        cell["right"] += ok
        cell["n"] += 1
        cell["bits"] += "1" if ok else "0"
    res["retrieval"] = cells
    res["retrieval_prompts"] = len(examples)
    res["retrieval_prompt_tokens"] = sum(e.prompt_len for e in examples)
    res["retrieval_s"] = time.time() - t0
    del llm
    return res


def save_result(res: dict[str, Any], out_path: str) -> None:
    """The worker's result, whole or not at all: the parent reads it even when the
    worker times out afterwards (in the engine's shutdown)."""
    import torch

    torch.save(res, out_path + ".part")
    os.replace(out_path + ".part", out_path)
    print(f"saved {out_path}", flush=True)


def worker_main(spec_path: str, out_path: str) -> None:
    save_result(run_worker(json.loads(Path(spec_path).read_text())), out_path)


# ---- parent -------------------------------------------------------------------------------


def worker_spec(name: str, model_dir: Path, st: dict[str, Any], gpu_util: float
                ) -> dict[str, Any]:
    """What run_worker reads for configuration ``name`` (CONFIGS)."""
    return {"model": str(model_dir), "settings": st, "gpu_memory_utilization": gpu_util,
            **{k: v for k, v in CONFIGS[name].items() if k != "label"}}


def run_in_own_group(cmd: list[str], timeout: float, **popen_kw: Any) -> int:
    """``cmd``'s exit code, run in a process group of its own that is killed whole when
    it ends or times out (``subprocess.TimeoutExpired``, raised after the kill):
    subprocess.run's timeout kills only the direct child, and a process it started (a
    compile worker, a second engine process) would live on holding GPU memory that the
    next configuration's engine then finds taken."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent,
                            **popen_kw)
    try:
        return proc.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# prctl, looked up here: the forked child calls it before exec and imports nothing
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the worker, before it starts: the kernel kills it when the harness dies, by
    SIGKILL too (its own session keeps it out of a timeout's signal to the harness's).
    Only the worker: what it starts dies with it only where run_in_own_group's cleanup
    runs."""
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def exit_on_sigterm() -> None:
    """SIGTERM (a step's `timeout`) ends the harness through SystemExit, so that
    run_in_own_group's cleanup kills the worker's group, not by the default action, which
    skips it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_config(name: str, model_dir: Path, st: dict[str, Any], gpu_util: float,
               timeout: float, log_dir: Path, script: str = __file__) -> dict[str, Any]:
    """Configuration ``name`` measured by ``script --worker`` (this file's run_worker, or
    another script's with the same command line) in a subprocess of its own."""
    import torch

    spec = worker_spec(name, model_dir, st, gpu_util)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.pt"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONUNBUFFERED="1")
        t0 = time.time()
        # straight into the log, so that a worker killed by the timeout leaves its output
        with log_path.open("wb") as log_file:
            try:
                rc = run_in_own_group([sys.executable, script, "--worker", str(spec_path),
                                       str(out_path)], timeout, stdout=log_file,
                                      stderr=subprocess.STDOUT, env=env)
            except subprocess.TimeoutExpired:
                if not out_path.exists():
                    raise
                rc = None  # measured and saved; the engine's shutdown ran out of time
        if not out_path.exists():
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"{name}: engine failed (exit {rc}):\n{log[-4000:]}")
        if rc != 0:  # saved, then failed or hung in the engine's shutdown: the result counts
            print(f"{name}: the worker saved its result, then "
                  f"{'timed out' if rc is None else f'exited {rc}'} (log: {log_path})",
                  flush=True)
        res = torch.load(out_path, weights_only=False)
    res["wall_s"] = time.time() - t0
    return res


def try_config(name: str, model_dir: Path, st: dict[str, Any], args: argparse.Namespace,
               log_dir: Path, failures: dict[str, str], script: str = __file__,
               deadline: float | None = None) -> tuple[dict[str, Any] | None, float]:
    """run_config with ``args``' GPU share and timeout, the timeout cut to end by
    ``deadline`` (a time.time(): the run's --budget); a failure (the engine's error or
    the timeout) is printed and recorded in ``failures``, not raised. Also the seconds it
    took, for the budget's estimate: the timeout for one that timed out, 0 for another
    failure."""
    timeout = args.timeout
    if deadline is not None:
        timeout = max(1.0, min(timeout, deadline - time.time()))
    try:
        res = run_config(name, model_dir, st, args.gpu_memory_utilization, timeout,
                         log_dir, script=script)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(str(e)[-3000:], flush=True)
        failures[name] = str(e)[-3000:]
        return None, timeout if isinstance(e, subprocess.TimeoutExpired) else 0.0
    return res, res["wall_s"]


def attention_errors(ours: list, ref: list) -> dict[str, Any]:
    """Per layer ||a - b|| / ||b||: over the prefill rows, and over all decode steps; and
    ``nonfinite_rows``, per layer, our captured rows holding a NaN or an infinity (an
    engine's output should have none: such an error is NaN, and the run fails)."""
    import torch

    if len(ours) != len(ref):
        return {"error": f"{len(ours)} captured outputs vs {len(ref)} in bf16"}
    layers = 1 + max(i for i, _, _ in ref)
    num = {"prefill": [0.0] * layers, "decode": [0.0] * layers}
    den = {"prefill": [0.0] * layers, "decode": [0.0] * layers}
    bad = {"prefill": [0] * layers, "decode": [0] * layers}
    for k, ((i, n, a), (j, m, b)) in enumerate(zip(ours, ref, strict=True)):
        if i != j or n != m or a.shape != b.shape:
            return {"error": f"capture {k}: layer {i} rows {n} vs layer {j} rows {m}"}
        kind = "prefill" if n > 64 else "decode"  # as the hook decided on striding
        a, b = a.float(), b.float()
        bad[kind][i] += int((~torch.isfinite(a)).any(dim=1).sum())
        num[kind][i] += float((a - b).pow(2).sum())
        den[kind][i] += float(b.pow(2).sum())
    out: dict[str, Any] = {}
    for kind in ("prefill", "decode"):
        out[kind] = [math.sqrt(x / y) if y > 0 else None
                     for x, y in zip(num[kind], den[kind], strict=True)]
    out["decode_steps"] = sum(1 for _, n, _ in ref if n <= 64) // layers
    out["nonfinite_rows"] = bad
    return out


def nonfinite_attention(summ: dict[str, Any]) -> str | None:
    """What add_result's capture says of non-finite outputs, as a failure message."""
    bad = summ["attention_rel_err"].get("nonfinite_rows")
    if not bad or not any(sum(v) for v in bad.values()):
        return None
    return ("NaN or infinite attention outputs in the capture (rows per layer): "
            + "; ".join(f"{kind} {rows}" for kind, rows in bad.items() if sum(rows)))


def summarize(name: str, res: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    retrieval: dict[str, Any] = {}
    for task in st["tasks"]:
        grid = {}
        for ctx in st["retrieval_contexts"]:
            grid[str(ctx)] = {f"{d:.2f}": res["retrieval"][f"{task}/{ctx}/{d:.2f}"]["right"]
                              / res["retrieval"][f"{task}/{ctx}/{d:.2f}"]["n"]
                              for d in st["depths"]}
        cells = [v for row in grid.values() for v in row.values()]
        retrieval[task] = {"accuracy": grid, "mean": sum(cells) / len(cells),
                           "by_context": {c: sum(r.values()) / len(r) for c, r in grid.items()}}
    return {
        "label": CONFIGS[name]["label"],
        "engine": {k: v for k, v in CONFIGS[name].items() if k != "label"},
        "perplexity": {c: {k: v for k, v in p.items() if k != "window_nll"}
                       for c, p in res["perplexity"].items()},
        "window_nll": {c: p["window_nll"] for c, p in res["perplexity"].items()},
        "retrieval": retrieval,
        "retrieval_bits": {k: v["bits"] for k, v in res["retrieval"].items()},
        "seconds": {k: round(res[k], 1) for k in ("engine_start_s", "attention_s",
                                                  "perplexity_s", "retrieval_s", "wall_s")},
        "retrieval_prompt_tokens": res["retrieval_prompt_tokens"],
    }


def add_result(doc: dict[str, Any], name: str, res: dict[str, Any],
               ref_capture: list | None) -> dict[str, Any]:
    """Summarize one worker's result into ``doc`` (attention error against ``ref_capture``,
    the bf16 engine's outputs)."""
    summ = summarize(name, res, doc["settings"])
    summ["attention_rel_err"] = (attention_errors(res["attention_capture"], ref_capture)
                                 if ref_capture else {"error": "no bf16 reference"})
    doc["configs"][name] = summ
    return summ


def clean_perplexity(c: dict[str, Any], spans: Sequence[tuple[int, int]]) -> dict[str, float]:
    """A configuration's perplexity per context over the windows that hold none of
    ``spans`` (held-out text the training split nearly holds), from its window NLLs."""
    out = {}
    for ctx, p in c["perplexity"].items():
        nll = c["window_nll"][ctx]
        keep = data.clean_windows(len(nll), p["window"], spans)
        out[ctx] = math.exp(sum(nll[i] for i in keep) / (len(keep) * (p["window"] - 1)))
    return out


def paired_points(bits: dict[str, str], base_bits: dict[str, str], task: str,
                  below_depth: float | None = None) -> dict[str, Any]:
    """``task``'s accuracy of one configuration against another on the same prompts, in
    points: the mean of the paired differences and its 95% interval (normal approximation;
    n is thousands of prompts), over every cell, or with ``below_depth`` over the cells
    whose needle sits less deep (depth 1.0 puts a needle in the newest page, which the
    per-channel settings keep exact)."""
    diffs: list[int] = []
    for cell, b in bits.items():
        t, _, depth = cell.split("/")
        if t != task or (below_depth is not None and float(depth) >= below_depth):
            continue
        diffs += [int(x) - int(y) for x, y in zip(b, base_bits[cell], strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": 100 * mean, "ci95": [100 * (mean - half), 100 * (mean + half)], "n": n}


def heldout_near_duplicates(model_dir: Path) -> list[tuple[int, int]]:
    """data.near_duplicate_spans of the model's held-out text; none for a model without
    the list of its held-out files."""
    if not (model_dir / "eval" / "heldout_files.json").exists():
        return []
    return data.near_duplicate_spans(model_dir)


def compare(doc: dict[str, Any], spans: Sequence[tuple[int, int]] = ()) -> None:
    """Fill each configuration's differences against bf16 and the issue's targets (and a
    sparse configuration's against dense 4-bit, the same pages read whole).

    Perplexity: over every window, and over the windows that hold none of ``spans``
    (``perplexity_pct_clean``; data.near_duplicate_spans: held-out files the training
    split nearly holds under other paths, whose windows score near 1); the target is
    judged on the clean windows. Retrieval: the paired mean difference with its 95%
    interval, and the mean over needles above depth 1.0; the target is judged on the
    mean. The worst single cell is kept for reference only: at 200 prompts a cell
    resolves 0.5 points and the minimum of 20 noisy cells is biased low."""
    base = doc["configs"].get("bf16")
    if not base:
        return
    clean = {name: clean_perplexity(c, spans) for name, c in doc["configs"].items()}
    for name, c in doc["configs"].items():
        d: dict[str, Any] = {"perplexity_pct": {}, "perplexity_pct_clean": {},
                             "retrieval_points": {}}
        for ctx, p in c["perplexity"].items():
            d["perplexity_pct"][ctx] = 100 * (p["ppl"] / base["perplexity"][ctx]["ppl"] - 1)
            d["perplexity_pct_clean"][ctx] = 100 * (clean[name][ctx] / clean["bf16"][ctx] - 1)
        for task, r in c["retrieval"].items():
            paired = paired_points(c["retrieval_bits"], base["retrieval_bits"], task)
            d["retrieval_points"][task] = {
                "mean": paired["mean"], "ci95": paired["ci95"],
                "mean_below_depth_1": paired_points(c["retrieval_bits"],
                                                    base["retrieval_bits"], task, 1.0)["mean"],
                "worst_cell": min(100 * (r["accuracy"][ctx][dp]
                                         - base["retrieval"][task]["accuracy"][ctx][dp])
                                  for ctx in r["accuracy"] for dp in r["accuracy"][ctx]),
            }
        if name in TARGETS:
            ppl_max, pts_max = TARGETS[name]
            worst_ppl = max(d["perplexity_pct_clean"].values())
            worst_pts = min(v["mean"] for v in d["retrieval_points"].values())
            d["targets"] = {"perplexity_pct_max": ppl_max, "retrieval_points_max": pts_max,
                            "perplexity_ok": worst_ppl <= ppl_max,
                            "retrieval_ok": worst_pts >= -pts_max}
        c["vs_bf16"] = d
        dense = doc["configs"].get("int4")
        if "sparse" in name and dense:
            c["vs_int4"] = {"retrieval_points": {
                task: paired_points(c["retrieval_bits"], dense["retrieval_bits"], task)
                for task in c["retrieval"]}}


def _ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot(doc: dict[str, Any], stem: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        print("matplotlib not importable: no PNGs")
        return []
    names = [n for n in CONFIGS if n in doc["configs"]]
    st = doc["settings"]
    written = []
    fig, axes = plt.subplots(len(names), len(st["tasks"]),
                             figsize=(4.2 * len(st["tasks"]), 2.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, task in enumerate(st["tasks"]):
            ax = axes[r][c]
            acc = doc["configs"][name]["retrieval"][task]["accuracy"]
            ctxs = list(acc)
            deps = list(acc[ctxs[0]])
            grid = [[acc[cx][dp] for cx in ctxs] for dp in deps]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(ctxs)), [_ctx_label(int(cx)) for cx in ctxs], fontsize=7)
            ax.set_yticks(range(len(deps)), [f"{100 * float(dp):.0f}%" for dp in deps],
                          fontsize=7)
            ax.set_title(f"{doc['configs'][name]['label']}: {task}", fontsize=8)
            if c == 0:
                ax.set_ylabel("needle depth", fontsize=7)
            if r == len(names) - 1:
                ax.set_xlabel("context", fontsize=7)
    fig.suptitle(f"{doc['model']}: greedy retrieval accuracy (%), {st['trials']} trials per "
                 f"cell, {doc['device']}", fontsize=9)
    fig.tight_layout()
    p = stem.with_name(stem.name + "_retrieval.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        err = doc["configs"][name].get("attention_rel_err")
        if not err or "error" in err or name == "bf16":
            continue
        for ax, kind in zip(axes, ("prefill", "decode"), strict=True):
            ys = err[kind]
            ax.plot(range(len(ys)), ys, "o-", label=doc["configs"][name]["label"])
    for ax, kind in zip(axes, ("prefill", "decode"), strict=True):
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error of the attention output vs bf16")
        ax.set_title(f"{kind} ({'8K + 2K prompts' if kind == 'prefill' else 'forced steps'})",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = stem.with_name(stem.name + "_attention.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    return written


def print_table(doc: dict[str, Any]) -> None:
    st = doc["settings"]
    head = f"{'config':<12}" + "".join(f"{'ppl@' + str(c):>12}" for c in st["ppl_contexts"])
    head += "".join(f"{t + '@' + _ctx_label(c):>11}" for t in st["tasks"]
                    for c in st["retrieval_contexts"])
    print(head)
    for name in CONFIGS:
        c = doc["configs"].get(name)
        if not c:
            continue
        line = f"{name:<12}"
        for ctx in st["ppl_contexts"]:
            p = c["perplexity"][str(ctx)]["ppl"]
            pct = c.get("vs_bf16", {}).get("perplexity_pct", {}).get(str(ctx))
            line += f"{p:>7.3f}" + (f"{pct:+5.1f}%" if pct is not None else " " * 6)[:6]
        for task in st["tasks"]:
            for ctx in st["retrieval_contexts"]:
                line += f"{100 * c['retrieval'][task]['by_context'][str(ctx)]:>11.1f}"
        t = c.get("vs_bf16", {}).get("targets")
        if t:
            line += "  targets: " + ("ppl ok" if t["perplexity_ok"] else "PPL MISSED") + ", " + (
                "retrieval ok" if t["retrieval_ok"] else "RETRIEVAL MISSED")
        print(line)


def model_fingerprint(model_dir: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(data.file_sha256(f).encode())
    h.update(data.file_sha256(model_dir / data.HELDOUT_RELPATH).encode())
    return h.hexdigest()[:16]


def add_engine_args(ap: argparse.ArgumentParser, timeout: float) -> None:
    """The options of a script that runs one engine per configuration (try_config):
    its GPU share, time limits and the worker's hidden entry point."""
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds per configuration")
    ap.add_argument("--budget", type=float, default=540,
                    help="start no configuration that would likely end after this many "
                    "seconds (the slowest one so far is the estimate), and stop one still "
                    "running then; the rest are listed as not run")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="25 trials per cell, 64K ppl tokens")
    ap.add_argument("--model", default=str(data.MODEL_DIR))
    ap.add_argument("--out", default=None, help="JSON path (default "
                    "benchmarks/results/quality_<gpu>.json); the PNGs go beside it")
    ap.add_argument("--copy-to", default=None, help="also copy the JSON and PNGs here")
    add_engine_args(ap, timeout=360)
    ap.add_argument("--recompare", nargs="+", metavar="JSON",
                    help="recompute the comparisons of results files already written (their "
                    "stored window NLLs and per-prompt answers) with this version's rules, "
                    "in place; runs no engine")
    args = ap.parse_args()
    exit_on_sigterm()
    if args.worker:
        worker_main(*args.worker)
        return
    if args.recompare:
        spans = heldout_near_duplicates(Path(args.model))  # tokenizes the held-out text
        for path in map(Path, args.recompare):
            doc = json.loads(path.read_text())
            compare(doc, spans)
            doc["compared_by"] = {"commit": git_commit(),
                                  "date": datetime.date.today().isoformat()}
            write_results(doc, path)
            print_table(doc)
        return

    import torch

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration(s) {bad}; choose from {list(CONFIGS)}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} has no config.json: train the model first "
                         "(tools/train_tiny_llama.py)")
    st = settings(args.quick)
    spans = heldout_near_duplicates(model_dir)
    fp = model_fingerprint(model_dir)
    mode = "quick" if args.quick else "full"
    ref_path = REF_DIR / f"attn_bf16_{fp}_{mode}.pt"
    if "bf16" not in names and not ref_path.exists():
        names.insert(0, "bf16")
        print("bf16 reference outputs missing: running bf16 first", flush=True)
    names.sort(key=lambda n: list(CONFIGS).index(n))

    doc: dict[str, Any] | None = None
    out_path: Path | None = Path(args.out) if args.out else None
    # configurations measured by earlier runs (this machine, same model and settings):
    # build/ survives between commands on the lent machine, benchmarks/results/ may not
    state_path = REF_DIR / f"state_{fp}_{mode}.json"
    t_all = time.time()
    ref_capture = torch.load(ref_path, weights_only=False) if ref_path.exists() else None
    failures: dict[str, str] = {}
    not_run: list[str] = []
    slowest = 0.0
    for name in names:
        if time.time() - t_all + slowest > args.budget:
            not_run.append(name)
            print(f"== {name}: not started, it would likely end after --budget "
                  f"{args.budget:.0f} s", flush=True)
            continue
        print(f"== {name}: {CONFIGS[name]['label']}", flush=True)
        res, took = try_config(name, model_dir, st, args, REF_DIR / "logs", failures,
                               deadline=t_all + args.budget)
        slowest = max(slowest, took)
        if res is None:
            continue
        if out_path is None:
            slug = gpu_slug(res["device"])
            out_path = data.REPO_ROOT / "benchmarks" / "results" / f"quality_{slug}.json"
        if doc is None:
            doc = {"model": data.MODEL_NAME, "model_fingerprint": fp, "settings": st,
                   "configs": {}}
            for old_path in (state_path, out_path):
                if old_path.exists():
                    old = json.loads(old_path.read_text())
                    if old.get("model_fingerprint") == fp and old.get("settings") == st:
                        doc["configs"] = old["configs"]
                        break
        if name == "bf16":
            REF_DIR.mkdir(parents=True, exist_ok=True)
            torch.save(res["attention_capture"], ref_path)
            ref_capture = res["attention_capture"]
        summ = add_result(doc, name, res, ref_capture)
        bad = nonfinite_attention(summ)
        if bad:
            print(f"   {bad}", flush=True)
            failures[name] = bad
        print(f"   done in {res['wall_s']:.0f} s (engine start {res['engine_start_s']:.0f} s, "
              f"attention {res['attention_s']:.0f} s, ppl {res['perplexity_s']:.0f} s, "
              f"retrieval {res['retrieval_s']:.0f} s for "
              f"{res['retrieval_prompt_tokens'] / 1e6:.1f}M prompt tokens)", flush=True)
        for task, r in summ["retrieval"].items():
            print(f"   {task}: " + ", ".join(f"{c}: {100 * v:.1f}%"
                                            for c, v in r["by_context"].items())
                  + "; ppl " + ", ".join(f"{c}: {p['ppl']:.3f}"
                                         for c, p in summ["perplexity"].items()), flush=True)
        doc.update(results_doc(res["device"], failures=failures, not_run=not_run,
                               seconds_this_run=round(time.time() - t_all, 1)))
        compare(doc, spans)
        write(doc, out_path, state_path)  # after every configuration: a cut-off run keeps them
    if doc is None or out_path is None:
        raise SystemExit(f"no configuration ran: failed {list(failures)}, not run {not_run}")
    doc.update(failures=failures, not_run=not_run, seconds_this_run=round(time.time() - t_all, 1))
    write(doc, out_path, state_path)
    pngs = plot(doc, out_path.with_suffix(""))
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for f in [str(out_path), *pngs]:
            shutil.copy2(f, dest / Path(f).name)
    print_table(doc)
    print(f"wrote {out_path} {' '.join(pngs)} ({time.time() - t_all:.0f} s)")
    if failures or not_run:
        raise SystemExit(f"failed: {list(failures)}; not run: {not_run}")


def write(doc: dict[str, Any], out_path: Path, state_path: Path) -> None:
    for p in (out_path, state_path):
        write_results(doc, p)


if __name__ == "__main__":
    main()
