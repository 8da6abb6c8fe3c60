"""Train the small Llama the project ships (models/stdlib-llama-18m), from scratch.

A Llama-architecture causal LM (6 layers, hidden 512, 4 query heads over 1 KV head,
head size 128, tied embeddings, 17.6M parameters, 35 MB in bf16) trained on the
Python standard library's source plus synthetic long-context retrieval examples
(a pass key, or key/value pairs, buried in real code with the question at the end).
Retrieval needs induction heads (attend to what followed an earlier occurrence of the
current token), which small models find only after a long plateau; so the model starts
with a previous-token head and an induction head planted in its initial weights
(TinyLlama.plant_induction_heads), trains first on text that only copying predicts, and
then on the full mix with a context curriculum of 512 -> 2K -> 4K -> 8K tokens.
The export is what vLLM's loader reads: config.json (LlamaForCausalLM), safetensors
shards with Hugging Face Llama parameter names (each <= 15 MB), tokenizer.json +
tokenizer_config.json.

Three steps:

    # 1. here, on CPU, once: tokenizer, held-out eval text (both shipped in the model
    #    directory) and the tokenized training data (build/tiny-data, ~17 MB, not shipped)
    python tools/train_tiny_llama.py prepare --also-stdlib /path/to/python3.12/lib/python3.12

    # 2. on one H100, about 6 minutes; the training data travels as a carried path
    python3 tools/train_tiny_llama.py train --out models/stdlib-llama-18m --bundle $OUT

    # 3. on CPU, in a minute or two: the same code path end to end on a tiny model
    python tools/train_tiny_llama.py train --smoke --out /tmp/tiny-smoke

``train`` measures its own step times first and picks the number of steps that fits
``--train-seconds`` (default 300 s); that number is logged, and ``--steps N`` with the
same ``--seed`` replays the same run (same initialization, same batches, same schedule).
Written into ``--out``: config.json, generation_config.json, model-0000k-of-0000n
.safetensors + index, tokenizer files, train_log.json (settings, time, loss curve,
metrics), loss.png (if matplotlib is importable) and reference_logits.json (logits of
the exported model on fixed prompts, plus the shards' sha256, for the CPU test).
``--bundle DIR`` also writes the shards and one meta.tar of the other files into DIR
(at most 8 files), for copying back from a remote machine.

``--attn-zloss W`` (default 1e-3) and ``--k-mean-penalty W`` (default 1e-2; 0 turns either
off) add auxiliary losses that keep the attention logits and the content-free part of the
keys small. Without them this model's keys carry a large token-independent part and its
attention logits reach 100, which made 4-bit KV cost it twice what it costs with them
(docs/quality-notes.md); neither loss knows about quantization. The shipped model was
trained with the defaults. The final metrics report the attention logits and the keys'
mean and rest per layer (``attention``) with or without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import math
import platform
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_bitdecode import stdlib_llama as data  # noqa: E402
from vllm_bitdecode.provenance import git_commit  # noqa: E402

DEFAULT_DATA_DIR = data.REPO_ROOT / "build" / "tiny-data"
SHARD_LIMIT_BYTES = 14_500_000  # under 15 MB with headers


# ---- model ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 512
    intermediate_size: int = 1024
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 128
    num_hidden_layers: int = 6
    vocab_size: int = data.VOCAB_SIZE
    max_position_embeddings: int = data.MAX_CONTEXT
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    def hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "bos_token_id": data.BOS_ID,
            "eos_token_id": data.EOS_ID,
        }


SMOKE_MODEL = ModelConfig(hidden_size=256, intermediate_size=512, num_attention_heads=2,
                          num_key_value_heads=1, num_hidden_layers=2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as Hugging Face's LlamaRMSNorm: normalize in float32, scale in the input dtype
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, Hq, T, D] and keys [B, Hkv, T, D] before RoPE."""
        c = self.c
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        return q, k

    def qk(self, x: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys after RoPE, float32."""
        q, k = self.project(x)
        return _rope(q, cos, sin), _rope(k, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                penalties: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Output [B, T, H]; with ``penalties`` also this layer's "attn_zloss"
        (:func:`attention_zloss`) and "k_mean" (:func:`k_mean_sq`), else None."""
        c = self.c
        b, t, _ = x.shape
        q, k = self.project(x)
        aux = {"k_mean": k_mean_sq(k)} if penalties else None
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if aux is not None:
            aux["attn_zloss"] = attention_zloss(q, k, ATTN_ZLOSS_QUERIES)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = q.to(v.dtype), k.to(v.dtype)
        rep = c.num_attention_heads // c.num_key_value_heads
        if rep > 1:  # Hugging Face's repeat_kv: KV head j serves query heads j*rep..j*rep+rep-1
            k = k[:, :, None].expand(b, c.num_key_value_heads, rep, t, c.head_dim).reshape(
                b, c.num_attention_heads, t, c.head_dim)
            v = v[:, :, None].expand(b, c.num_key_value_heads, rep, t, c.head_dim).reshape(
                b, c.num_attention_heads, t, c.head_dim)
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # never the math backend: at 8K it would materialize the score matrix
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1)), aux


# query positions per sequence and layer whose attention logits the z-loss scores
ATTN_ZLOSS_QUERIES = 64


