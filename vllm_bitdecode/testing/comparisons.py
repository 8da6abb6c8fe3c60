"""How two engines' results are compared: greedy tokens (up to ties or to a first
divergence among the other's top tokens), teacher-forced log-probabilities, and
attention rows matched by position."""

from __future__ import annotations

from typing import Any

TIE_LOGPROB = 0.02  # two best log-probabilities closer than this are a tie


def assert_greedy_equal_up_to_ties(tokens: list[list[int]], ref_tokens: list[list[int]],
                                   ref_logprobs: list[list[dict[int, float]]], length: int,
                                   what: str, tie_logprob: float = TIE_LOGPROB) -> int:
    """Greedy tokens equal the reference's, request by request, each ``length`` long.

    A request may differ once, at a step where the reference's two best log-probabilities
    are within ``tie_logprob`` (a different summation order may break such a tie); it is
    not compared after that step, its context differing from there on. At most one request
    in 8 (at least one) may do so. Returns the number that did.
    """
    ties = 0
    for i, (a_toks, b_toks) in enumerate(zip(tokens, ref_tokens, strict=True)):
        assert len(a_toks) == len(b_toks) == length, f"{what}: request {i} did not finish"
        for step, (a, b) in enumerate(zip(a_toks, b_toks, strict=True)):
            if a == b:
                continue
            top = sorted(ref_logprobs[i][step].values(), reverse=True)
            assert len(top) >= 2 and top[0] - top[1] < tie_logprob, (
                f"{what}: request {i}, step {step}: token {a} instead of {b} "
                f"(reference log-probs {top})")
            ties += 1
            break
    assert ties <= max(1, len(tokens) // 8), f"{what}: {ties} requests diverged at ties"
    return ties


def assert_greedy_close(tokens: list[list[int]], logprobs: list[list[dict[int, float]]],
                        ref_tokens: list[list[int]], ref_logprobs: list[list[dict[int, float]]],
                        length: int, what: str) -> list[int | None]:
    """vLLM's own rule for two engines whose arithmetic differs (its ``check_logprobs_close``):
    greedy tokens equal, request by request, up to a first divergence where each engine's
    token is among the other's top log-probabilities (``logprobs`` > 1 in the job); after
    it the contexts differ and the request is not compared further. Returns, per request,
    the step of its divergence (None: identical).
    """
    steps: list[int | None] = []
    for i, (a_toks, b_toks) in enumerate(zip(tokens, ref_tokens, strict=True)):
        assert len(a_toks) == len(b_toks) == length, f"{what}: request {i} did not finish"
        pairs = enumerate(zip(a_toks, b_toks, strict=True))
        step = next((j for j, (a, b) in pairs if a != b), None)
        if step is not None:
            a, b = a_toks[step], b_toks[step]
            assert a in ref_logprobs[i][step] and b in logprobs[i][step], (
                f"{what}: request {i}, step {step}: token {a} instead of {b}, and not among "
                f"the other's top tokens ({ref_logprobs[i][step]} / {logprobs[i][step]})")
        steps.append(step)
    return steps


def teacher_forced_agreement(test: list[dict[str, list[Any]]],
                             ref: list[dict[str, list[Any]]]) -> dict[str, float]:
    """Compare two engines' ``prompt_logprobs`` results on the same prompts: perplexity
    ratio (test / ref), the share of positions whose argmax agrees, and the mean absolute
    difference of the prompt tokens' log-probabilities."""
    import math

    a = [x for r in test for x in r["logprob"]]
    b = [x for r in ref for x in r["logprob"]]
    same = [x == y for t, r in zip(test, ref, strict=True)
            for x, y in zip(t["argmax"], r["argmax"], strict=True)]
    assert len(a) == len(b) == len(same) > 0, "prompt log-probabilities missing"
    return {"ppl_ratio": math.exp((sum(b) - sum(a)) / len(a)),
            "argmax_agreement": sum(same) / len(same),
            "mean_abs_logprob_diff": sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)}


def match_rows_by_position(test: dict[str, Any], ref: dict[str, Any]) -> tuple[Any, float]:
    """Compare two attention captures (``positions`` [N] and ``rows`` [N, H*D], as
    returned for jobs with ``capture``) row by row.

    For every row of ``test``: the smallest relative error |t - r| / |r| against the rows
    of ``ref`` at the same position (one per request that reached it; inf where ``ref``
    has none); and the overall relative error sqrt(sum |t - r|^2 / sum |r|^2) over those
    best matches. Returns (per-row errors tensor, overall error).
    """
    import math

    import torch

    tp, tr = test["positions"], test["rows"].float()
    rp, rr = ref["positions"], ref["rows"].float()
    r_order = torch.argsort(rp, stable=True)
    rp, rr = rp[r_order], rr[r_order]
    r_pos, r_cnt = torch.unique_consecutive(rp, return_counts=True)
    r_start = torch.cumsum(r_cnt, 0) - r_cnt
    where = {int(p): (int(s), int(c)) for p, s, c in zip(r_pos, r_start, r_cnt, strict=True)}
    t_order = torch.argsort(tp, stable=True)
    t_pos, t_cnt = torch.unique_consecutive(tp[t_order], return_counts=True)
    t_start = torch.cumsum(t_cnt, 0) - t_cnt
    errs = torch.full((tp.numel(),), math.inf)
    num = den = 0.0
    single_t, single_r = [], []  # positions with one reference row: compared at once
    for p, s, c in zip(t_pos.tolist(), t_start.tolist(), t_cnt.tolist(), strict=True):
        if p not in where:
            continue
        rs, rc = where[p]
        idx = t_order[s : s + c]
        if rc == 1:
            single_t.append(idx)
            single_r.append(torch.full((c,), rs))
            continue
        cand = rr[rs : rs + rc]
        dist = torch.cdist(tr[idx], cand, compute_mode="donot_use_mm_for_euclid_dist")
        norms = cand.norm(dim=1).clamp_min(1e-30)
        best = (dist / norms).argmin(dim=1)
        d_best = dist.gather(1, best[:, None])[:, 0]
        n_best = norms[best]
        errs[idx] = d_best / n_best
        num += float((d_best**2).sum())
        den += float((n_best**2).sum())
    if single_t:
        ti, ri = torch.cat(single_t), torch.cat(single_r)
        d_best = (tr[ti] - rr[ri]).norm(dim=1)
        n_best = rr[ri].norm(dim=1).clamp_min(1e-30)
        errs[ti] = d_best / n_best
        num += float((d_best**2).sum())
        den += float((n_best**2).sum())
    return errs, math.sqrt(num / den) if den else math.inf
