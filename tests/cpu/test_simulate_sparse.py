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
