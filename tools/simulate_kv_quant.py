"""What KV quantization alone costs the shipped model: perplexity with fake-quantized K/V, on CPU.

The quality harness (benchmarks/quality.py) measures each KV mode through vLLM, kernels
included. This script separates the quantization from the kernels: it runs the shipped
model with Hugging Face transformers in float32 on the CPU and rounds K (after RoPE, as
vLLM stores it) and V through ``vllm_bitdecode.reference.quantize``/``dequantize``, the
oracle the kernels are tested against, before a plain softmax attention. If the
perplexities here match the harness's, the loss is the quantizer's, not a kernel bug;
and the variants (K only, V only, smaller groups, per-channel K) show where it comes from.

    python tools/simulate_kv_quant.py                     # default modes, 8 windows of 2K
    python tools/simulate_kv_quant.py --windows 4 --modes int4,int4-g32,int2-kc
    python tools/simulate_kv_quant.py --json build/sim.json
    python tools/simulate_kv_quant.py --modes bf16,int4 --context 3000 --windows 6 --perturb 2e-3

``--perturb`` measures how sensitive each mode is to rounding-sized changes of the hidden
states, such as tensor parallelism's different summation order (#9): with this model, 4-bit
KV turns them into different argmax tokens at about a tenth of the positions.

Mode names: ``int{4,2}`` (K and V per token, group 128, K rotated), suffixes ``-norot``,
``-g32``/``-g64`` (group size), ``-konly``/``-vonly`` (quantize one of them), ``-kc``
(K per channel over blocks of 128 tokens as in KIVI / BitDecoding's KC mode, the last
partial block left unquantized like their fp16 residual; V per token; K is never rotated
there, so ``-kc-norot`` is refused), ``-own`` (the own-page rule at block 16: a query
sees the pages before its own quantized, per channel with ``-kc`` and per token (rotated
unless ``-norot``) without, and its own page's keys exactly; ``-kc-own-vexact`` is what
the backend's ``k_mode="channel"`` computes; per-token ``-own`` is a what-if: the backend
keeps no residual in per-token mode), and
with ``-own``: ``-b<N>`` (K per channel over groups of N tokens instead of 16; with no
``-w``, the query's own N-token group exact), ``-w<N>`` (the exact block is the query's
own block of N tokens, a multiple of the group: the backend's page, with K groups of 16)
and ``-vexact`` (V in that block exact too, like KIVI's fp16 residual of the newest
tokens); with ``-kc-own``: ``-p8`` (the K scale and zc in fp8 e4m3 instead of fp16, half
the parameter bytes). ``bf16`` rounds nothing beyond bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_bitdecode import reference  # noqa: E402
from vllm_bitdecode import stdlib_llama as data  # noqa: E402
from vllm_bitdecode.page_format import PageFormat  # noqa: E402
from vllm_bitdecode.provenance import results_doc, write_results  # noqa: E402

KC_BLOCK = 128
OWN_BLOCK = 16  # vLLM's default block size, the backend's page in channel mode
DEFAULT_MODES = ("bf16,int4,int4-norot,int4-g32,int4-konly,int4-vonly,"
                 "int2,int2-g32,int2-konly,int2-vonly,int2-kc")


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    bits: int = 16
    group_size: int = 128
    rotate_k: bool = True
    quant_k: bool = True
    quant_v: bool = True
    k_per_channel: bool = False
    own_page: bool = False  # the own-page rule at block `page` (K per channel or per token)
    page: int = OWN_BLOCK  # with own_page: tokens of a K group, quantized per channel
    window: int = OWN_BLOCK  # with own_page: tokens of the exact block a query sees (KIVI's R)
    v_window_exact: bool = False  # with own_page: V of that block exact too (KIVI)
    k_params_fp8: bool = False  # with -kc-own: K scale and zc stored in fp8 e4m3, not fp16

    @staticmethod
    def parse(name: str) -> Mode:
        parts = name.split("-")
        if parts[0] == "bf16":
            return Mode(name)
        if parts[0] not in ("int4", "int2"):
            raise SystemExit(f"unknown mode {name!r}")
        kw: dict = {"bits": int(parts[0][3:])}
        for p in parts[1:]:
            if p == "norot":
                kw["rotate_k"] = False
            elif p in ("g32", "g64", "g128"):
                kw["group_size"] = int(p[1:])
            elif p == "konly":
                kw["quant_v"] = False
            elif p == "vonly":
                kw["quant_k"] = False
            elif p == "kc":
                kw["k_per_channel"] = True
            elif p == "own":
                kw["own_page"] = True
            elif p[:1] in "bw" and p[1:].isdigit():
                kw["page" if p[0] == "b" else "window"] = int(p[1:])
            elif p == "vexact":
                kw["v_window_exact"] = True
            elif p == "p8":
                kw["k_params_fp8"] = True
            else:
                raise SystemExit(f"unknown suffix {p!r} in mode {name!r}")
        if kw.keys() & {"page", "window", "v_window_exact"} and not kw.get("own_page"):
            raise SystemExit(f"mode {name!r}: -b<N>, -w<N>, -vexact qualify -own; add -own")
        if kw.get("k_params_fp8") and not (kw.get("own_page") and kw.get("k_per_channel")):
            raise SystemExit(f"mode {name!r}: -p8 stores the per-channel K params; add -kc-own")
        if "page" in kw and not kw.get("k_per_channel"):
            raise SystemExit(f"mode {name!r}: -b<N> is the K group of -kc; add -kc")
        kw.setdefault("window", kw.get("page", OWN_BLOCK))
        if kw["window"] % kw.get("page", OWN_BLOCK):
            raise SystemExit(f"mode {name!r}: the window must be a multiple of the page")
        if kw.get("k_per_channel") and kw.get("rotate_k") is False:
            raise SystemExit(f"mode {name!r}: per-channel K (-kc) is never rotated; drop -norot")
        return Mode(name, **kw)

    def bytes_per_token_head(self, head_size: int = 128) -> float:
        """Bytes a page stores per token and KV head in this mode: codes, the per-token
        (scale, zero) pairs of each group in the model dtype, and with -kc the per-channel
        K (scale, zc) of each K group (fp16, or e4m3 with -p8) spread over its tokens.
        Exact rows (a residual, -vexact) are not counted: they are per request, not per
        token. bf16: 4 * head_size."""
        if self.bits == 16:
            return 4.0 * head_size
        # the backend's own sizes: a packed row, one tensor's per-token params, and the
        # per-channel params of one K group (16 tokens there; any length here)
        fmt = PageFormat(head_size=head_size, bits=self.bits, group_size=self.group_size,
                         block_size=OWN_BLOCK)
        per_token = fmt.row_bytes + fmt.param_bytes_per_token / 2
        v = per_token if self.quant_v else 2.0 * head_size
        if not self.quant_k:
            k = 2.0 * head_size
        elif self.k_per_channel:
            from vllm_bitdecode.reference_kc import KCPageLayout

            k_group = self.page if self.own_page else KC_BLOCK
            group_params = KCPageLayout(fmt, 8 if self.k_params_fp8 else 16).k_group_param_bytes
            k = fmt.row_bytes + group_params / k_group
        else:
            k = per_token
        return k + v


def fake_quant_per_token(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """x [..., head_size] -> quantized and dequantized per token (the page format)."""
    fmt = PageFormat(head_size=x.shape[-1], bits=bits, group_size=group_size, block_size=16)
    codes, scale, zero = reference.quantize(x, fmt, torch.bfloat16)
    return reference.dequantize(codes, scale, zero, fmt)


def fake_quant_per_channel(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """x [B, H, T, D]: min/max per channel over each full block of ``block`` tokens; the
    tokens after the last full block stay as they are (the residual)."""
    levels = (1 << bits) - 1
    t_full = x.shape[-2] // block * block
    if t_full == 0:
        return x
    xb = x[..., :t_full, :].unflatten(-2, (t_full // block, block)).float()
    lo = xb.amin(dim=-2, keepdim=True).to(torch.bfloat16).float()
    hi = xb.amax(dim=-2, keepdim=True)
    s = ((hi - lo) / levels).to(torch.bfloat16).float()
    q = torch.where(s > 0, torch.clamp(torch.round((xb - lo) / s.clamp(min=1e-30)), 0, levels),
                    torch.zeros_like(xb))
    deq = (q * s + lo).flatten(-3, -2)
    return torch.cat([deq.to(x.dtype), x[..., t_full:, :]], dim=-2)


def quantize_kv(key: torch.Tensor, value: torch.Tensor, mode: Mode):
    """key, value [B, kv_heads, T, D] as vLLM would read them back from the cache."""
    key, value = key.to(torch.bfloat16).float(), value.to(torch.bfloat16).float()
    if mode.bits == 16:
        return key, value
    if mode.quant_k:
        if mode.k_per_channel:
            key = fake_quant_per_channel(key, mode.bits, KC_BLOCK)
        elif mode.rotate_k:  # rotate, quantize, rotate back (orthonormal: q.k unchanged)
            rot = reference.rotation_matrix(key.shape[-1])
            key = fake_quant_per_token(key @ rot, mode.bits, mode.group_size) @ rot.T
        else:
            key = fake_quant_per_token(key, mode.bits, mode.group_size)
    if mode.quant_v:
        value = fake_quant_per_token(value, mode.bits, mode.group_size)
    return key, value


def own_page_attention(query, key, value, mode: Mode, scaling):
    """The own-page rule: a query at position p attends to K of pages before p // bs
    quantized per channel over the page, and to K of its own page exactly; V per token.
    With ``mode.window`` > the page, the exact block is the query's own block of that many
    tokens (pages are still quantized per channel over ``mode.page`` tokens); with
    ``mode.v_window_exact``, V in that block is exact too, as in KIVI's residual."""
    from vllm_bitdecode.reference_kc import fake_quant_page_k

    key_exact = key.to(torch.bfloat16).float()
    if not mode.k_per_channel:  # per token, as the per-token page stores every key
        key_q = quantize_kv(key, value, dataclasses.replace(mode, quant_v=False))[0]
        return _own_page_softmax(query, key_q, key_exact, value, mode, scaling)
    # K of every full group of mode.page tokens per channel with the kernels' rounding and
    # stored form (fp16 scale and zc, since 2026-11-30; results committed before that date
    # used bf16 scale and zero), a partial last group is never quantized for any query: it
    # lies in the exact block
    t_full = key.shape[-2] // mode.page * mode.page
    # -p8: the K params in fp8 e4m3 as k_params="fp8" stores them (zc first, then the
    # scale; reference_kc.quantize_channels_fp8)
    pages_q = fake_quant_page_k(key_exact[..., :t_full, :], mode.bits, mode.page,
                                k_param_bits=8 if mode.k_params_fp8 else 16)
    key_q = torch.cat((pages_q, key_exact[..., t_full:, :]), dim=-2)
    return _own_page_softmax(query, key_q, key_exact, value, mode, scaling)


