"""tools/simulate_kv_quant.py: the fake quantizers it puts in front of attention."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script
from vllm_bitdecode.page_format import PageFormat
from vllm_bitdecode.reference_kc import KCPageLayout, fake_quant_page_k


@pytest.fixture(scope="module")
def sim():
    return load_script("tools/simulate_kv_quant.py")


def test_mode_names(sim):
    m = sim.Mode.parse("int2-kc-g32")
    assert (m.bits, m.group_size, m.k_per_channel, m.quant_v) == (2, 32, True, True)
    m = sim.Mode.parse("int4-norot-vonly")
    assert (m.bits, m.rotate_k, m.quant_k, m.quant_v) == (4, False, False, True)
    assert sim.Mode.parse("bf16").bits == 16
    with pytest.raises(SystemExit):
        sim.Mode.parse("int3")
    with pytest.raises(SystemExit):
        sim.Mode.parse("int4-g48")


@pytest.mark.parametrize("bits", [4, 2])
def test_per_token_error_within_half_a_step(sim, bits):
    x = torch.randn(3, 2, 37, 128) * torch.linspace(0.1, 4, 128)
    y = sim.fake_quant_per_token(x, bits, 32)
    g = x.unflatten(-1, (4, 32))
    step = (g.amax(-1) - g.amin(-1)) / ((1 << bits) - 1)
    err = (y - x).abs().unflatten(-1, (4, 32)).amax(-1)
    assert (err <= step * 0.5 * 1.02 + 1e-2 * step.amax()).all()
    assert (err > 0).any()


@pytest.mark.parametrize("bits", [4, 2])
def test_per_channel_quantizes_full_blocks_and_keeps_the_residual(sim, bits):
    x = torch.randn(1, 2, 300, 128)
    x[..., 5] *= 30  # an outlier channel: per channel it costs the other channels nothing
    y = sim.fake_quant_per_channel(x, bits, 128)
    assert torch.equal(y[..., 256:, :], x[..., 256:, :])  # 44 tokens of residual
    blocks = x[..., :256, :].unflatten(-2, (2, 128))
    step = (blocks.amax(-2) - blocks.amin(-2)) / ((1 << bits) - 1)  # [1, 2, 2, 128]
    err = (y[..., :256, :] - x[..., :256, :]).abs().unflatten(-2, (2, 128)).amax(-2)
    assert (err <= step * 0.5 * 1.02 + 0.05).all()
    assert err[..., 0].amax() < err[..., 5].amax() / 10


def test_rotation_round_trips_and_bf16_mode_only_rounds(sim):
    k, v = torch.randn(1, 1, 20, 128), torch.randn(1, 1, 20, 128)
    kb, vb = sim.quantize_kv(k, v, sim.Mode.parse("bf16"))
    assert torch.equal(kb, k.to(torch.bfloat16).float())
    assert torch.equal(vb, v.to(torch.bfloat16).float())
    kq, vq = sim.quantize_kv(k, v, sim.Mode.parse("int4-vonly"))
    assert torch.equal(kq, kb) and not torch.equal(vq, vb)
    kr, _ = sim.quantize_kv(k, v, sim.Mode.parse("int4-konly"))
    rel = float((kr - k).norm() / k.norm())
    assert 0.01 < rel < 0.15  # quantized in the rotated basis, rotated back


def test_perturbation_hooks_change_outputs_and_are_removed(sim):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        ref = model(ids).logits
        with sim.perturbed_row_parallel_outputs(model, 1e-2, seed=0):
            a = model(ids).logits
        with sim.perturbed_row_parallel_outputs(model, 1e-2, seed=0):
            b = model(ids).logits
        after = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, ref)  # seeded, and it does perturb
    assert 0 < float((a - ref).abs().max()) < 0.1 * float(ref.abs().max())
    assert torch.equal(after, ref)  # hooks removed


@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (2, 32)])
def test_own_page_mode_is_the_specification_of_channel_mode(sim, bits, group_size):
    """-kc-own-vexact computes what reference_kc.canonical_attention_kc specifies (and
    the backend's k_mode="channel" is tested against): earlier pages per channel (K) and
    per token (V), the own page's K and V exact."""
    from vllm_bitdecode import reference_kc as kc
    from vllm_bitdecode.page_format import PageFormat

    gen = torch.Generator().manual_seed(bits)
    t, heads, kv_heads, d = 53, 4, 2, 128  # 3 full pages and a partial one
    q = torch.randn(1, heads, t, d, generator=gen).to(torch.bfloat16)
    k = (torch.randn(1, kv_heads, t, d, generator=gen) * 2).to(torch.bfloat16)
    v = torch.randn(1, kv_heads, t, d, generator=gen).to(torch.bfloat16)
    mode = sim.Mode.parse(f"int{bits}-kc-own-g{group_size}-vexact")
    got = sim.own_page_attention(q, k, v, mode, d**-0.5)[0]  # [t, heads, d]
    layout = kc.KCPageLayout(PageFormat(d, bits, group_size, sim.OWN_BLOCK))
    expected = kc.canonical_attention_kc(q[0].transpose(0, 1), torch.arange(t),
                                         k[0].transpose(0, 1), v[0].transpose(0, 1), d**-0.5,
                                         layout)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    with pytest.raises(SystemExit):
        sim.Mode.parse("int4-own-b32")  # K groups of N tokens are per-channel K's


def test_exact_window_suffixes(sim):
    """-b<N> / -w<N> / -vexact: with the exact block covering the whole sequence and V exact
    in it, nothing is quantized (bf16 attention); with -vexact alone V of the own page is
    exact, so the result moves toward bf16."""
    m = sim.Mode.parse("int2-kc-own-g32-b64-vexact")
    assert (m.page, m.window, m.v_window_exact) == (64, 64, True)
    assert sim.Mode.parse("int2-kc-own-w128").window == 128
    assert sim.Mode.parse("int2-kc-own").window == sim.OWN_BLOCK
    for bad in ("int2-kc-w64", "int2-vexact", "int2-kc-own-b32-w48"):
        with pytest.raises(SystemExit):
            sim.Mode.parse(bad)

    gen = torch.Generator().manual_seed(5)
    t, heads, kv_heads, d = 45, 4, 2, 128
    q = torch.randn(1, heads, t, d, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, kv_heads, t, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, kv_heads, t, d, generator=gen).to(torch.bfloat16)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
        is_causal=True).transpose(1, 2)

    def err(name: str) -> float:
        got = sim.own_page_attention(q, k, v, sim.Mode.parse(name), d**-0.5)
        return float((got - exact).norm() / exact.norm())

    assert err("int2-kc-own-g32-w48-vexact") < 1e-5  # one block of 48 covers all 45
    assert err("int2-kc-own-g32-b16-w48") > 1e-2  # V still quantized
    assert err("int2-kc-own-g32-vexact") < err("int2-kc-own-g32") / 1.2


