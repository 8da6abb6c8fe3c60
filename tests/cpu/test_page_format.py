"""Checks of the page layout in ``vllm_bitdecode.page_format``.

The channel orders are checked against the MMA fragment layout written out here
from the PTX ``mma.m16n8k16`` description, not against page_format's own loops, so
a wrong order cannot pass by agreeing with itself.
"""

import pytest

from vllm_bitdecode.page_format import PageFormat

HEAD = 128
BITS = (4, 2)
GROUPS = (32, 64, 128)
BLOCKS = (16, 32, 64, 128)


def _slots_of_word(order, word, vpw):
    """Channels held by the ``vpw`` slots of packed word ``word``, in slot order."""
    return [int(c) for c in order[word * vpw : (word + 1) * vpw]]


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_sizes_and_offsets(bits, group_size, block_size):
    """Every byte count the kernels and the KV-cache spec rely on, from first principles."""
    fmt = PageFormat(HEAD, bits, group_size, block_size)
    assert fmt.row_bytes == HEAD * bits // 8
    assert fmt.row_words * 4 == fmt.row_bytes
    assert fmt.values_per_word * bits == 32
    assert fmt.levels == 2**bits - 1
    assert fmt.groups * group_size == HEAD
    # K row + V row + (scale, zero) x (K, V) x groups, 2 bytes each
    assert fmt.bytes_per_token_head == 2 * fmt.row_bytes + 8 * (HEAD // group_size)
    assert fmt.head_region_bytes == block_size * fmt.bytes_per_token_head
    assert fmt.page_bytes(num_kv_heads=8) == 8 * fmt.head_region_bytes

    # a head region is block_size / 16 tiles of 16 tokens; inside a tile the regions are
    # 16-byte aligned, in order, disjoint and fill it exactly (one bulk copy per tile)
    assert fmt.tiles == block_size // 16
    assert fmt.tiles * fmt.tile_bytes == fmt.head_region_bytes
    regions = [
        (fmt.k_rows_offset, 16 * fmt.row_bytes),
        (fmt.v_rows_offset, 16 * fmt.row_bytes),
        (fmt.params_offset, 16 * fmt.param_bytes_per_token),
    ]
    pos = 0
    for offset, size in regions:
        assert offset % 16 == 0
        assert offset == pos, "regions must be contiguous and non-overlapping"
        pos = offset + size
    assert pos == fmt.tile_bytes
    # tiles and head regions are stacked, so each must start 16-byte aligned too
    assert fmt.tile_bytes % 16 == 0 and fmt.head_region_bytes % 16 == 0


@pytest.mark.parametrize("block_size", BLOCKS)
def test_token_bytes_lie_in_their_tile(block_size):
    """Token t of a page: its K row, V row and params sit in tile t // 16, at row t % 16,
    written out byte for byte (not through tile_field, which the references use)."""
    import torch

    from vllm_bitdecode.page_format import tile_field, tile_tokens

    fmt = PageFormat(HEAD, 4, 64, block_size)
    cache = torch.zeros(2, 3, fmt.head_region_bytes, dtype=torch.uint8)
    rb, pb = fmt.row_bytes, fmt.param_bytes_per_token
    for t in range(block_size):
        tile = t // 16 * fmt.tile_bytes
        cache[1, 2, tile + (t % 16) * rb : tile + (t % 16 + 1) * rb] = 1 + t % 250
        v0 = tile + fmt.v_rows_offset + (t % 16) * rb
        cache[1, 2, v0 : v0 + rb] = 2
        p0 = tile + fmt.params_offset + (t % 16) * pb
        cache[1, 2, p0 : p0 + pb] = 3
    k = tile_tokens(tile_field(cache, fmt.tile_bytes, fmt.k_rows_offset, rb))
    assert k.shape == (2, 3, block_size, rb)
    assert torch.equal(k[1, 2, :, 0], torch.tensor([1 + t % 250 for t in range(block_size)],
                                                    dtype=torch.uint8))
    assert torch.all(tile_field(cache, fmt.tile_bytes, fmt.v_rows_offset, rb)[1, 2] == 2)
    assert torch.all(tile_field(cache, fmt.tile_bytes, fmt.params_offset, pb)[1, 2] == 3)
    assert not cache[0].any() and not cache[1, :2].any()
    # a write through the view lands in the cache
    tile_field(cache, fmt.tile_bytes, fmt.v_rows_offset, rb)[0, 1, block_size // 16 - 1, 15] = 9
    last = (fmt.tiles - 1) * fmt.tile_bytes + fmt.v_rows_offset + 15 * rb
    assert torch.all(cache[0, 1, last : last + rb] == 9) and int(cache[0, 1].sum()) == 9 * rb


@pytest.mark.parametrize("bits", BITS)
def test_channel_orders_are_permutations(bits):
    """Each channel is stored in exactly one slot of a row, for K and for V."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    for order in (fmt.k_channel_of_slot(), fmt.v_channel_of_slot()):
        assert order.shape == (fmt.row_words * fmt.values_per_word,)
        assert sorted(order.tolist()) == list(range(HEAD))


@pytest.mark.parametrize("t", range(4))
@pytest.mark.parametrize("bits", BITS)
def test_k_lane_owns_its_b_fragment_channels(bits, t):
    """Lane quad position t needs rows 2t+{0,1,8,9} of every 16-row k-step of B = K^T."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    order = fmt.k_channel_of_slot()
    vpw = fmt.values_per_word
    words = fmt.row_words // 4
    owned = []
    for w in range(t * words, (t + 1) * words):
        owned += _slots_of_word(order, w, vpw)
    expected = {16 * s + 2 * t + e for s in range(HEAD // 16) for e in (0, 1, 8, 9)}
    assert len(owned) == len(expected)
    assert set(owned) == expected


@pytest.mark.parametrize("bits", BITS)
def test_k_lop3_pairs_are_fragment_registers(bits):
    """``(word >> bits*i) & mask`` gives the half2 (slot i, slot i + vpw/2): it must be a
    B register, i.e. channels (c, c+1) with c even, and in k-step / register order."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    order = fmt.k_channel_of_slot()
    vpw = fmt.values_per_word
    half = vpw // 2
    assert half * bits == 16  # the high element lands in the high half of the 32-bit word
    words_per_lane = fmt.row_words // 4
    ksteps_per_word = vpw // 4  # a lane holds 4 values (2 registers) per k-step
    for word in range(fmt.row_words):
        t, w = divmod(word, words_per_lane)
        slots = _slots_of_word(order, word, vpw)
        for i in range(half):
            lo, hi = slots[i], slots[i + half]
            assert lo % 2 == 0 and hi == lo + 1, (word, i, lo, hi)
            # register i of the word = k-step w*kpw + i//2, register b{i%2} (rows +8 for b1)
            kstep = w * ksteps_per_word + i // 2
            assert lo == 16 * kstep + 8 * (i % 2) + 2 * t, (word, i, lo)


@pytest.mark.parametrize("c", range(8))
@pytest.mark.parametrize("bits", BITS)
def test_v_lane_group_owns_its_n_tile_column(bits, c):
    """Lane group c (= lane/4) holds column c of every 8-channel n-tile: channel c + 8j,
    and slot p of its word h is n-tile h*vpw + p."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    order = fmt.v_channel_of_slot()
    vpw = fmt.values_per_word
    words = fmt.row_words // 8
    owned = []
    for h in range(words):
        slots = _slots_of_word(order, c * words + h, vpw)
        assert slots == [c + 8 * (h * vpw + p) for p in range(vpw)]
        owned += slots
    assert sorted(owned) == [c + 8 * j for j in range(HEAD // 8)]


@pytest.mark.parametrize(("bits", "minimum"), [(4, 3.75), (2, 6.5)])
def test_compression_llama3_8b(bits, minimum):
    """The point of the plugin: > 3.75x / > 6.5x more tokens than a bf16 cache (512 B)."""
    fmt = PageFormat(HEAD, bits, 128, 16)
    assert 2 * HEAD * 2 == 512
    assert fmt.compression_vs(2) == pytest.approx(512 / fmt.bytes_per_token_head)
    assert fmt.compression_vs() > minimum


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(bits=3), "bits"),
        (dict(bits=8), "bits"),
        (dict(head_size=96), "head_size"),
        (dict(head_size=64), "head_size"),
        (dict(head_size=256), "head_size"),
        (dict(group_size=16), "group_size"),
        (dict(group_size=256), "group_size"),
        (dict(block_size=8), "block_size"),
        (dict(block_size=24), "block_size"),
    ],
)
def test_constructor_rejects_unsupported(kwargs, name):
    """Unsupported settings fail loudly at construction, naming the culprit."""
    args = dict(head_size=HEAD, bits=4, group_size=128, block_size=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name) as info:
        PageFormat(**args)
    assert f"{name}={kwargs[name]}" in str(info.value)