def attention_logits(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Pre-softmax attention logits, float32, of the query positions ``pos`` against
    every key: [B, Hq, len(pos), T], keys after the query at -inf. q [B, Hq, T, D] and
    k [B, Hkv, T, D] after RoPE; KV head j serves query heads j*rep..j*rep+rep-1."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        qs = q[:, :, pos].float().view(b, hk, hq // hk, len(pos), d)
        s = torch.einsum("bgrnd,bgtd->bgrnt", qs, k.float()) / math.sqrt(d)
    s = s.masked_fill(torch.arange(t, device=q.device) > pos[:, None], float("-inf"))
    return s.flatten(1, 2)


def attention_zloss(q: torch.Tensor, k: torch.Tensor, n_queries: int) -> torch.Tensor:
    """z-loss on attention: the mean squared log-sum-exp of the attention logits of
    ``n_queries`` query positions drawn at random (all of them if T <= n_queries), over
    all heads and sequences. It keeps the logits' scale down, and with it how far a
    small error in K (as from KV-cache quantization) moves them."""
    pos = torch.randperm(q.shape[2], device=q.device)[:n_queries]
    return torch.logsumexp(attention_logits(q, k, pos), dim=-1).pow(2).mean()


def k_mean_sq(k: torch.Tensor) -> torch.Tensor:
    """Squared norm of the keys' mean over the sequence, before RoPE (k [B, Hkv, T, D]),
    averaged over sequences and KV heads: the content-free part of K. Every query head
    of the KV head sees it, and per-token quantization has to spend its range on it
    (docs/quality-notes.md: it is what makes 4-bit K cost the baseline model ~10%)."""
    return k.float().mean(2).pow(2).sum(-1).mean()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation (first half / second half), as Hugging Face Llama and vLLM."""
    x = x.float()
    return x * cos + _rotate_half(x) * sin


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                penalties: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        a, aux = self.self_attn(self.input_layernorm(x), cos, sin, penalties)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), aux


class Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinyLlama(nn.Module):
    """Parameter names equal Hugging Face LlamaForCausalLM's (lm_head tied to the embedding)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.model = Backbone(c)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64)
                                           .float() / c.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.c.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                with torch.no_grad():
                    p.fill_(1.0)
                continue
            std = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    @torch.no_grad()
    def plant_induction_heads(self, seed: int, scale: dict[str, float] | None = None) -> None:
        """Start from a working copy circuit instead of waiting for one to form.

        Small models trained from scratch sit on a long loss plateau before they find
        induction heads (attend to the token after an earlier occurrence of the current
        token), and retrieval needs them. This sets, on top of :meth:`init_weights`:

        - embeddings: token content in the first H-d-1 dimensions, a constant in
          dimension H-d-1 (a content-free direction that positional attention can use)
          and zeros in the last d ("slot"); the tied unembedding ignores both extras;
        - layer 0, query head 0 on KV head 0: attention to the previous position only
          (constant query and key whose RoPE phases add up at distance 1), its values a
          random projection of the token content, written into the slot;
        - layer 1, query head 0 on KV head 0: queries the current token's projection,
          keys the slot (what the previous position held), on the lowest RoPE
          frequencies (nearly position-free), so it attends to the token after an earlier
          occurrence of the current token; its output adds that token's embedding.

        Everything stays a standard Llama; training reshapes these weights like any other.
        """
        c = self.c
        s = {"const": 0.4, "prev": 0.41, "prev_out": 0.05, "match": 10.0, "copy": 2.0,
             **(scale or {})}
        d, hsz = c.head_dim, c.hidden_size
        half = d // 2
        tok = hsz - d - 1  # token dimensions [0, tok), constant at tok, slot [tok + 1, hsz)
        if tok < 32 or c.num_hidden_layers < 2:
            return
        g = torch.Generator().manual_seed(seed + 1)
        emb = self.model.embed_tokens.weight
        emb[:, tok:] = 0.0
        emb[:, tok] = s["const"]
        theta = c.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
        # layer 0: previous-token head
        a0 = self.model.layers[0].self_attn
        q0, k0, v0, o0 = (a0.q_proj.weight, a0.k_proj.weight, a0.v_proj.weight,
                          a0.o_proj.weight)
        fast = torch.arange(16)  # highest RoPE frequencies: they tell distance 1 from 0 or 2
        q0[:d] = 0.0
        k0[:d] = 0.0
        q0[fast, tok] = (s["prev"] * torch.cos(theta[fast])).float()
        q0[fast + half, tok] = (-s["prev"] * torch.sin(theta[fast])).float()
        k0[fast, tok] = s["prev"]
        proj = torch.randn(d, tok, generator=g) / math.sqrt(tok)
        v0[:d] = 0.0
        v0[:d, :tok] = proj
        o0[:, :d] = 0.0
        o0[tok + 1:, :d] = s["prev_out"] * torch.eye(d)
        # layer 1: induction head on the slowest frequencies (pairs 44..63 turn by < 0.06
        # rad over 512 positions, < 1 rad over 8K)
        a1 = self.model.layers[1].self_attn
        q1, k1, v1, o1 = (a1.q_proj.weight, a1.k_proj.weight, a1.v_proj.weight,
                          a1.o_proj.weight)
        slow = torch.cat([torch.arange(44, half), torch.arange(44 + half, d)])
        q1[:d] = 0.0
        k1[:d] = 0.0
        q1[slow, :tok] = s["match"] * proj[slow]
        k1[slow, tok + 1 + slow] = 1.0
        proj2 = torch.randn(d, tok, generator=g) / math.sqrt(tok)
        v1[:d] = 0.0
        v1[:d, :tok] = proj2
        o1[:, :d] = 0.0
        o1[:tok, :d] = s["copy"] * proj2.T

    def rope_tables(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(t, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, ids: torch.Tensor, penalties: bool = False):
        """Final-norm hidden states [B, T, H]; with ``penalties``, (hidden states, the
        attention penalties "attn_zloss" and "k_mean" averaged over the layers)."""
        cos, sin = self.rope_tables(ids.shape[1], ids.device)
        x = self.model.embed_tokens(ids)
        per_layer = []
        for layer in self.model.layers:
            x, aux = layer(x, cos, sin, penalties)
            per_layer.append(aux)
        h = self.model.norm(x)
        if not penalties:
            return h
        return h, {k: torch.stack([a[k] for a in per_layer]).mean() for k in per_layer[0]}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.model.embed_tokens.weight)


def hf_state_dict(model: TinyLlama) -> dict[str, torch.Tensor]:
    """bf16 CPU tensors under Hugging Face Llama names (no lm_head: tied)."""
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()}


