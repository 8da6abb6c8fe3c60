"""Teacher forcing through the decode path: a vLLM logits processor that makes each
request generate a given token sequence.

Prompt log-probabilities (``prompt_logprobs``) score a text through the prefill path only.
To score it through the decode path, one token per step as generation reads the cache
(sparse decode's reuse layers included), a request is prefilled with the text's first
tokens and then generates the rest, forced: at every step this processor leaves only the
text's next token possible. vLLM's default ``logprobs_mode="raw_logprobs"`` computes the
returned log-probabilities from the logits before any logits processor runs, so with
``logprobs=0`` each step returns the model's own log-probability of the forced token::

    llm = LLM(..., logits_processors=[ForcedTokens])
    sp = forced_sampling_params(text[n:])        # after a prompt of text[:n]

A request without ``FORCED_TOKENS_KEY`` in its ``extra_args`` is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

if TYPE_CHECKING:
    from vllm.config import VllmConfig

FORCED_TOKENS_KEY = "bitdecode_forced_tokens"


def forced_sampling_params(tokens: Sequence[int], **kw: Any) -> SamplingParams:
    """Greedy parameters that generate exactly ``tokens`` (through ForcedTokens) and
    return each one's raw log-probability (``logprobs=0``: the sampled token only)."""
    return SamplingParams(max_tokens=len(tokens), temperature=0.0, ignore_eos=True,
                          logprobs=0, extra_args={FORCED_TOKENS_KEY: list(tokens)}, **kw)


class ForcedTokens(LogitsProcessor):
    """Leaves one token possible per forced request: the ``len(output)``-th of its list."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        tokens = (sampling_params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if tokens is None:
            return
        if not isinstance(tokens, list) or not tokens or not all(
                isinstance(t, int) and t >= 0 for t in tokens):
            raise ValueError(f"{FORCED_TOKENS_KEY} must be a non-empty list of token ids")
        if sampling_params.max_tokens is not None and sampling_params.max_tokens > len(tokens):
            raise ValueError(f"max_tokens {sampling_params.max_tokens} is more than the "
                             f"{len(tokens)} forced tokens")

    def __init__(self, vllm_config: VllmConfig | None, device: torch.device,
                 is_pin_memory: bool) -> None:
        self.device = device
        # batch row -> (forced tokens, the request's output token list: a live reference
        # that vLLM appends to, so its length is the index of the token now sampled)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: SamplingParams, _prompt: list[int] | None,
                      output: list[int]) -> tuple[list[int], list[int]] | None:
            tokens = (params.extra_args or {}).get(FORCED_TOKENS_KEY)
            return None if tokens is None else (tokens, output)

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows = list(self.rows)
        # past the list (vLLM never asks: max_tokens <= its length), the last token again
        cols = [tokens[min(len(out), len(tokens) - 1)] for tokens, out in self.rows.values()]
        if max(cols) >= logits.shape[-1]:  # an index past the logits: a device assert
            raise ValueError(f"forced token {max(cols)} is past the vocabulary "
                             f"({logits.shape[-1]} logits)")
        r = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        c = torch.tensor(cols, dtype=torch.long).to(self.device, non_blocking=True)
        keep = logits[r, c]
        logits[r] = float("-inf")
        logits[r, c] = keep
        return logits
