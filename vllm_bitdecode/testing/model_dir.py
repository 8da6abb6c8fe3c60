"""Model directories for ``load_format="dummy"``: a Llama config.json (Llama-3-8B's shape
unless overridden, or the tiny 2-layer test model) and, for ``vllm serve`` and ``vllm
bench``, a word-level tokenizer with exactly the model's vocabulary and a chat
template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# A tiny Llama for serving tests: 8 query / 2 KV heads of d=128 (GQA 4), 2 layers.
TINY_LLAMA = dict(
    hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
    head_dim=128, num_hidden_layers=2, vocab_size=32000, max_position_embeddings=32768,
)

# Token ids 0-2 of the test tokenizer; they match LLAMA3_8B's bos/eos ids.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Plain words the test tokenizer knows, so that chat prompts map to real ids.
TOKENIZER_WORDS = ("user", "assistant", "system", ":", "hello", "tell", "me", "a", "story",
                   "about", "the", "sea", ".", ",", "?")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def write_llama_config(path: str | Path, **overrides: Any) -> Path:
    """A directory holding only config.json: enough for load_format="dummy"."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA3_8B, **overrides}, indent=1))
    return path


def tokenizer_vocab(vocab_size: int) -> dict[str, int]:
    """One word per id: the special tokens, a few English words, then ``w<id>``."""
    words = [*SPECIAL_TOKENS, *TOKENIZER_WORDS]
    if vocab_size < len(words):
        raise ValueError(f"vocab_size {vocab_size} < {len(words)} fixed tokens")
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size)})
    return vocab


def write_tiny_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """tokenizer.json + tokenizer_config.json (with a chat template) for ``vocab_size`` ids.

    A word-level tokenizer with exactly as many ids as the model's vocabulary, so that
    every id a dummy-weight model samples decodes (to ``w<id>``, space-separated), and
    text prompts split on whitespace and punctuation. Enough for ``vllm serve`` (text
    and chat endpoints) and for ``vllm bench``'s random dataset; no download needed.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab=tokenizer_vocab(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return path


def write_model_dir(path: str | Path, tokenizer: bool = True, **overrides: Any) -> Path:
    """config.json (Llama-3-8B shape unless overridden) and, by default, the tiny tokenizer."""
    if tokenizer:
        # without a transformers_version, transformers 4.57 takes a local tokenizer for
        # a Mistral one and warns about its regex
        overrides = {"transformers_version": "4.57.1", **overrides}
    path = write_llama_config(path, **overrides)
    if tokenizer:
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        write_tiny_tokenizer(path, vocab)
    return path


def make_model_cli(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m vllm_bitdecode.testing make-model",
        description="Write a dummy-weight Llama model directory (config.json, tiny "
                    "tokenizer with a chat template) for vllm serve / vllm bench "
                    "with --load-format dummy. Llama-3-8B shape unless overridden.",
    )
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--tiny", action="store_true",
                    help="the 2-layer, 1024-wide test model instead of the 8B shape")
    ap.add_argument("--no-tokenizer", action="store_true")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = dict(TINY_LLAMA) if args.tiny else {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    path = write_model_dir(args.path, tokenizer=not args.no_tokenizer, **overrides)
    print(path)