# ---- data ----------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> None:
    model_dir = Path(args.model_dir)
    t0 = time.time()
    sources = data.stdlib_sources(args.stdlib)
    train_src, held_src = data.split_sources(sources)
    print(f"[prepare] {len(sources)} files under {args.stdlib or data.stdlib_root()}: "
          f"{len(train_src)} train, {len(held_src)} held out")
    if args.rebuild_tokenizer or not (model_dir / "tokenizer.json").exists():
        tok = data.train_tokenizer((t for _, t in train_src), data.VOCAB_SIZE)
        data.save_tokenizer(tok, model_dir)
        print(f"[prepare] tokenizer ({tok.get_vocab_size()} tokens) -> {model_dir}")
    tok = data.load_tokenizer(model_dir)
    held_path = model_dir / data.HELDOUT_RELPATH
    if args.rebuild_heldout or not held_path.exists():
        text, names = data.build_heldout_text(sources, args.also_stdlib)
        held_path.parent.mkdir(parents=True, exist_ok=True)
        held_path.write_text(text, encoding="utf-8")
        (held_path.parent / "heldout_files.json").write_text(json.dumps({
            "python": platform.python_version(),
            "rule": f"sha256(relpath)[:8] little-endian % 1000 < {data.HELDOUT_PER_MILLE}, "
                    f"present in every --also-stdlib, <= {data.HELDOUT_MAX_FILE_BYTES} bytes",
            "also_present_in": [Path(p).name for p in args.also_stdlib],
            "files": names}, indent=1))
        print(f"[prepare] held-out text: {len(names)} files, {len(text):,} chars -> {held_path}")
    out = Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    stream = data.encode_documents(tok, [t for _, t in train_src])
    np.save(out / "train_tokens.npy", stream)
    meta = {"tokenizer_sha256": data.file_sha256(model_dir / "tokenizer.json"),
            "python": platform.python_version(), "stdlib": str(args.stdlib or data.stdlib_root()),
            "files": len(train_src), "tokens": int(stream.size),
            "tokens_sha256": data.file_sha256(out / "train_tokens.npy")}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"[prepare] {stream.size:,} training tokens -> {out} ({time.time() - t0:.0f} s)")


