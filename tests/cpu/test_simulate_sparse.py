"""tools/simulate_sparse.py: the token and page selection masks it puts on the reuse layers."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script


@pytest.fixture(scope="module")
def sim():
    return load_script("tools/simulate_sparse.py")


def test_mode_names(sim):
    assert sim.parse_mode("dense") == ("dense", 0)
    assert sim.parse_mode("token-k256") == ("token", 256)
    assert sim.parse_mode("page-k512") == ("page", 512)
    assert sim.parse_mode("tokenown-k256") == ("tokenown", 256)
    for bad in ("page-k40", "token-k8", "tokens-k256", "page"):
        with pytest.raises(SystemExit):
            sim.parse_mode(bad)


def _scores(t: int, seed: int) -> torch.Tensor:
    return torch.randn(2, t, t, generator=torch.Generator().manual_seed(seed))


def test_token_selection_keeps_the_newest_and_the_best_older_keys(sim):
    t, k = 100, 32
    s = _scores(t, 0)
    rows = torch.zeros(t, dtype=torch.bool)
    rows[60:] = True
    mask = sim.selection_mask(s, "token", k, rows)
    causal = torch.ones(t, t).tril().bool()
    assert torch.equal(mask[:, :60], causal[:60].expand(2, 60, t))  # dense rows
    for h in range(2):
        for q in range(60, t):
            kept = mask[h, q].nonzero().flatten().tolist()
            best = s[h, q, :q].topk(k - 1).indices.sort().values.tolist()
            assert kept == [*best, q]


def test_page_selection_keeps_the_own_page_and_the_best_older_pages(sim):
    t, k, page = 150, 64, sim.PAGE
    s = _scores(t, 1)
    rows = torch.ones(t, dtype=torch.bool)
    mask = sim.selection_mask(s, "page", k, rows)
    for h in range(2):
        for q in range(k, t):  # rows within the budget keep everything
            own = q // page
            older = torch.stack([s[h, q, p * page:(p + 1) * page].max() for p in range(own)])
            best = set(older.topk(k // page - 1).indices.tolist()) | {own}
            want = [j for j in range(q + 1) if j // page in best]
            assert mask[h, q].nonzero().flatten().tolist() == want
        assert mask[h, :k].equal(torch.ones(k, t).tril().bool())  # short rows: all keys


def test_tokenown_selection_keeps_the_own_page_and_the_best_keys_before_it(sim):
    t, k, page = 120, 48, sim.PAGE
    s = _scores(t, 2)
    mask = sim.selection_mask(s, "tokenown", k, torch.ones(t, dtype=torch.bool))
    for h in range(2):
        for q in range(k, t):
            start = q // page * page
            best = s[h, q, :start].topk(k - page).indices.tolist()
            assert mask[h, q].nonzero().flatten().tolist() == sorted(best) + list(
                range(start, q + 1))


@pytest.mark.parametrize("kv", ["bf16", "int4", "int2-norot"])
def test_attention_reads_keys_and_values_as_the_cache_returns_them(sim, kv):
    """--kv: every layer attends over K and V passed through simulate_kv_quant's rounding
    (the reference quantizer), the selection layer included; bf16 only rounds."""
    g = torch.Generator().manual_seed(3)
    t, d = 40, 128
    q = torch.randn(1, 4, t, d, generator=g)
    k = torch.randn(1, 2, t, d, generator=g)
    v = torch.randn(1, 2, t, d, generator=g)
    mode = sim.Mode.parse(kv)
    attention = sim.SparseAttention(6, mode)
    attention.use("token-k32")
    attention.sparse_rows = torch.ones(t, dtype=torch.bool)
    layer = type("Layer", (), {"layer_idx": attention.selection[0]})()
    out, _ = attention(layer, q, k, v, None, scaling=d**-0.5)
    kq, vq = sim.quantize_kv(k, v, mode)
    if kv != "bf16":
        assert (kq - k.to(torch.bfloat16).float()).abs().max() > 1e-3  # it did quantize
    want = torch.nn.functional.scaled_dot_product_attention(
        q, kq.repeat_interleave(2, 1), vq.repeat_interleave(2, 1), is_causal=True,
        scale=d**-0.5)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-4, atol=1e-5)
    # the selection ranked the read-back keys: the newest plus the 31 best older ones
    logits = (q[0] @ kq[0].repeat_interleave(2, 0).transpose(-1, -2)).unflatten(0, (2, 2))
    best = logits.amax(1)[:, -1, :-1]
    want_kept = best.topk(31, dim=-1).indices.sort(-1).values
    kept = attention.mask[:, -1, :-1].nonzero()[:, 1].view(2, 31)
    assert torch.equal(kept, want_kept)