def test_per_token_own_page_mode_keeps_the_own_block_exact(sim):
    """-own without -kc: keys of earlier blocks quantized per token (as the per-token page
    stores them), the query's own block exact; equal to plain per-token attention where
    the window holds every key, and different from it where it does not."""
    gen = torch.Generator().manual_seed(5)
    t, heads, kv_heads, d = 40, 4, 2, 128
    q = torch.randn(1, heads, t, d, generator=gen)
    k = torch.randn(1, kv_heads, t, d, generator=gen) * 2
    v = torch.randn(1, kv_heads, t, d, generator=gen)
    own = sim.own_page_attention(q, k, v, sim.Mode.parse("int4-own-w16-vexact"), d**-0.5)
    whole = sim.own_page_attention(q, k, v, sim.Mode.parse("int4-own-w48-vexact"), d**-0.5)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q, *(x.to(torch.bfloat16).float().repeat_interleave(2, dim=1) for x in (k, v)),
        is_causal=True, scale=d**-0.5).transpose(1, 2)
    assert float((whole - exact).abs().max()) < 1e-5  # one block holds all 40 keys
    assert float((own[:, :16] - exact[:, :16]).abs().max()) < 1e-5  # first block: exact
    assert float((own[:, 16:] - exact[:, 16:]).abs().max()) > 1e-3  # later: quantized


@pytest.mark.parametrize("bits", [4, 2])
def test_fp8_k_params_mode_is_reference_kc_with_8_bit_params(sim, bits):
    """-p8 quantizes pages as reference_kc does with k_param_bits 8 (tested there), and
    only together with -kc-own."""
    assert sim.Mode.parse(f"int{bits}-kc-own-p8").k_params_fp8
    for bad in (f"int{bits}-p8", f"int{bits}-kc-p8", f"int{bits}-own-p8"):
        with pytest.raises(SystemExit):
            sim.Mode.parse(bad)
    gen = torch.Generator().manual_seed(bits)
    k = torch.randn(1, 2, 40, 128, generator=gen) * 0.1 + 12  # far from zero, small range
    mode = sim.Mode.parse(f"int{bits}-kc-own-p8")
    q = torch.randn(1, 4, 40, 128, generator=gen)
    v = torch.randn(1, 2, 40, 128, generator=gen)
    got = sim.own_page_attention(q, k, v, mode, 128**-0.5)
    exact = k.to(torch.bfloat16).float()
    for param_bits, equal in ((8, True), (16, False)):
        keys = torch.cat((fake_quant_page_k(exact[..., :32, :], bits, 16,
                                            k_param_bits=param_bits), exact[..., 32:, :]), -2)
        want = sim._own_page_softmax(q, keys, exact, v, mode, 128**-0.5)
        assert torch.equal(got, want) == equal, f"{param_bits}-bit params"


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_bytes_per_token_match_the_backend_pages(sim, bits, group_size):
    """The bytes a mode reports are what the backend's page of that setting stores: the
    per-token page format, and the channel-K layout with fp16 or e4m3 K parameters."""
    fmt = PageFormat(head_size=128, bits=bits, group_size=group_size, block_size=128)
    per_token = sim.Mode.parse(f"int{bits}-g{group_size}")
    assert per_token.bytes_per_token_head() == fmt.bytes_per_token_head
    for suffix, param_bits in (("", 16), ("-p8", 8)):
        channel = sim.Mode.parse(f"int{bits}-g{group_size}-kc-own-vexact-w128{suffix}")
        layout = KCPageLayout(fmt, param_bits)
        assert channel.bytes_per_token_head() == layout.head_region_bytes / fmt.block_size


def test_bytes_per_token_of_other_k_groups_and_unquantized_halves(sim):
    """K groups longer than the backend's 16 tokens (simulation only) spread the same
    per-channel parameters over more tokens; an unquantized K or V stays bf16."""
    assert sim.Mode.parse("bf16").bytes_per_token_head() == 512
    assert sim.Mode.parse("int2-kc-own-vexact-b32-w128-p8").bytes_per_token_head() == 76
    assert sim.Mode.parse("int2-kc-own-vexact-b128-w128").bytes_per_token_head() == 72
    # KIVI-like -kc: K groups of 128 tokens, so 4 B of K params a token, as V group 128
    assert sim.Mode.parse("int2-kc").bytes_per_token_head() == (32 + 4) + (32 + 4)
    assert sim.Mode.parse("int4-konly").bytes_per_token_head() == 68 + 256