def load_train_stream(data_dir: Path, model_dir: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The tokenized training split: from the cache if it matches the tokenizer, else built."""
    tok_sha = data.file_sha256(model_dir / "tokenizer.json")
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("tokenizer_sha256") == tok_sha:
            stream = np.load(data_dir / "train_tokens.npy")
            meta["source"] = "cache"
            return stream, meta
        print(f"[data] {data_dir} was made with another tokenizer; rebuilding", flush=True)
    else:
        print(f"[data] no cache in {data_dir}; tokenizing this machine's stdlib "
              f"(Python {platform.python_version()})", flush=True)
    train_src, _ = data.split_sources(data.stdlib_sources())
    stream = data.encode_documents(data.load_tokenizer(model_dir), [t for _, t in train_src])
    meta = {"tokenizer_sha256": tok_sha, "python": platform.python_version(),
            "stdlib": str(data.stdlib_root()), "files": len(train_src),
            "tokens": int(stream.size), "source": "built on the training machine"}
    return stream, meta


@dataclasses.dataclass(frozen=True)
class Phase:
    seq_len: int
    batch: int
    fraction: float  # of the optimizer steps
    mix: tuple[tuple[str, float], ...] | None = None  # default: MIX


# First the copy circuit (random-token blocks repeated, and repeated spans of real text:
# only copying predicts them), then the full mix from short contexts, where a needle is
# easy to find, to 8K. 32K tokens per step throughout.
COPY_MIX = (("induction", 0.7), ("repeat", 0.3))
FULL_PHASES = (Phase(512, 64, 0.06, COPY_MIX), Phase(512, 64, 0.12), Phase(2048, 16, 0.2),
               Phase(4096, 8, 0.2), Phase(8192, 4, 0.42))
SMOKE_PHASES = (Phase(256, 4, 0.25, COPY_MIX), Phase(256, 4, 0.25), Phase(512, 2, 0.5))
MIX = (("lm", 0.05), ("induction", 0.1), ("repeat", 0.15), ("passkey", 0.4), ("kv", 0.3))


class Batches:
    """Training batches: a mix of plain text, pass-key and key/value sequences."""

    def __init__(self, tasks: data.RetrievalTasks, stream: np.ndarray, seed: int):
        self.tasks = tasks
        self.stream = stream
        self.rng = random.Random(seed)

    def next(self, phase: Phase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs [B, T], targets [B, T], answer mask over targets [B, T] (bool)."""
        toks = np.empty((phase.batch, phase.seq_len + 1), dtype=np.int64)
        mask = np.zeros((phase.batch, phase.seq_len), dtype=bool)
        mix = phase.mix or MIX
        kinds, weights = [k for k, _ in mix], [w for _, w in mix]
        for i in range(phase.batch):
            kind = self.rng.choices(kinds, weights)[0]
            seq, spans = self.tasks.training_sequence(kind, self.rng, self.stream, phase.seq_len)
            toks[i] = seq
            for a, b in spans:  # token a is predicted at input position a - 1
                mask[i, a - 1:b - 1] = True
        t = torch.from_numpy(toks)
        return t[:, :-1], t[:, 1:], torch.from_numpy(mask)


# ---- loss ----------------------------------------------------------------------------------

PENALTIES = ("attn_zloss", "k_mean")  # the auxiliary terms batch_losses may return


def batch_losses(model: TinyLlama, fwd: Any, x: torch.Tensor, y: torch.Tensor,
                 m: torch.Tensor, answer_weight: float = 1.0, attn_zloss: float = 0.0,
                 k_mean_penalty: float = 0.0) -> dict[str, Any]:
    """Losses of one batch (inputs, targets, answer mask; ``fwd`` is the model or its
    compiled form): "lm" (mean over all targets), "answer" (mean over the marked ones),
    "n_answer", and "total" = lm + answer_weight * answer + attn_zloss * "attn_zloss"
    + k_mean_penalty * "k_mean", the last two (:func:`attention_zloss`, :func:`k_mean_sq`,
    averaged over the layers) computed and returned only when a weight is not 0."""
    penalties = bool(attn_zloss or k_mean_penalty)
    with autocast(x.device):
        h, aux = fwd(x, penalties=True) if penalties else (fwd(x), {})
        logits = model.logits(h)
    per_tok = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
    mf = m.flatten().float()
    lm = per_tok.mean()
    n_ans = mf.sum()
    ans = (per_tok * mf).sum() / n_ans.clamp(min=1.0)
    total = lm + answer_weight * ans
    if penalties:
        total = total + attn_zloss * aux["attn_zloss"] + k_mean_penalty * aux["k_mean"]
    return {"total": total, "lm": lm, "answer": ans, "n_answer": n_ans, **aux}


# ---- evaluation ----------------------------------------------------------------------------


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _check_len(ex: data.Example) -> int:
    """Answer tokens to compare: the space, the digits and the token after them."""
    ans = ex.answer_tokens
    n = 0
    saw_digit = False
    for i, t in enumerate(ans):
        is_digit = t in DIGIT_IDS
        if saw_digit and not is_digit:
            return i + 1
        saw_digit |= is_digit
        n = i + 1
    return n


DIGIT_IDS: set[int] = set()


@torch.no_grad()
def retrieval_accuracy(model: TinyLlama, examples: list[data.Example], device: torch.device,
                       batch: int) -> float:
    """Fraction whose greedy answer is right: every answer token up to the one after the
    digits is the argmax given the prompt and the answer so far (teacher forcing gives
    exactly greedy decoding's choices while they are right)."""
    model.eval()
    right = 0
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        p = chunk[0].prompt_len
        n = max(_check_len(e) for e in chunk)
        ids = torch.tensor([e.tokens[:p + n] for e in chunk], device=device)
        with autocast(device):
            h = model(ids[:, :-1])
            pred = model.logits(h[:, p - 1:p - 1 + n]).argmax(-1)
        tgt = ids[:, p:p + n]
        for j, e in enumerate(chunk):
            k = _check_len(e)
            right += bool((pred[j, :k] == tgt[j, :k]).all())
    model.train()
    return right / max(1, len(examples))


@torch.no_grad()
def windows_nll(model: TinyLlama, windows: list[list[int]], device: torch.device,
                batch: int) -> tuple[float, int]:
    """Summed negative log-likelihood of every window token after BOS, and the count."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = torch.tensor(windows[i:i + batch], device=device)
        with autocast(device):
            h = model(ids[:, :-1])
            logits = model.logits(h)
        nll = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    model.train()
    return total, count


def unigram_nll(train_stream: np.ndarray, windows: list[list[int]], vocab: int) -> float:
    """Mean NLL of the windows' targets under add-one-smoothed training token frequencies."""
    counts = np.bincount(train_stream.astype(np.int64), minlength=vocab).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    tgt = np.concatenate([np.asarray(w[1:], dtype=np.int64) for w in windows])
    return float(-logp[tgt].mean())


@torch.no_grad()
def attention_stats(model: TinyLlama, windows: list[list[int]], device: torch.device,
                    n_queries: int = 256) -> dict[str, list]:
    """What makes a model sensitive to KV quantization (docs/quality-notes.md). Per layer
    and query head, over ``n_queries`` random query positions of each window: the largest
    pre-softmax attention logit ("logit_max") and the mean over queries of each query's
    largest ("logit_mean_row_max"); per layer, averaged over windows and KV heads: the
    norm of the keys' mean before RoPE ("k_mean_norm") and the root mean square of what
    is left of each key ("k_rest_rms")."""
    model.eval()
    inputs: list[tuple[Attention, tuple[torch.Tensor, ...]]] = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, a: inputs.append((mod, a[:3]))) for layer in model.model.layers]
    gen = torch.Generator().manual_seed(0)
    top, mean, k_mean, k_rest = [], [], [], []
    try:
        for w in windows:
            inputs.clear()
            pos = torch.randperm(len(w), generator=gen)[:n_queries].to(device)
            with autocast(device):
                model(torch.tensor([w], device=device))
                rows = [attention_logits(*mod.qk(*a), pos).amax(-1)[0] for mod, a in inputs]
                keys = [mod.project(a[0])[1][0].float() for mod, a in inputs]  # [Hkv, T, D]
            top.append(torch.stack([r.amax(-1) for r in rows]))  # [layers, heads]
            mean.append(torch.stack([r.mean(-1) for r in rows]))
            mu = [k.mean(1, keepdim=True) for k in keys]
            k_mean.append(torch.stack([m.norm(dim=-1).mean() for m in mu]))
            k_rest.append(torch.stack([(k - m).pow(2).sum(-1).mean().sqrt()
                                       for k, m in zip(keys, mu, strict=True)]))
    finally:
        for h in hooks:
            h.remove()
    model.train()
    return {"logit_max": torch.stack(top).amax(0).tolist(),
            "logit_mean_row_max": torch.stack(mean).mean(0).tolist(),
            "k_mean_norm": torch.stack(k_mean).mean(0).tolist(),
            "k_rest_rms": torch.stack(k_rest).mean(0).tolist()}


