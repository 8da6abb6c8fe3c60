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
    proc.update_state(_update(1, added=[(0, forced_sampling_params([VOCAB]), [0], [])]))
    with pytest.raises(ValueError, match=f"forced token {VOCAB} is past the vocabulary"):
        proc.apply(logits.clone())


def test_vllms_own_batch_and_sampler_return_the_models_logprob_of_each_forced_token():
    """The method's premise, on vLLM's own InputBatch, logits-processor build and Sampler
    (CPU): greedy requests with logprobs=0 sample their forced tokens, and the returned
    log-probability is the model's (log_softmax of the logits before any processor: the
    default logprobs_mode "raw_logprobs"); a plain request keeps its argmax. Requests leave
    and join between steps, and the batch is condensed as the model runner does."""
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor import build_logitsprocs
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    cpu = torch.device("cpu")
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=8),
                             speculative_config=None, reasoning_config=None)
    procs = build_logitsprocs(config, cpu, False, False, (ForcedTokens,))
    batch = InputBatch(max_num_reqs=8, max_model_len=64, max_num_batched_tokens=256,
                       device=cpu, pin_memory=False, vocab_size=VOCAB, block_sizes=[16],
                       kernel_block_sizes=[16], logitsprocs=procs,
                       logitsprocs_need_output_token_ids=True)
    sampler = Sampler()
    assert sampler.logprobs_mode == "raw_logprobs"
    g = torch.Generator().manual_seed(1)
    states: dict[str, CachedRequestState] = {}
    forced: dict[str, list[int]] = {}

    def add(req_id: str, params: SamplingParams) -> None:
        states[req_id] = CachedRequestState(
            req_id=req_id, prompt_token_ids=[1], mm_features=[], sampling_params=params,
            generator=None, block_ids=([0],), num_computed_tokens=0, output_token_ids=[])
        batch.add_request(states[req_id])

    for i in range(4):
        forced[f"f{i}"] = torch.randint(0, VOCAB, (9,), generator=g).tolist()
        add(f"f{i}", forced_sampling_params(forced[f"f{i}"]))
    add("plain", SamplingParams(max_tokens=9, temperature=0.0, logprobs=0))
    batch.condense()
    batch.refresh_metadata()
    for step in range(9):
        if step == 3:  # two finish, one joins: the batch is condensed
            for req_id in ("f0", "f2"):
                batch.remove_request(req_id)
                del states[req_id]
            forced["f9"] = torch.randint(0, VOCAB, (6,), generator=g).tolist()
            add("f9", forced_sampling_params(forced["f9"]))
            batch.condense()
        batch.refresh_metadata()
        logits = torch.randn(batch.num_reqs, VOCAB, generator=g)
        raw = logits.log_softmax(-1)
        out = sampler(logits.clone(), batch.sampling_metadata)
        lp = out.logprobs_tensors
        for row, req_id in enumerate(batch.req_ids):
            state = states[req_id]
            if len(state.output_token_ids) == len(forced.get(req_id, range(9))):
                continue  # done: vLLM would have removed it
            t = int(out.sampled_token_ids[row, 0])
            want = (forced[req_id][len(state.output_token_ids)] if req_id in forced
                    else int(raw[row].argmax()))
            assert t == want, (step, req_id)
            assert int(lp.logprob_token_ids[row, 0]) == t
            assert float(lp.logprobs[row, 0]) == pytest.approx(float(raw[row, t]), abs=1e-6)
            state.output_token_ids.append(t)
    assert [len(states[r].output_token_ids) for r in ("f1", "f3", "f9", "plain")] == [9, 9, 6, 9]
