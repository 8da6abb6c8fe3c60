"""benchmarks/quality_decode.py without a GPU: its worker runs against a stand-in engine
whose "model" is a table of logits per position and which generates through the real
ForcedTokens processor; the parent's summary, comparisons, failure rule, plot and table
run on what it returns, and every perplexity is checked against one computed here from
the same table."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.scripts import load_script
from vllm_bitdecode import stdlib_llama as data

if not (data.MODEL_DIR / "tokenizer.json").exists():
    pytest.skip("no tokenizer: run `python tools/train_tiny_llama.py prepare`",
                allow_module_level=True)
pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402

from vllm_bitdecode.testing.forced_decode import FORCED_TOKENS_KEY, ForcedTokens  # noqa: E402

qd = load_script("benchmarks/quality_decode.py")

VOCAB = 8192
SETTINGS = {"ppl_tokens": 1797, "context": 600, "position_bin": 256, "prompt_tokens": 1}


def _logits(pos: int) -> torch.Tensor:
    return 2 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(pos))


class FakeDecodeEngine:
    """Predicts position p from the logits table's row p. Decode sharpens the logits by
    ``sharpen`` from position ``sharpen_from`` on (a cost only decode pays, as sparse
    decode's: the table's targets are random, so sharper logits score them worse);
    ``follow=False`` ignores the forcing (greedy argmax)."""

    def __init__(self, sharpen_from=10**9, sharpen=2.0, follow=True):
        self.sharpen_from, self.sharpen, self.follow = sharpen_from, sharpen, follow

    def decode_logits(self, pos):
        x = _logits(pos)
        return x * self.sharpen if pos >= self.sharpen_from else x

    def generate(self, prompts, params, use_tqdm=False):
        ids = [p["prompt_token_ids"] for p in prompts]
        if not isinstance(params, list):
            return [SimpleNamespace(prompt_logprobs=[None] + [
                {t: SimpleNamespace(logprob=float(_logits(i).log_softmax(-1)[t]))}
                for i, t in enumerate(p) if i > 0]) for p in ids]
        proc = ForcedTokens(None, torch.device("cpu"), False)
        outs = [[] for _ in ids]
        steps = [[] for _ in ids]
        for sp in params:
            ForcedTokens.validate_params(sp)
            assert FORCED_TOKENS_KEY in sp.extra_args and sp.logprobs == 0
        added = [(i, sp, p, outs[i])
                 for i, (p, sp) in enumerate(zip(ids, params, strict=True))]
        proc.update_state(BatchUpdate(len(ids), [], added, []))
        for s in range(params[0].max_tokens):
            pos = len(ids[0]) + s
            logits = self.decode_logits(pos).expand(len(ids), VOCAB).clone()
            raw = logits.log_softmax(-1)
            chosen = (proc.apply(logits) if self.follow else logits).argmax(-1).tolist()
            for i, t in enumerate(chosen):
                outs[i].append(t)
                steps[i].append({t: SimpleNamespace(logprob=float(raw[i, t]))})
            proc.update_state(None)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=o, logprobs=lp)])
                for o, lp in zip(outs, steps, strict=True)]


def _spec(name="bf16"):
    return {"model": str(data.MODEL_DIR), "settings": SETTINGS, "gpu_memory_utilization": 0.4,
            **{k: v for k, v in qd.quality.CONFIGS[name].items() if k != "label"}}


@pytest.fixture(scope="module")
def windows():
    held = data.heldout_tokens(data.MODEL_DIR, data.load_tokenizer())
    return data.ppl_windows(held, SETTINGS["context"], SETTINGS["ppl_tokens"])


def _expected_nll(w, sharpen_from=10**9, sharpen=1.0):
    return [-float((_logits(p) * (sharpen if p >= sharpen_from else 1.0)).log_softmax(-1)[w[p]])
            for p in range(1, len(w))]


def test_worker_scores_each_window_by_prefill_and_by_forced_decode(windows):
    res = qd.run_worker(_spec(), llm=FakeDecodeEngine(sharpen_from=300))
    assert len(res["prefill_nll"]) == len(windows) == 3 and res["window"] == 600
    for w, pre, bins in zip(windows, res["prefill_nll"], res["decode_bin_nll"], strict=True):
        assert pre == pytest.approx(sum(_expected_nll(w)), rel=1e-6)
        per_pos = _expected_nll(w, 300, 2.0)  # positions 1..599
        want = [sum(per_pos[0:255]), sum(per_pos[255:511]), sum(per_pos[511:])]
        assert bins == pytest.approx(want, rel=1e-6)
    assert qd.bin_tokens(600, 1, 256) == [255, 256, 88]


def test_a_generation_that_leaves_the_window_fails_loudly():
    with pytest.raises(RuntimeError, match="forced generation left the window at step 0"):
        qd.run_worker(_spec(), llm=FakeDecodeEngine(follow=False))


def test_bin_nll_needs_one_logprob_step_per_token():
    out = SimpleNamespace(token_ids=[4, 5], logprobs=[{4: SimpleNamespace(logprob=-1.0)}])
    with pytest.raises(RuntimeError, match="1 logprob steps for 2 tokens"):
        qd.decode_bin_nll([1, 4, 5], out, 1, 256)


def _doc(results: dict[str, dict]) -> dict:
    doc = {"model": "m", "device": "fake", "settings": SETTINGS, "configs": {}}
    for name, res in results.items():
        doc["configs"][name] = qd.summarize(name, {**res, "wall_s": 1.0}, SETTINGS)
    return doc


def _result(windows, sharpen_from=10**9, sharpen=2.0, scale=1.0):
    """A worker result computed here: prefill on the table, decode sharpened from a
    position on; ``scale`` multiplies every NLL (a config that is worse everywhere)."""
    bins = []
    for w in windows:
        per_pos = _expected_nll(w, sharpen_from, sharpen)
        bins.append([scale * sum(per_pos[max(b * 256 - 1, 0):(b + 1) * 256 - 1])
                     for b in range(3)])
    return {"prefill_nll": [scale * sum(_expected_nll(w)) for w in windows],
            "decode_bin_nll": bins, "window": 600, "engine_start_s": 0.0, "prefill_s": 0.0,
            "decode_s": 0.0, "device": "fake"}


def test_comparisons_against_prefill_bf16_and_dense_4bit(windows, tmp_path, capsys):
    doc = _doc({"bf16": _result(windows), "int4": _result(windows, scale=1.02),
                "int4-sparse256": _result(windows, sharpen_from=512, scale=1.02)})
    qd.compare(doc, spans=[(10, 20)])  # a near-duplicate span inside window 0
    bf16, int4, sparse = (doc["configs"][n] for n in ("bf16", "int4", "int4-sparse256"))
    tokens = 3 * 599
    assert bf16["ppl_prefill"] == pytest.approx(
        math.exp(sum(sum(_expected_nll(w)) for w in windows) / tokens), rel=1e-9)
    assert bf16["compared"]["decode_vs_prefill_pct"] == pytest.approx(0, abs=1e-9)
    assert int4["compared"]["clean_windows"] == 2
    # int4 scales every NLL by 1.02 on both paths: ppl_int4 = ppl_bf16 ** 1.02
    vs = int4["compared"]["vs_bf16_pct"]
    clean = [sum(_expected_nll(w)) for w in windows[1:]]
    assert vs["decode_clean"] == pytest.approx(
        100 * (math.exp(0.02 * sum(clean) / (2 * 599)) - 1), rel=1e-6)
    assert vs["prefill_clean"] == pytest.approx(vs["decode_clean"], rel=1e-9)
    assert "vs_int4_pct" not in int4["compared"]  # only sparse configs compare with int4
    # sparse: its decode pays from its min_seq_len (512: bin 2) on, its prefill does not
    s = sparse["compared"]
    assert s["ppl_decode_clean_from"]["position"] == 512
    assert s["vs_int4_pct"]["prefill_clean"] == pytest.approx(0, abs=1e-9)
    late = [sum(_expected_nll(w, 512, 2.0)[511:]) for w in windows[1:]]
    dense_late = [sum(_expected_nll(w)[511:]) for w in windows[1:]]
    assert s["vs_int4_pct"]["decode_clean_from"] == pytest.approx(
        100 * (math.exp(1.02 * (sum(late) - sum(dense_late)) / (2 * 88)) - 1), rel=1e-6)
    assert s["vs_int4_pct"]["decode_clean"] > 0
    assert sparse["ppl_decode_by_bin"][:2] == pytest.approx(int4["ppl_decode_by_bin"][:2])
    png = qd.plot(doc, tmp_path / "q.png")
    if png:
        assert (tmp_path / "q.png").stat().st_size > 0
    qd.print_table(doc)
    assert "int4-sparse256" in capsys.readouterr().out


def test_main_merges_runs_and_fails_when_bf16_decode_and_prefill_disagree(
        windows, tmp_path, monkeypatch):
    runs = {"bf16": _result(windows), "int4-sparse256": _result(windows, 512, 2.0, 1.02)}

    def fake_run_config(name, model_dir, st, gpu_util, timeout, log_dir, script):
        assert st["ppl_tokens"] == 65536 and script == qd.__file__  # --quick
        return {**runs[name], "wall_s": 1.0}

    monkeypatch.setattr(qd.quality, "run_config", fake_run_config)
    monkeypatch.setattr(qd, "settings", lambda quick, context: {**SETTINGS, "ppl_tokens": 65536}
                        if quick else SETTINGS)
    monkeypatch.setattr(qd.quality, "heldout_near_duplicates", lambda model_dir: [])
    out = tmp_path / "quality_decode.json"
    argv = ["quality_decode.py", "--quick", "--context", "1024", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv + ["--configs", "bf16"])
    qd.main()
    monkeypatch.setattr("sys.argv", argv + ["--configs", "int4-sparse256"])
    qd.main()
    doc = json.loads(out.read_text())
    assert set(doc["configs"]) == {"bf16", "int4-sparse256"}  # merged with the first run
    assert doc["configs"]["int4-sparse256"]["compared"]["vs_bf16_pct"]["decode"] > 0
    # a bf16 engine whose decode disagrees with its prefill fails the run
    runs["bf16"] = _result(windows, sharpen_from=100)
    monkeypatch.setattr("sys.argv", argv + ["--configs", "bf16"])
    with pytest.raises(SystemExit, match="failed: \\['bf16'\\]"):
        qd.main()
    assert "off its prefill" in json.loads(out.read_text())["failures"]["bf16"]


def test_a_nan_perplexity_fails_its_configuration(windows):
    """A NaN logit keeps the forced token (the forcing leaves only it), so the scores are
    where a NaN shows: such a configuration fails, whatever its name."""
    res = _result(windows, scale=1.0)
    res["decode_bin_nll"][1][2] = float("nan")
    doc = _doc({"bf16": _result(windows), "int4": res})
    qd.compare(doc)
    assert qd.failure("bf16", doc["configs"]["bf16"]) is None
    assert "perplexity not finite" in qd.failure("int4", doc["configs"]["int4"])
