"""testing.forced_decode.ForcedTokens: the logits processor that teacher-forces a decode,
driven here the way vLLM's persistent batch drives it (rows added, removed, condensed and
swapped between steps; output lists that grow by one token per step)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from vllm_bitdecode.testing.forced_decode import (  # noqa: E402
    FORCED_TOKENS_KEY,
    ForcedTokens,
    forced_sampling_params,
)

VOCAB = 37


def _update(size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added),
                       moved=list(moved))


def test_sampling_params_generate_exactly_the_forced_tokens():
    sp = forced_sampling_params([5, 6, 7])
    assert (sp.max_tokens, sp.temperature, sp.ignore_eos, sp.logprobs) == (3, 0.0, True, 0)
    assert sp.extra_args == {FORCED_TOKENS_KEY: [5, 6, 7]}
    ForcedTokens.validate_params(sp)
    ForcedTokens.validate_params(SamplingParams(max_tokens=4))  # not forced: left alone


@pytest.mark.parametrize("tokens, max_tokens, match", [
    ([], 1, "non-empty list"),
    ((1, 2), 2, "non-empty list"),
    ([1, -2], 2, "non-empty list"),
    ([1, 2.0], 2, "non-empty list"),
    ([1, 2], 3, "max_tokens 3 is more than the 2 forced tokens"),
])
def test_bad_forced_tokens_are_refused(tokens, max_tokens, match):
    sp = SamplingParams(max_tokens=max_tokens, extra_args={FORCED_TOKENS_KEY: tokens})
    with pytest.raises(ValueError, match=match):
        ForcedTokens.validate_params(sp)


def test_forcing_follows_rows_through_a_changing_batch():
    """Four requests, three forced, over eight steps of a batch that changes: each forced
    request generates its own list whatever row it sits in, the unforced one its argmax,
    and the log-probabilities taken before the processor (vLLM's raw_logprobs) are the
    model's own for the forced tokens."""
    g = torch.Generator().manual_seed(0)
    proc = ForcedTokens(None, torch.device("cpu"), False)
    assert not proc.is_argmax_invariant()
    forced = {name: torch.randint(0, VOCAB, (8,), generator=g).tolist() for name in "ACD"}
    outputs: dict[str, list[int]] = {name: [] for name in "ABCD"}
    scores: dict[str, list[float]] = {name: [] for name in "ABCD"}
    expected_scores: dict[str, list[float]] = {name: [] for name in "ABCD"}
    params = {n: forced_sampling_params(forced[n]) if n in forced else SamplingParams()
              for n in "ABCD"}

    def add(name, row):
        return (row, params[name], [0], outputs[name])

    rows = ["A", "B", "C"]
    updates = {
        0: _update(3, added=[add("A", 0), add("B", 1), add("C", 2)]),
        # B finishes; vLLM condenses the batch by moving the last row into the hole
        2: _update(2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]),
        3: _update(3, added=[add("D", 2)]),
        5: _update(3, moved=[(0, 2, MoveDirectionality.SWAP)]),
    }
    for step in range(8):
        if step == 2:
            rows = ["A", "C"]
        elif step == 3:
            rows = ["A", "C", "D"]
        elif step == 5:
            rows = ["D", "C", "A"]
        proc.update_state(updates.get(step))
        logits = torch.randn(len(rows), VOCAB, generator=g)
        raw = logits.log_softmax(-1)
        out = proc.apply(logits.clone())
        sampled = out.argmax(-1).tolist()
        for r, name in enumerate(rows):
            t = sampled[r]
            if name in forced:
                want = forced[name][len(outputs[name])]
                assert torch.isinf(out[r]).sum() == VOCAB - 1, (step, name)
                expected_scores[name].append(float(raw[r, want]))
            else:
                assert torch.equal(out[r], logits[r])
                expected_scores[name].append(float(raw[r].max()))
            scores[name].append(float(raw[r, t]))
            outputs[name].append(t)
    for name in "ACD":
        assert outputs[name] == forced[name][:len(outputs[name])]
    assert [len(outputs[n]) for n in "ABCD"] == [8, 2, 8, 5]
    assert scores == expected_scores
    proc.update_state(_update(0, removed=[0, 1, 2]))
    assert not proc.rows
    logits = torch.randn(2, VOCAB, generator=g)
    assert torch.equal(proc.apply(logits.clone()), logits)  # nothing forced: untouched
