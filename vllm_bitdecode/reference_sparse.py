"""Plain-PyTorch reference of sparse decode (issue #6). Runs on the CPU in float32.

TidalDecode (Yang et al., 2024, arXiv 2410.05076) in BITDECODE's terms; see
docs/sparse-mode-design.md. Per decode request (one query token):

* a **selection layer** attends to the whole sequence and ranks its positions by the
  scaled logit ``scale * <q, k>`` (TidalDecode's ``argTopK(<q, K>)``, before the softmax);
  it keeps the newest token (the query's own, always attended, as in TidalDecode's
  kernels) plus the ``token_budget - 1`` best-ranked older positions;
* a **reuse layer** attends, with an exact softmax, to those positions only.

TidalDecode ranks per query head. BITDECODE's kernels process the query heads of a KV
head together (one GQA group per CTA), so they need one position set per KV head: the
group's query heads are combined by the **maximum** of their logits (``"max_logit"``,
the default). For one query head per KV head this is TidalDecode's rule exactly; for
larger groups a position is kept when any head of the group ranks it high, the closest
single set to TidalDecode's per-head sets, and it needs no softmax normalizer, so the
kernel can rank while it streams. ``"prob_sum"`` (sum of the heads' softmax
probabilities) is here for comparison in quality experiments. ``shared=True`` combines
all query heads of the request into one set used by every KV head.

Ties rank the lower position first. Positions are returned in ascending order.

The pages are read with :mod:`vllm_bitdecode.reference`'s helpers: scores from the
dequantized pages exactly as :func:`reference.paged_attention` sees them (Q rotated like
K when ``rotate_k``), and the selected tokens gathered one by one from their pages
(``page = block_table[pos // block_size]``, ``offset = pos % block_size``), as the sparse
kernel's address arithmetic does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vllm_bitdecode import reference as ref
from vllm_bitdecode.config import DENSE, PAGE_TOKENS, REUSE, SELECT, SparseLayerPlan
from vllm_bitdecode.page_format import PageFormat

DENSE_ROW = -1
"""``Selection.counts`` value of a request shorter than ``min_seq_len``: every layer
decodes it densely."""

AGGREGATES = ("max_logit", "prob_sum")


@dataclasses.dataclass
class Selection:
    """What a selection layer leaves for the reuse layers: the persistent buffer.

    Indexed by the decode row of the batch; every selection layer rewrites every row
    (``counts`` and all ``token_budget`` slots) before any reuse layer reads it.
    """

    positions: torch.Tensor  # [rows, heads (KV heads, or 1 if shared), token_budget] int32
    counts: torch.Tensor  # [rows] int32: selected tokens; DENSE_ROW; 0 for padding rows

    @classmethod
    def allocate(cls, rows: int, heads: int, token_budget: int) -> Selection:
        """Uninitialized on purpose (like the GPU buffer): selection must write every row."""
        return cls(
            torch.empty(rows, heads, token_budget, dtype=torch.int32),
            torch.empty(rows, dtype=torch.int32),
        )


def _check_q(q: torch.Tensor) -> None:
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q must be in the model dtype (bfloat16 or float16), got {q.dtype}")


def _read_sequence(
    cache: torch.Tensor, block_table_row: torch.Tensor, n: int, fmt: PageFormat,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    nblocks = (n + fmt.block_size - 1) // fmt.block_size
    return ref.read_blocks(cache, block_table_row[:nblocks], n, fmt, dtype)


def _query(q_row: torch.Tensor, rotate_k: bool) -> torch.Tensor:
    """[num_heads, D] in the model dtype -> float32, rotated like the stored K."""
    return ref.rotate(q_row) if rotate_k else q_row.float()


def _selection_query(q_row: torch.Tensor, rotate_k: bool) -> torch.Tensor:
    """The query as the selection layer's attention sees it: rotated like K, then rounded
    to the model dtype (the decode kernel's MMA operand), in float32. The selection ranks
    the logits that layer's attention used."""
    return _query(q_row, rotate_k).to(q_row.dtype).float()


# ---- selection --------------------------------------------------------------------------
def logits(qf: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled logits of every query head at every position: [num_heads, n] float32.

    qf: [num_heads, D] float32 (rotated if K is); k: [n, num_kv_heads, D] float32.
    """
    rep = qf.shape[0] // k.shape[1]
    return torch.einsum("hd,nhd->hn", qf, k.repeat_interleave(rep, dim=1)) * scale


def aggregate(
    head_logits: torch.Tensor, num_kv_heads: int, shared: bool, how: str = "max_logit"
) -> torch.Tensor:
    """Combine query-head logits [num_heads, n] into selection scores [heads, n], where
    heads is ``num_kv_heads`` (one set per KV head) or 1 (``shared``)."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate {how!r} is not one of {AGGREGATES}")
    hq, n = head_logits.shape
    s = head_logits if how == "max_logit" else torch.softmax(head_logits, dim=-1)
    s = s.reshape(1 if shared else num_kv_heads, -1, n)
    return s.amax(dim=1) if how == "max_logit" else s.sum(dim=1)


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The newest position plus the ``k - 1`` best-scored older ones, per row of
    ``scores`` [heads, n]; k is clipped to n. Returns [heads, min(k, n)] int64, ascending.
    Ties go to the lower position.

    Two scores the kernel orders otherwise (``selection.cuh``, ``order_key``): it ranks
    +0 above -0 (here equal; both arise where a token's K is all zero, and matter only
    when the k-th best score is exactly 0), and a NaN score below every other (here, in
    torch's descending sort, above; only a broken cache or query has one). The GPU tests'
    near-tie tolerance does not cover them."""
    if type(k) is not int or k <= 0:
        raise ValueError(f"token budget k must be an integer > 0, got {k!r}")
    heads, n = scores.shape
    if n == 0:
        return torch.empty(heads, 0, dtype=torch.int64)
    m = min(k, n)
    older = scores[:, : n - 1]
    # a stable descending sort keeps equal scores in position order: lower first
    order = torch.sort(older, dim=-1, descending=True, stable=True).indices[:, : m - 1]
    newest = torch.full((heads, 1), n - 1, dtype=torch.int64)
    return torch.sort(torch.cat((order, newest), dim=-1), dim=-1).values


def top_k_pages(scores: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Page granularity (docs/sparse-mode-design.md, "Whole pages vs single tokens"): the
    page holding the newest position plus the ``k - 1`` older pages with the best page
    score, the best score of a position in the page, per row of ``scores`` [heads, n];
    pages are ``block_size`` tokens (16 in the backend); k is clipped to the number of
    pages. Returns [heads, min(k, pages)] int64 page indices (position // block_size),
    ascending. Ties go to the lower page."""
    if type(k) is not int or k <= 0:
        raise ValueError(f"page budget k must be an integer > 0, got {k!r}")
    heads, n = scores.shape
    if n == 0:
        return torch.empty(heads, 0, dtype=torch.int64)
    own = (n - 1) // block_size  # the newest position's page, the last one
    older = scores[:, : own * block_size].unflatten(-1, (own, block_size)).amax(-1)
    # the pages ranked as top_k_positions ranks positions: the own page is its "newest",
    # kept whatever its score
    return top_k_positions(torch.cat((older, scores.new_zeros(heads, 1)), dim=-1), k)


def select(
    q: torch.Tensor,  # [rows, num_heads, D], one decode token per row, model dtype
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8
    block_table: torch.Tensor,  # [rows, max_blocks]
    seq_lens: torch.Tensor,  # [rows], including the new token; 0 = padding row
    scale: float,
    fmt: PageFormat,
    rotate_k: bool,
    *,
    token_budget: int,
    min_seq_len: int = 1,
    shared: bool = False,
    how: str = "max_logit",
    out: Selection | None = None,
) -> Selection:
    """What a selection layer writes: top-k positions of every decode row.

    Rows with ``seq_len < min_seq_len`` get ``DENSE_ROW`` and padding rows (seq_len 0)
    get 0; their position slots, like those past a row's count, are set to -1. ``out``
    (a buffer reused across layers and steps) is overwritten entirely.
    """
    return _select(q, cache, block_table, seq_lens, scale, fmt, rotate_k,
                   ("token_budget", token_budget), lambda s: top_k_positions(s, token_budget),
                   min_seq_len, shared, how, out)


def select_pages(
    q: torch.Tensor,  # [rows, num_heads, D], one decode token per row, model dtype
    cache: torch.Tensor,  # [num_blocks, num_kv_heads, head_region_bytes] uint8
    block_table: torch.Tensor,  # [rows, max_blocks]
    seq_lens: torch.Tensor,  # [rows], including the new token; 0 = padding row
    scale: float,
    fmt: PageFormat,
    rotate_k: bool,
    *,
    page_budget: int,
    min_seq_len: int = 1,
    shared: bool = False,
    how: str = "max_logit",
    out: Selection | None = None,
    page_tokens: int = PAGE_TOKENS,
) -> Selection:
    """:func:`select` at page granularity (``granularity: "page"``; ``decode_select`` with
    ``selection_unit=16``): ``positions`` hold the indices of pages of ``page_tokens``
    tokens (position // page_tokens; 16, one tile of the page format, whatever the block
    size) from :func:`top_k_pages`, ``counts`` the number of pages, DENSE_ROW and padding
    rows as in :func:`select`. :func:`pages_to_positions` turns it into the token
    selection the reuse layers attend to."""
    return _select(q, cache, block_table, seq_lens, scale, fmt, rotate_k,
                   ("page_budget", page_budget),
                   lambda s: top_k_pages(s, page_budget, page_tokens), min_seq_len, shared,
                   how, out)


def _select(q, cache, block_table, seq_lens, scale, fmt, rotate_k, named_budget, rank,
            min_seq_len, shared, how, out) -> Selection:
    """select / select_pages: ``rank`` maps a row's scores [heads, n] to its kept indices."""
    _check_q(q)
    name, budget = named_budget
    if type(budget) is not int or budget <= 0:
        raise ValueError(f"{name} must be an integer > 0, got {budget!r}")
    rows, _, _ = q.shape
    num_kv_heads = cache.shape[1]
    heads = 1 if shared else num_kv_heads
    if out is None:
        out = Selection.allocate(rows, heads, budget)
    if out.positions.shape[0] < rows or out.positions.shape[1:] != (heads, budget):
        raise ValueError(
            f"selection buffer {tuple(out.positions.shape)} cannot hold {rows} rows x "
            f"{heads} heads x {budget} positions"
        )
    out.positions.fill_(-1)  # every slot of every row, padding rows included
    out.counts.zero_()
    for i in range(rows):
        n = int(seq_lens[i])
        if n == 0:
            continue
        if n < min_seq_len:
            out.counts[i] = DENSE_ROW
            continue
        k, _ = _read_sequence(cache, block_table[i], n, fmt, q.dtype)
        scores = aggregate(logits(_selection_query(q[i], rotate_k), k, scale), num_kv_heads,
                           shared, how)
        pos = rank(scores)
        out.positions[i, :, : pos.shape[1]] = pos.to(torch.int32)
        out.counts[i] = pos.shape[1]
    return out


def pages_to_positions(pages: Selection, seq_lens: torch.Tensor, block_size: int) -> Selection:
    """The token selection of a page selection: every position of each selected page
    below the row's length, ascending, so the reuse layers' :func:`sparse_attention`
    reads it. Counts become token counts; DENSE_ROW and padding rows stay."""
    rows, heads, page_budget = pages.positions.shape
    out = Selection(torch.full((rows, heads, page_budget * block_size), -1, dtype=torch.int32),
                    pages.counts.clone())
    offsets = torch.arange(block_size, dtype=torch.int64)
    for i in range(rows):
        c = int(pages.counts[i])
        if c <= 0:
            continue
        n = int(seq_lens[i])
        # every head keeps the row's own page, the only partial one, last
        count = (c - 1) * block_size + n - (n - 1) // block_size * block_size
        tokens = pages.positions[i, :, :c].long()[..., None] * block_size + offsets
        out.positions[i, :, :count] = tokens.flatten(1)[:, :count].to(torch.int32)
        out.counts[i] = count
    return out


def cache_tiles(pages: Selection, block_table: torch.Tensor, block_size: int,
                page_tokens: int = PAGE_TOKENS) -> torch.Tensor:
    """Each selected page's place in the cache, as ``decode_select`` writes its
    ``sel_cache_tiles`` for ``decode_sparse``: page ``p`` of row ``r`` is tile ``p % t`` of
    block ``block_table[r, p // t]``, so ``block_table[r, p // t] * t + p % t`` with ``t =
    block_size // page_tokens`` pages per block. [rows, heads, page_budget] int32; slots
    past a row's count (and every slot of a DENSE_ROW or padding row) -1."""
    if block_size % page_tokens:
        raise ValueError(f"block_size {block_size} is not a multiple of {page_tokens}")
    per_block = block_size // page_tokens
    out = torch.full_like(pages.positions, -1)
    for i in range(pages.positions.shape[0]):
        c = int(pages.counts[i])
        if c <= 0:
            continue
        page = pages.positions[i, :, :c].long()
        out[i, :, :c] = (block_table[i].long()[page // per_block] * per_block +
                         page % per_block).to(torch.int32)
    return out


# ---- sparse attention -------------------------------------------------------------------
def gather_tokens(
    cache: torch.Tensor, block_table_row: torch.Tensor, positions: torch.Tensor,
    fmt: PageFormat, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the tokens at ``positions`` [m] of one sequence, each from its own page.

    Returns K, V float32 [m, num_kv_heads, D] (K rotated if it was stored rotated).
    """
    bs = fmt.block_size
    positions = positions.long()
    pages = block_table_row[positions // bs]
    k, v = ref.read_blocks(cache, pages, positions.numel() * bs, fmt, dtype)
    rows = torch.arange(positions.numel()) * bs + positions % bs
    return k[rows], v[rows]


def sparse_attention(
    q: torch.Tensor,  # [rows, num_heads, D], one decode token per row, model dtype
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selection: Selection,
    scale: float,
    fmt: PageFormat,
    rotate_k: bool,
) -> torch.Tensor:
    """What a reuse layer computes: exact softmax attention over the selected positions.

    Rows marked ``DENSE_ROW`` attend to their whole sequence, rows with count 0 (padding)
    output zeros. Returns float32 [rows, num_heads, D].
    """
    _check_q(q)
    rows, hq, d = q.shape
    num_kv_heads = cache.shape[1]
    rep = hq // num_kv_heads
    heads = selection.positions.shape[1]
    out = torch.zeros(rows, hq, d, dtype=torch.float32)
    for i in range(rows):
        count = int(selection.counts[i])
        if count == 0:
            continue
        if count == DENSE_ROW:
            qsl = torch.tensor([0, 1])
            out[i] = ref.paged_attention(
                q[i : i + 1], cache, block_table[i : i + 1], seq_lens[i : i + 1], qsl, scale,
                fmt, rotate_k,
            )[0]
            continue
        qf = _query(q[i], rotate_k)
        for h in range(num_kv_heads):
            pos = selection.positions[i, h if heads > 1 else 0, :count]
            k, v = gather_tokens(cache[:, h : h + 1], block_table[i], pos, fmt, q.dtype)
            group = slice(h * rep, (h + 1) * rep)
            out[i, group] = ref.attention(qf[None, group], k, v, scale, causal=False)[0]
    return out


# ---- one decode step through every layer ------------------------------------------------
def decode_step(
    plan: SparseLayerPlan,
    queries: Sequence[torch.Tensor],  # per layer: [rows, num_heads, D]
    caches: Sequence[torch.Tensor],  # per layer: [num_blocks, num_kv_heads, region] uint8
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fmt: PageFormat,
    rotate_k: bool,
    *,
    token_budget: int,
    min_seq_len: int = 1,
    shared: bool = False,
    how: str = "max_logit",
    buffer: Selection | None = None,
) -> list[torch.Tensor]:
    """The attention outputs of one decode step, layer by layer in order, with one
    selection buffer handed from the selection layers to the reuse layers (as the
    metadata builder's persistent buffer is). Pass ``buffer`` to reuse it across steps."""
    if len(queries) != plan.num_layers or len(caches) != plan.num_layers:
        raise ValueError(f"need queries and caches for all {plan.num_layers} layers")
    outputs = []
    selected = False
    for layer in range(plan.num_layers):
        q, cache = queries[layer], caches[layer]
        role = plan.role(layer)
        if role == REUSE:
            if not selected:
                raise ValueError(f"reuse layer {layer} comes before any selection layer")
            outputs.append(
                sparse_attention(q, cache, block_table, seq_lens, buffer, scale, fmt, rotate_k)
            )
            continue
        assert role in (DENSE, SELECT)
        qsl = torch.arange(q.shape[0] + 1)
        outputs.append(
            ref.paged_attention(q, cache, block_table, seq_lens, qsl, scale, fmt, rotate_k)
        )
        if role == SELECT:
            buffer = select(
                q, cache, block_table, seq_lens, scale, fmt, rotate_k,
                token_budget=token_budget, min_seq_len=min_seq_len, shared=shared, how=how,
                out=buffer,
            )
            selected = True
    return outputs
