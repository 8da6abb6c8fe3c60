"""Does a BITDECODE configuration's attention read memory it did not write?

Runs quality.py's attention capture (the shipped model, prompts of 8184 and 2040 tokens,
8 forced decode steps) four times on one engine: twice as it starts, once more after
filling the prefill workspace with NaN, and once with the long prompt alone. For every
layer it reports the captured rows holding NaN and the relative difference from the
second run. A configuration that reads only what it wrote gives the same outputs in
every run, poisoned or not; one that reads stale rows differs between the first and
second run or turns NaN after the poisoning.

Written for the NaN prefill errors quality.py gave 2-bit K per channel at block 128 on
an H200 on 2026-12-03 (see kc_prefill.KCPrefillPlan.scratch_pad_rows). GPU only:

    python tools/capture_stale_rows.py int2-channel-g32-b128 [more quality.py configs]
    OUT=<dir> ...      # capture_stale_rows.json and the engine logs go there (default /tmp)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import quality  # noqa: E402

from vllm_bitdecode.testing.engine_probes import poison_prefill_workspaces  # noqa: E402

VARIANTS = {"first": [0, 1], "second": [0, 1], "poisoned": [0, 1], "long_only": [0]}


def worker(name: str, out: Path) -> None:
    """One engine of config ``name``: the capture in every variant, saved to ``out``."""
    import torch
    from vllm import LLM

    st = quality.settings(quick=True)
    spec = quality.worker_spec(name, quality.data.MODEL_DIR, st, gpu_util=0.3)
    llm = LLM(**quality.engine_kwargs(spec))
    tok = quality.data.load_tokenizer(spec["model"])
    held = quality.data.heldout_tokens(spec["model"], tok)
    prompts, nxt = quality.attention_prompts(held, st["attn_prompt_lens"])
    runs = []
    for variant, chosen in VARIANTS.items():
        if variant == "poisoned":
            llm.apply_model(poison_prefill_workspaces)
        runs.append((variant, quality.capture_attention(
            llm, [prompts[i] for i in chosen], [nxt[i] for i in chosen],
            st["attn_decode_tokens"])))
    torch.save(runs, out)


def compare(runs: list[tuple[str, list]]) -> list[dict[str, Any]]:
    """Per variant and capture: NaN rows, and the relative difference from the second
    run's capture of the same index (where the shapes agree)."""
    second = dict(runs)["second"]
    report = []
    for variant, captures in runs:
        rows = []
        for k, (layer, n, a) in enumerate(captures):
            a = a.float()
            nan = a.isnan().any(dim=1)
            diff = None
            if k < len(second) and second[k][2].shape == a.shape:
                b = second[k][2].float()
                ok = ~nan & ~b.isnan().any(dim=1)
                if ok.any():
                    diff = float((a[ok] - b[ok]).norm() / b[ok].norm())
            idx = nan.nonzero().flatten().tolist()
            rows.append({"layer": layer, "rows": n, "nan_rows": len(idx),
                         "first_nan": idx[:6], "last_nan": idx[-3:], "rel_diff": diff})
        report.append({"variant": variant, "captures": rows})
    return report


def main(names: list[str]) -> None:
    import torch

    out_dir = Path(os.environ.get("OUT", "/tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in names:
        saved = out_dir / f"capture_{name}.pt"
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        r = subprocess.run([sys.executable, __file__, "--worker", name, str(saved)], env=env,
                           capture_output=True, text=True, timeout=600)
        (out_dir / f"capture_{name}.log").write_text(r.stdout[-20000:] + r.stderr[-20000:])
        if r.returncode != 0:
            report[name] = {"error": f"worker exited {r.returncode}"}
            continue
        report[name] = compare(torch.load(saved, weights_only=False))
        saved.unlink()
    (out_dir / "capture_stale_rows.json").write_text(json.dumps(report, indent=1))
    for name, rep in report.items():
        for r in rep if isinstance(rep, list) else [{"variant": rep, "captures": []}]:
            prefill = [c for c in r["captures"] if c["rows"] > 64]
            worst = max((c["rel_diff"] or 0.0 for c in r["captures"]), default=0.0)
            print(f"{name} {r['variant']}: prefill NaN rows per capture "
                  f"{[c['nan_rows'] for c in prefill]}, largest difference from the "
                  f"second run {worst:.3g}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) > 1:
        main(sys.argv[1:])
    else:
        raise SystemExit(__doc__)
