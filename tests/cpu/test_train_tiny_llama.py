"""tools/train_tiny_llama.py on CPU: its model is Hugging Face's Llama under the same
parameter names, the planted copy circuit works before any training, export respects
the size limits, and batches and schedules are what the training loop expects."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from tests.scripts import load_script
from vllm_bitdecode import stdlib_llama as data

T = load_script("tools/train_tiny_llama.py")

HAS_TOKENIZER = (data.MODEL_DIR / "tokenizer.json").exists()
needs_tokenizer = pytest.mark.skipif(
    not HAS_TOKENIZER, reason="no tokenizer: run `python tools/train_tiny_llama.py prepare`")


def _hf(cfg: T.ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = {k: v for k, v in cfg.hf_config().items() if k not in ("architectures",
                                                                     "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    return model.float()


@pytest.mark.parametrize("plant", [False, True])
def test_model_is_hugging_face_llama_with_the_same_names(plant):
    cfg = T.SMOKE_MODEL
    ours = T.TinyLlama(cfg)
    ours.init_weights(3)
    if plant:
        ours.plant_induction_heads(3)
    ours.eval()
    hf = _hf(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and missing in ([], ["lm_head.weight"])
    hf.tie_weights()
    ids = torch.randint(3, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.logits(ours(ids))
        b = hf(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_full_model_size_and_shards(tmp_path):
    cfg = T.ModelConfig()
    assert cfg.head_dim == 128 and cfg.num_attention_heads // cfg.num_key_value_heads == 4
    model = T.TinyLlama(cfg)
    model.init_weights(0)
    names = T.write_shards(T.hf_state_dict(model), tmp_path)
    sizes = [(tmp_path / n).stat().st_size for n in names]
    assert len(names) == 3 and max(sizes) <= 15_000_000 and sum(sizes) <= 40_000_000
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert "lm_head.weight" not in index["weight_map"]  # tied
    assert len(index["weight_map"]) == 2 + 9 * cfg.num_hidden_layers


@needs_tokenizer
def test_planted_heads_copy_before_any_training():
    tok = data.load_tokenizer()
    tasks = data.RetrievalTasks(tok)
    stream = data.heldout_tokens(tok=tok)
    model = T.TinyLlama(T.ModelConfig())
    model.init_weights(0)
    model.plant_induction_heads(0)
    model.eval()
    rng = random.Random(2)
    first, again, prev_attn = [], [], []
    for _ in range(4):
        span = tasks.window(rng, stream, 64)
        ids = torch.tensor([[data.BOS_ID] + tasks.window(rng, stream, 300) + span + span])
        with torch.no_grad():
            logp = torch.log_softmax(model.logits(model(ids[:, :-1])), -1)[0]
            # layer 0, query head 0: where does each position look?
            cos, sin = model.rope_tables(ids.shape[1] - 1, ids.device)
            attn = model.model.layers[0].self_attn
            h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:, :-1]))
            q = T._rope(attn.q_proj(h)[..., :128], cos, sin)[0]
            k = T._rope(attn.k_proj(h)[..., :128], cos, sin)[0]
            scores = (q @ k.T / math.sqrt(128)).masked_fill(
                torch.ones(len(q), len(q), dtype=torch.bool).triu(1), float("-inf"))
            w = scores.softmax(-1)
        prev_attn.append(float(w[torch.arange(1, len(q)), torch.arange(0, len(q) - 1)].mean()))
        nll = -logp[torch.arange(len(logp)), ids[0, 1:]]
        first.append(float(nll[-128:-64].mean()))
        again.append(float(nll[-63:].mean()))
    assert np.mean(prev_attn) > 0.9
    assert np.mean(again) < np.mean(first) - 0.3


def test_schedule_and_phases():
    phases = T.FULL_PHASES
    assert math.isclose(sum(p.fraction for p in phases), 1.0)
    assert phases[-1].seq_len == data.MAX_CONTEXT
    assert len({p.seq_len * p.batch for p in phases}) == 1  # same tokens per step
    total = 1000
    seen = [T.phase_of(s, total, phases)[0] for s in range(total)]
    assert seen == sorted(seen) and set(seen) == set(range(len(phases)))
    starts = T.phase_starts(total, phases)
    assert [seen.index(i) for i in range(len(phases))] == starts
    lrs = [T.lr_at(s, total, 1e-3, 40) for s in range(total)]
    assert max(lrs) == pytest.approx(1e-3) and lrs[0] < lrs[39] and lrs[-1] >= 1e-4 * 0.99
    for kinds in [p.mix or T.MIX for p in phases]:
        assert math.isclose(sum(w for _, w in kinds), 1.0)


@needs_tokenizer
def test_batches_shapes_and_answer_mask():
    tok = data.load_tokenizer()
    tasks = data.RetrievalTasks(tok)
    stream = data.heldout_tokens(tok=tok)
    batches = T.Batches(tasks, stream, seed=1)
    ph = T.Phase(512, 16, 1.0)
    x, y, m = batches.next(ph)
    assert x.shape == y.shape == m.shape == (16, 512)
    assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == data.BOS_ID).all()
    assert m.any()
    digits = {tok.token_to_id(str(i)) for i in range(10)}
    marked = y[m].tolist()
    assert sum(t in digits for t in marked) > len(marked) / 2  # answers are mostly digits
    again = T.Batches(tasks, stream, seed=1).next(ph)
    assert all(torch.equal(a, b) for a, b in zip((x, y, m), again, strict=True))


def test_attention_logits_and_zloss_are_those_of_the_causal_score_matrix():
    g = torch.Generator().manual_seed(0)
    b, hq, hk, t, d = 2, 4, 2, 9, 16
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hk, t, d, generator=g)
    full = (q @ k.repeat_interleave(hq // hk, dim=1).transpose(-1, -2) / math.sqrt(d))
    full = full.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(T.attention_logits(q, k, torch.arange(t)), full)
    pos = torch.tensor([7, 0, 3])
    torch.testing.assert_close(T.attention_logits(q, k, pos), full[:, :, pos])
    # all positions drawn: the mean squared log-sum-exp of every query's logits
    torch.testing.assert_close(T.attention_zloss(q, k, t), full.logsumexp(-1).pow(2).mean())
    assert T.attention_zloss(q, k, 4).shape == ()


def test_penalty_options_add_their_terms_and_shrink_what_they_target():
    """--attn-zloss W1 --k-mean-penalty W2: the loss gains W1 times the attention z-loss
    and W2 times the squared norm of the keys' mean, the LM terms are unchanged, and
    training on them lowers the attention logits and the keys' mean."""
    cfg = T.SMOKE_MODEL
    ids = torch.randint(3, cfg.vocab_size, (2, T.ATTN_ZLOSS_QUERIES + 1),
                        generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    m = torch.zeros_like(x, dtype=torch.bool)
    m[:, -8:] = True
    cpu = torch.device("cpu")

    def fresh() -> T.TinyLlama:
        model = T.TinyLlama(cfg)
        model.init_weights(0)
        model.plant_induction_heads(0)
        return model

    model = fresh()
    off = T.batch_losses(model, model, x, y, m)
    on = T.batch_losses(model, model, x, y, m, attn_zloss=1e-3, k_mean_penalty=1e-4)
    assert not set(T.PENALTIES) & set(off)
    torch.testing.assert_close(off["total"], off["lm"] + off["answer"])
    torch.testing.assert_close(on["lm"], off["lm"])
    torch.testing.assert_close(on["answer"], off["answer"])
    torch.testing.assert_close(on["total"], on["lm"] + on["answer"] + 1e-3 * on["attn_zloss"]
                               + 1e-4 * on["k_mean"])
    # the terms are what their docstrings say, averaged over the layers (all positions
    # are scored: T = ATTN_ZLOSS_QUERIES)
    inputs = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a)))
             for layer in model.model.layers]
    with T.autocast(cpu):
        model(x)
    for h in hooks:
        h.remove()
    with T.autocast(cpu):
        z, k_means = [], []
        for mod, a in inputs:
            q, k = mod.qk(*a[:3])
            full = T.attention_logits(q, k, torch.arange(x.shape[1]))
            z.append(full.logsumexp(-1).pow(2).mean())
            k_means.append(mod.project(a[0])[1].float().mean(2).pow(2).sum(-1).mean())
    torch.testing.assert_close(on["attn_zloss"], torch.stack(z).mean())
    torch.testing.assert_close(on["k_mean"], torch.stack(k_means).mean())
    # the planted previous-token head starts with logits near 50, carried by a large
    # content-free key
    assert on["attn_zloss"] > 100 and on["k_mean"] > 100

    def stats_after_steps(**weights: float) -> dict[str, list]:
        model = fresh()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(8):
            T.batch_losses(model, model, x, y, m, **weights)["total"].backward()
            opt.step()
            opt.zero_grad()
        return T.attention_stats(model, ids.tolist(), cpu)

    def largest_logit(stats: dict[str, list]) -> float:
        return max(max(heads) for heads in stats["logit_max"])

    start = T.attention_stats(fresh(), ids.tolist(), cpu)
    plain = stats_after_steps()
    zl = stats_after_steps(attn_zloss=1e-2)
    km = stats_after_steps(k_mean_penalty=1e-2)
    assert largest_logit(zl) < largest_logit(start) - 5
    assert largest_logit(zl) < largest_logit(plain) / 2
    # layer 0's keys: their mean is the planted head's (about 23 at the start)
    assert km["k_mean_norm"][0] < plain["k_mean_norm"][0] - 3