def evaluate(model: TinyLlama, tasks: data.RetrievalTasks, held: np.ndarray,
             train_stream: np.ndarray, device: torch.device, contexts: tuple[int, ...],
             trials: int, ppl_tokens: int, batch_tokens: int) -> dict[str, Any]:
    res: dict[str, Any] = {"retrieval": {}, "perplexity": {}}
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    for ctx in contexts:
        bsz = max(1, batch_tokens // ctx)
        for task in data.TASKS:
            ex = data.eval_grid(tasks, held, task, [ctx], depths, trials, seed=77)
            per_depth = {}
            for d in depths:
                sel = [e for e in ex if e.depth == d]
                per_depth[f"{d:.2f}"] = retrieval_accuracy(model, sel, device, bsz)
            res["retrieval"][f"{task}@{ctx}"] = {
                "accuracy": sum(per_depth.values()) / len(per_depth), "by_depth": per_depth,
                "trials": len(ex)}
        win_len = min(ctx, data.MAX_CONTEXT - 1)
        wins = data.ppl_windows(held, win_len, ppl_tokens)
        nll, n = windows_nll(model, wins, device, bsz)
        uni = unigram_nll(train_stream, wins, model.c.vocab_size)
        res["perplexity"][f"{ctx}"] = {"window": win_len, "tokens": n, "ppl": math.exp(nll / n),
                                       "unigram_ppl": math.exp(uni)}
    wins = data.ppl_windows(held, min(contexts[0], data.MAX_CONTEXT - 1), 4 * contexts[0])
    res["attention"] = {"window": len(wins[0]), "windows": len(wins),
                        **attention_stats(model, wins, device)}
    return res


# ---- export --------------------------------------------------------------------------------


def write_shards(sd: dict[str, torch.Tensor], out: Path) -> list[str]:
    from safetensors.torch import save_file

    order = ["model.embed_tokens.weight"]
    order += sorted((k for k in sd if k.startswith("model.layers.")),
                    key=lambda k: (int(k.split(".")[2]), k))
    order += ["model.norm.weight"]
    assert sorted(order) == sorted(sd), set(sd) ^ set(order)
    shards: list[list[str]] = [[]]
    size = 0
    for k in order:
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > SHARD_LIMIT_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    names = []
    weight_map = {}
    for i, keys in enumerate(shards):
        name = ("model.safetensors" if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({k: sd[k] for k in keys}, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def export(model: TinyLlama, out: Path, model_dir: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.c.hf_config(), indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": data.BOS_ID, "eos_token_id": data.EOS_ID}, indent=1))
    if out.resolve() != model_dir.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy2(model_dir / name, out / name)
        (out / "eval").mkdir(exist_ok=True)
        for f in (model_dir / "eval").glob("*"):
            shutil.copy2(f, out / "eval" / f.name)
    return write_shards(hf_state_dict(model), out)


def load_exported_hf(out: Path):
    from transformers import LlamaForCausalLM

    try:
        return LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    except TypeError:
        return LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()


PROBE_POSITIONS = 6
PROBE_IDS = list(range(0, data.VOCAB_SIZE, 257))[:32]


def reference_prompts(tasks: data.RetrievalTasks, held: np.ndarray) -> list[list[int]]:
    text = [data.BOS_ID] + held[:63].tolist()
    ex = tasks.eval_example("passkey", random.Random("reference"), held, 300, 0.5)
    return [text, ex.prompt]


def logits_record(logits: torch.Tensor) -> list[dict[str, Any]]:
    """A few rows of [T, V] float32 logits: positions spread over T, top-5 and probes."""
    t = logits.shape[0]
    positions = sorted({round(i * (t - 1) / (PROBE_POSITIONS - 1)) for i in range(PROBE_POSITIONS)})
    rows = []
    for p in positions:
        row = logits[p]
        top = torch.topk(row, 5)
        rows.append({"position": p, "top5_ids": top.indices.tolist(),
                     "top5_logits": [round(float(x), 5) for x in top.values],
                     "probe_logits": [round(float(row[i]), 5) for i in PROBE_IDS],
                     "mean": round(float(row.mean()), 5), "std": round(float(row.std()), 5)})
    return rows


@torch.no_grad()
def verify_and_reference(model: TinyLlama, out: Path, shard_names: list[str],
                         prompts: list[list[int]]) -> dict[str, Any]:
    """Own model (bf16-rounded weights, float32, CPU) vs the exported files loaded by
    transformers; the recorded reference logits are transformers' (own model's if
    transformers cannot load them here, which is then reported)."""
    own = TinyLlama(model.c)
    own.load_state_dict({k: v.float() for k, v in hf_state_dict(model).items()})
    own.eval()
    own_logits = [own.logits(own(torch.tensor([p])))[0] for p in prompts]
    result: dict[str, Any] = {"prompts": prompts, "probe_ids": PROBE_IDS,
                              "files": {n: data.file_sha256(out / n) for n in shard_names}}
    try:
        import transformers

        hf = load_exported_hf(out)
        hf_logits = [hf(torch.tensor([p])).logits[0].float() for p in prompts]
        diffs = [float((a - b).abs().max()) for a, b in zip(own_logits, hf_logits, strict=True)]
        result["transformers_version"] = transformers.__version__
        result["max_abs_diff_own_vs_transformers"] = max(diffs)
        result["reference_source"] = "transformers"
        ref = hf_logits
    except Exception as e:  # noqa: BLE001 - report, keep the run's results
        result["transformers_error"] = f"{type(e).__name__}: {e}"[:2000]
        result["reference_source"] = "own model (float32, CPU)"
        ref = own_logits
    result["torch_version"] = torch.__version__
    result["records"] = [logits_record(r) for r in ref]
    return result


# ---- plots, bundle -------------------------------------------------------------------------


def plot_loss(log: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    curve = log["curve"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    def smooth(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
        k = max(1, len(pts) // 100)
        xs, ys = [], []
        for i in range(0, len(pts), k):
            part = pts[i:i + k]
            xs.append(part[-1][0])
            ys.append(sum(v for _, v in part) / len(part))
        return xs, ys

    axes[0].plot(*smooth(curve, "lm_loss"), label="LM loss (all tokens)")
    axes[0].plot(*smooth(curve, "answer_loss"), label="answer-token loss", alpha=0.8)
    ev = log["evals"]
    if ev:
        axes[0].plot([e["step"] for e in ev], [e["heldout_loss"] for e in ev], "o-",
                     label="held-out loss (current context)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats / token")
    for b in log["phase_starts"][1:]:
        axes[0].axvline(b, color="gray", ls=":")
        axes[1].axvline(b, color="gray", ls=":")
    axes[0].legend()
    axes[0].set_title(f"{log['model_name']}: training ({log['train_seconds']:.0f} s on "
                      f"{log['device']})", fontsize=9)
    if ev:
        axes[1].plot([e["step"] for e in ev], [e["passkey_acc"] for e in ev], "o-",
                     label="pass key")
        axes[1].plot([e["step"] for e in ev], [e["kv_acc"] for e in ev], "s-", label="key/value")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("greedy accuracy at the current context")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def bundle(out: Path, dest: Path) -> list[str]:
    """The shards as they are plus meta.tar of every other file: at most 8 files in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(out.rglob("*")):
            if f.is_file() and not f.name.endswith(".safetensors"):
                tar.add(f, arcname=f.relative_to(out).as_posix())
    (dest / "meta.tar").write_bytes(buf.getvalue())
    written.append("meta.tar")
    for f in sorted(out.glob("*.safetensors")):
        shutil.copy2(f, dest / f.name)
        written.append(f.name)
    assert len(written) <= 8, written
    return written


# ---- training ------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def phase_of(step: int, total: int, phases: tuple[Phase, ...]) -> tuple[int, Phase]:
    bound = 0.0
    for i, ph in enumerate(phases):
        bound += ph.fraction
        if step < round(bound * total) or i == len(phases) - 1:
            return i, ph
    raise AssertionError


def phase_starts(total: int, phases: tuple[Phase, ...]) -> list[int]:
    starts, bound = [], 0.0
    for ph in phases:
        starts.append(round(bound * total))
        bound += ph.fraction
    return starts


def train(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    smoke = args.smoke
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and not smoke:
        raise SystemExit("training the full model needs a CUDA GPU (use --smoke on CPU)")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model_dir = Path(args.model_dir)
    out = Path(args.out)
    cfg = SMOKE_MODEL if smoke else ModelConfig()
    phases = SMOKE_PHASES if smoke else FULL_PHASES

    tok = data.load_tokenizer(model_dir)
    assert tok.get_vocab_size() == cfg.vocab_size, tok.get_vocab_size()
    tasks = data.RetrievalTasks(tok)
    DIGIT_IDS.update(tok.token_to_id(str(d)) for d in range(10))
    stream, data_meta = load_train_stream(Path(args.data), model_dir)
    held = data.heldout_tokens(model_dir, tok)
    print(f"[train] device {device}; {stream.size:,} training tokens ({data_meta['source']}), "
          f"{held.size:,} held-out tokens; data ready in {time.time() - t_start:.1f} s",
          flush=True)

    model = TinyLlama(cfg)
    model.init_weights(args.seed)
    if not args.no_plant:
        model.plant_induction_heads(args.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]

    def make_opt(lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                 fused=device.type == "cuda")

    fwd = torch.compile(model) if args.compile else model

    def to_dev(*ts: torch.Tensor) -> list[torch.Tensor]:
        if device.type == "cuda":
            return [t.pin_memory().to(device, non_blocking=True) for t in ts]
        return list(ts)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(opt: torch.optim.Optimizer, batch: list[torch.Tensor]) -> dict[str, Any]:
        losses = batch_losses(model, fwd, *batch, args.answer_weight, args.attn_zloss,
                              args.k_mean_penalty)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    # -- time per step of each phase, measured as training runs them (the next batch
    # built while the GPU works), with an optimizer at learning rate 0 that leaves the
    # weights as they are; the real optimizer starts fresh afterwards
    probe = Batches(tasks, stream, seed=args.seed + 999)
    probe_opt = make_opt(0.0)
    step_time = []
    warm, timed = (1, 2) if smoke else (2, 4)
    for ph in phases:
        batch = to_dev(*probe.next(ph))
        for _ in range(warm):
            train_step(probe_opt, batch)
            batch = to_dev(*probe.next(ph))
        sync()
        t0 = time.perf_counter()
        for _ in range(timed):
            train_step(probe_opt, batch)
            batch = to_dev(*probe.next(ph))
        sync()
        step_time.append((time.perf_counter() - t0) / timed)
    del probe_opt
    opt = make_opt(args.lr)
    if args.steps:
        total_steps = args.steps
    else:
        per_step = sum(ph.fraction * t for ph, t in zip(phases, step_time, strict=True))
        total_steps = max(50, int(args.train_seconds / per_step))
        if smoke:
            total_steps = min(total_steps, 40)
    print(f"[train] {n_params / 1e6:.2f}M parameters; step times "
          + ", ".join(f"{ph.seq_len}: {t * 1000:.0f} ms" for ph, t in zip(phases, step_time,
                                                                          strict=True))
          + f"; {total_steps} steps", flush=True)

    batches = Batches(tasks, stream, seed=args.seed)
    warmup = max(20, total_steps // 25)
    eval_every = max(10, total_steps // 10)
    curve: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, Any]]] = []
    eval_rng_seed = 4242
    t_train = time.time()
    eval_seconds = 0.0
    tokens_seen = 0
    stopped_early = False

    def flush_curve() -> None:
        for s, losses in pending:
            _, ph = phase_of(s, total_steps, phases)
            curve.append({"step": s, "lm_loss": float(losses["lm"]),
                          "answer_loss": float(losses["answer"])
                          if float(losses["n_answer"]) > 0 else None,
                          "lr": lr_at(s, total_steps, args.lr, warmup), "seq_len": ph.seq_len,
                          "elapsed": round(time.time() - t_train, 2)})
            for key in PENALTIES:
                if key in losses:
                    curve[-1][key] = float(losses[key])
        pending.clear()

    def quick_eval(step: int, ph: Phase) -> None:
        nonlocal eval_seconds
        t0 = time.time()
        rng = random.Random(eval_rng_seed)
        trials = 16 if smoke else 32
        depths = [i / (trials - 1) for i in range(trials)]
        acc = {}
        bsz = max(ph.batch, 65536 // ph.seq_len)
        for task in data.TASKS:
            try:
                ex = [tasks.eval_example(task, rng, held, ph.seq_len - data.ANSWER_MAX_TOKENS,
                                         d) for d in depths]
            except ValueError:  # context too short for this task
                acc[task] = float("nan")
                continue
            acc[task] = retrieval_accuracy(model, ex, device, bsz)
        wins = data.ppl_windows(held, min(ph.seq_len, data.MAX_CONTEXT - 1), ph.seq_len * 4)
        nll, n = windows_nll(model, wins, device, bsz)
        evals.append({"step": step, "seq_len": ph.seq_len, "passkey_acc": acc["passkey"],
                      "kv_acc": acc["kv"], "heldout_loss": nll / n,
                      "elapsed": round(time.time() - t_train, 2)})
        eval_seconds += time.time() - t0
        print(f"[eval] step {step} ctx {ph.seq_len}: held-out loss {nll / n:.3f}, "
              f"pass key {acc['passkey']:.2f}, key/value {acc['kv']:.2f}", flush=True)

    model.train()
    nxt = to_dev(*batches.next(phase_of(0, total_steps, phases)[1]))
    for step in range(total_steps):
        _, ph = phase_of(step, total_steps, phases)
        x, y, m = nxt
        lr = lr_at(step, total_steps, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        losses = train_step(opt, [x, y, m])
        tokens_seen += x.numel()
        pending.append((step, {k: v.detach() for k, v in losses.items()}))
        if step + 1 < total_steps:  # build the next batch while the GPU works
            nxt = to_dev(*batches.next(phase_of(step + 1, total_steps, phases)[1]))
        if step % 10 == 9 or step == total_steps - 1:
            flush_curve()
            c = curve[-1]
            if step % 250 == 249 or smoke:
                recent = [r["answer_loss"] for r in curve[-10:] if r["answer_loss"] is not None]
                ans_txt = f"{sum(recent) / len(recent):.3f}" if recent else "-"
                pen = "".join(f" {k} {c[k]:.1f}" for k in PENALTIES if k in c)
                print(f"[train] step {step + 1}/{total_steps} ctx {ph.seq_len} lr {lr:.2e} "
                      f"lm {c['lm_loss']:.3f} answer {ans_txt}{pen} "
                      f"({time.time() - t_train:.0f} s)", flush=True)
        if (step + 1) % eval_every == 0 or step == total_steps - 1:
            quick_eval(step + 1, ph)
        if not args.steps and time.time() - t_train > args.train_seconds * 1.3 + eval_seconds:
            print(f"[train] over the time budget at step {step + 1}: stopping", flush=True)
            stopped_early = True
            flush_curve()
            break
    sync()
    train_seconds = time.time() - t_train
    steps_done = curve[-1]["step"] + 1 if curve else 0

    # -- final metrics
    t0 = time.time()
    contexts = (512,) if smoke else (2048, 4096, 8192)
    final = evaluate(model, tasks, held, stream, device, contexts,
                     trials=4 if smoke else 40, ppl_tokens=4096 if smoke else 262144,
                     batch_tokens=65536)
    final_eval_seconds = time.time() - t0
    for k, v in final["retrieval"].items():
        print(f"[final] {k}: {v['accuracy']:.3f}  by depth {v['by_depth']}")
    for k, v in final["perplexity"].items():
        print(f"[final] perplexity @{k}: {v['ppl']:.3f} (unigram {v['unigram_ppl']:.1f})")
    att = final["attention"]
    for i, v in enumerate(att["logit_max"]):
        print(f"[final] layer {i}: largest attention logit by head "
              + " ".join(f"{x:.1f}" for x in v)
              + f"; keys' mean {att['k_mean_norm'][i]:.1f}, rest {att['k_rest_rms'][i]:.1f}")

    # -- export, verification, reference logits
    model.cpu()
    shard_names = export(model, out, model_dir)
    ref = verify_and_reference(model, out, shard_names, reference_prompts(tasks, held))
    (out / "reference_logits.json").write_text(json.dumps(ref, indent=1))
    print(f"[export] {shard_names} -> {out}; transformers check: "
          f"{ref.get('max_abs_diff_own_vs_transformers', ref.get('transformers_error'))}",
          flush=True)

    log = {
        "model_name": data.MODEL_NAME if not smoke else data.MODEL_NAME + "-smoke",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "seed": args.seed, "smoke": smoke,
        "model": dataclasses.asdict(cfg), "parameters": n_params,
        "bytes_bf16": sum(v.numel() * 2 for v in model.state_dict().values()),
        "phases": [dataclasses.asdict(p) for p in phases], "mix": dict(MIX),
        "lr": args.lr, "warmup_steps": warmup, "weight_decay": args.weight_decay,
        "answer_weight": args.answer_weight, "compile": args.compile,
        "attn_zloss": args.attn_zloss, "attn_zloss_queries": ATTN_ZLOSS_QUERIES,
        "k_mean_penalty": args.k_mean_penalty,
        "planted_induction_heads": not args.no_plant,
        "steps": total_steps, "steps_done": steps_done, "stopped_early": stopped_early,
        "steps_chosen_by": "--steps" if args.steps else f"--train-seconds {args.train_seconds}",
        "measured_step_seconds": {str(p.seq_len): t for p, t in zip(phases, step_time,
                                                                     strict=True)},
        "tokens_seen": tokens_seen, "train_data": data_meta,
        "heldout_tokens": int(held.size),
        "train_seconds": train_seconds, "eval_seconds_during_training": eval_seconds,
        "final_eval_seconds": final_eval_seconds,
        "phase_starts": phase_starts(total_steps, phases),
        "final": final, "curve": curve, "evals": evals,
        "export_check": {k: ref.get(k) for k in ("max_abs_diff_own_vs_transformers",
                                                  "transformers_error", "transformers_version",
                                                  "reference_source")},
    }
    log["plot"] = plot_loss(log, out / "loss.png") or "loss.png"
    log["total_seconds"] = time.time() - t_start
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    if args.bundle:
        names = bundle(out, Path(args.bundle))
        print(f"[bundle] {names} -> {args.bundle}")
    print(f"[done] {log['total_seconds']:.0f} s in all ({train_seconds:.0f} s training)",
          flush=True)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenizer, held-out text, tokenized training data (CPU)")
    p.add_argument("--stdlib", default=None, help="standard library to read (default: this "
                   "interpreter's)")
    p.add_argument("--also-stdlib", nargs="*", default=[], help="other versions' libraries: "
                   "held-out text comes only from files present in all of them")
    p.add_argument("--rebuild-tokenizer", action="store_true")
    p.add_argument("--rebuild-heldout", action="store_true")
    t = sub.add_parser("train", help="train, evaluate, export")
    t.add_argument("--out", default=str(data.MODEL_DIR))
    t.add_argument("--smoke", action="store_true", help="tiny model, short context, CPU")
    t.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=0, help="optimizer steps (0: fit "
                   "--train-seconds)")
    t.add_argument("--train-seconds", type=float, default=300.0)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--answer-weight", type=float, default=1.0,
                   help="weight of the mean loss over answer tokens, added to the LM loss")
    t.add_argument("--attn-zloss", type=float, default=1e-3, metavar="WEIGHT",
                   help="weight of an auxiliary z-loss on attention (mean squared "
                   "log-sum-exp of the pre-softmax attention logits of "
                   f"{ATTN_ZLOSS_QUERIES} random query positions per sequence and layer) in "
                   "the loss: keeps the attention logits in the range of pretrained LLMs' "
                   "(docs/quality-notes.md); 0: off")
    t.add_argument("--k-mean-penalty", type=float, default=1e-2, metavar="WEIGHT",
                   help="weight of an auxiliary penalty in the loss on the squared norm of "
                   "the keys' mean over each sequence (before RoPE), per layer and KV head: "
                   "the content-free part of K that makes per-token KV quantization cost "
                   "this model far more than pretrained LLMs (docs/quality-notes.md); 0: off")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--no-plant", action="store_true", help="plain random initialization "
                   "(no planted previous-token and induction heads)")
    t.add_argument("--bundle", default=None, help="also write shards + meta.tar here")
    for q in (p, t):
        q.add_argument("--model-dir", default=str(data.MODEL_DIR),
                       help="where the tokenizer and eval/heldout.txt are")
        q.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="tokenized training data")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