def _own_page_softmax(query, key_q, key_exact, value, mode: Mode, scaling):
    """Softmax attention where a query at position p sees keys of blocks before its own
    ``mode.window``-token block as ``key_q`` and those of its own block up to p exactly."""
    value_exact = value.to(torch.bfloat16).float()
    value = value_exact
    if mode.quant_v:
        value = fake_quant_per_token(value_exact, mode.bits, mode.group_size)
    groups = query.shape[1] // key_q.shape[1]
    key_q, key_exact, value, value_exact = (x.repeat_interleave(groups, dim=1)
                                            for x in (key_q, key_exact, value, value_exact))
    q = query.float()
    t = q.shape[-2]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    pos = torch.arange(t)
    page = pos // mode.window
    closed = page[None, :] < page[:, None]  # [query, key]: an earlier page (block)
    own = (page[None, :] == page[:, None]) & (pos[None, :] <= pos[:, None])
    s = torch.where(closed, q @ key_q.transpose(-1, -2), q @ key_exact.transpose(-1, -2))
    s = (s * scale).masked_fill(~(closed | own), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mode.v_window_exact:
        out = (p * closed) @ value + (p * own) @ value_exact
    else:
        out = p @ value
    return out.transpose(1, 2).contiguous()


def make_attention(mode: Mode):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        if mode.own_page:
            return own_page_attention(query, key, value, mode, scaling), None
        key, value = quantize_kv(key, value, mode)
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention


def load_model(model_dir: Path):
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def teacher_forced(model, windows: list[list[int]], mode: Mode) -> tuple[float, torch.Tensor]:
    """Perplexity over ``windows`` and the argmax token at every scored position."""
    from transformers import AttentionInterface

    AttentionInterface.register(f"bitdecode_sim_{mode.name}", make_attention(mode))
    model.config._attn_implementation = f"bitdecode_sim_{mode.name}"
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = model.config._attn_implementation
    nll, n, argmax = 0.0, 0, []
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += len(w) - 1
        argmax.append(logits.argmax(-1))
    return math.exp(nll / n), torch.cat(argmax)


def perplexity(model, windows: list[list[int]], mode: Mode) -> float:
    return teacher_forced(model, windows, mode)[0]


@contextlib.contextmanager
def perturbed_row_parallel_outputs(model, eps: float, seed: int):
    """Multiply every attention and MLP output (the layers tensor parallelism splits by
    rows and all-reduces) by 1 + eps * N(0, 1), elementwise: a stand-in for the rounding
    differences of another summation order (eps ~ 2^-9 to 2^-11 for bf16)."""
    gen = torch.Generator().manual_seed(seed)

    def hook(module, args, out):
        t = out[0] if isinstance(out, tuple) else out
        t = t * (1 + eps * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        return (t, *out[1:]) if isinstance(out, tuple) else t

    handles = [m.register_forward_hook(hook) for layer in model.model.layers
               for m in (layer.self_attn, layer.mlp)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(data.MODEL_DIR))
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--perturb", type=float, default=0.0, metavar="EPS",
                    help="also run each mode with its attention / MLP outputs perturbed by "
                         "a relative EPS (seeds 0 and 1) and report how far that moves it")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = Path(args.model)
    held = data.heldout_tokens(model_dir, data.load_tokenizer(model_dir))
    windows = data.ppl_windows(held, args.context, (args.context - 1) * args.windows)
    model = load_model(model_dir)
    rows = []
    base = None
    for name in args.modes.split(","):
        mode = Mode.parse(name.strip())
        t0 = time.time()
        ppl, argmax = teacher_forced(model, windows, mode)
        base = base if base is not None else (ppl if mode.bits == 16 else None)
        pct = 100 * (ppl / base - 1) if base else float("nan")
        stored = mode.bytes_per_token_head(model.config.head_dim)
        row = {"mode": mode.name, **dataclasses.asdict(mode), "ppl": ppl, "vs_bf16_pct": pct,
               "bytes_per_token_head": stored}
        print(f"{mode.name:<14} ppl {ppl:10.3f}  {pct:+8.1f}%  {stored:5.0f} B a token and "
              f"head ({time.time() - t0:.0f} s)", flush=True)
        row["perturbed"] = []
        for seed in (0, 1) if args.perturb else ():
            with perturbed_row_parallel_outputs(model, args.perturb, seed):
                p_ppl, p_argmax = teacher_forced(model, windows, mode)
            moved = {"seed": seed, "ppl_change_pct": 100 * (p_ppl / ppl - 1),
                     "argmax_agreement": float((p_argmax == argmax).float().mean())}
            row["perturbed"].append(moved)
            print(f"{'':<14} perturbed by {args.perturb:.1e} (seed {seed}): ppl "
                  f"{moved['ppl_change_pct']:+.2f}%, argmax agrees at "
                  f"{100 * moved['argmax_agreement']:.1f}% of positions", flush=True)
        rows.append(row)
    if args.json:
        write_results(results_doc("cpu", model=data.MODEL_NAME, context=args.context,
                                  windows=args.windows, perturb=args.perturb,
                                  tokens=sum(len(w) - 1 for w in windows), rows=rows),
                      Path(args.json))


if __name__ == "__main__":
    main()
