// Host entry points registered as torch ops in bindings.cpp (shapes in comments).
#pragma once

#include <torch/all.h>

#include <optional>

namespace bitdecode {

void quantize_to_pages(const at::Tensor& key,           // [tokens, kv_heads, 128]
                       const at::Tensor& value,         // [tokens, kv_heads, 128]
                       const at::Tensor& slot_mapping,  // [<= tokens] int64, contiguous
                       at::Tensor& cache,               // [blocks, kv_heads, region] uint8
                       const std::optional<at::Tensor>& rotation_signs,  // [128] f32
                       int64_t bits, int64_t group_size, int64_t block_size);

void dequantize_pages(const at::Tensor& cache,        // [blocks, kv_heads, region] uint8
                      const at::Tensor& block_table,  // [seqs, max_blocks] int32
                      const at::Tensor& seq_lens,     // [seqs] int32, tokens to read
                      const at::Tensor& out_start,    // [seqs + 1] int32
                      at::Tensor& key_out,            // [total, kv_heads, 128]
                      at::Tensor& value_out,          // [total, kv_heads, 128]
                      int64_t bits, int64_t group_size, int64_t block_size,
                      int64_t max_tokens);

// Per-channel K mode: dequantize_pages over channel-mode pages, same arguments
// (reference_kc.read_pages_kc); K is meaningful only for full pages. k_param_bits: the
// pages' K (scale, zc) in fp16 (16) or e4m3 (8); the same in every per-channel op.
void dequantize_pages_kc(const at::Tensor& cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& out_start,
                         at::Tensor& key_out, at::Tensor& value_out, int64_t bits,
                         int64_t group_size, int64_t block_size, int64_t max_tokens,
                         int64_t k_param_bits);

// One query token per sequence (row s of q), or with query_start_loc several: rows
// query_start_loc[s] .. [s + 1] - 1, at most max_query_len, the last at position
// seq_lens[s] - 1, each seeing the positions up to its own (speculative decoding's drafts).
void decode(at::Tensor& out,                 // [tokens, heads, 128]
            const at::Tensor& q,             // [tokens, heads, 128]
            const at::Tensor& cache,         // [blocks, kv_heads, region] uint8
            const at::Tensor& block_table,   // [seqs, max_blocks] int32
            const at::Tensor& seq_lens,      // [seqs] int32
            at::Tensor& partial_out,         // [splits, seqs, max_query_len, heads, 128] f32
            at::Tensor& partial_lse,         // [splits, seqs, max_query_len, heads] f32
            const std::optional<at::Tensor>& rotation_signs,  // [128] f32
            double softmax_scale, int64_t bits, int64_t group_size, int64_t block_size,
            int64_t num_splits, int64_t min_tiles_per_split,
            const std::optional<at::Tensor>& query_start_loc,  // [seqs + 1] int32
            int64_t max_query_len);

// Sparse decode (reuse layers): row r attends to sel_positions[r, h, :sel_count[r]] of its
// sequence, h = the KV head (0 with shared_selection): positions, or with selection_unit
// 16 the 16-token pages (tiles) whose tokens below seq_len it attends to; sel_count -1
// attends to the whole sequence, 0 writes zeros. Otherwise as decode.
void decode_sparse(at::Tensor& out,                  // [seqs, heads, 128]
                   const at::Tensor& q,              // [seqs, heads, 128]
                   const at::Tensor& cache,          // [blocks, kv_heads, region] uint8
                   const at::Tensor& block_table,    // [seqs, max_blocks] int32
                   const at::Tensor& seq_lens,       // [seqs] int32
                   const at::Tensor& sel_positions,  // [seqs, kv_heads or 1, budget] int32
                   const at::Tensor& sel_count,      // [seqs] int32
                   at::Tensor& partial_out,          // [splits, seqs, heads, 128] f32
                   at::Tensor& partial_lse,          // [splits, seqs, heads] f32
                   const std::optional<at::Tensor>& rotation_signs,  // [128] f32
                   double softmax_scale, int64_t bits, int64_t group_size, int64_t block_size,
                   int64_t num_splits, int64_t min_tiles_per_split, bool shared_selection,
                   int64_t selection_unit,
                   // [seqs, kv_heads or 1, budget] int32, selection_unit 16 only: the pages
                   // as decode_select wrote them into sel_cache_tiles (no block-table load)
                   const std::optional<at::Tensor>& sel_cache_tiles);

// Per-channel K mode (issue #7): decode over channel-mode pages, each sequence's own page
// (the one holding position seq_len - 1) with its K and V from residual[row_slot[seq]]
// (reference_kc.paged_decode_kc). Otherwise as decode; K is never rotated in this mode.
void decode_kc(at::Tensor& out,                // [seqs, heads, 128]
               const at::Tensor& q,            // [seqs, heads, 128]
               const at::Tensor& cache,        // [blocks, kv_heads, region] uint8, channel mode
               const at::Tensor& residual,     // [slots, 2, kv_heads, bs, 128] model dtype
               const at::Tensor& block_table,  // [seqs, max_blocks] int32
               const at::Tensor& seq_lens,     // [seqs] int32
               const at::Tensor& row_slot,     // [seqs] int32
               at::Tensor& partial_out,        // [splits, seqs, heads, 128] f32
               at::Tensor& partial_lse,        // [splits, seqs, heads] f32
               double softmax_scale, int64_t bits, int64_t group_size, int64_t block_size,
               int64_t num_splits, int64_t min_tiles_per_split, int64_t k_param_bits);

// Selection layer of sparse decode: decode (out as decode writes it) and, from the same
// logits, for every decode row the newest position and the token_budget - 1 older
// positions of the highest scaled logit (the maximum over the query heads of a KV head,
// or of all heads with shared_selection), ascending, into sel_positions[r, h, :];
// sel_count[r] = that count, -1 (dense) for rows shorter than min_seq_len or past the
// key workspace, 0 for padding rows. keys is the workspace (one key per unit and head).
// With selection_unit 16 the same at page granularity: 16-token pages (tiles), each
// scored by its best token, the own page kept, page indices into sel_positions and the
// budget counted in pages (reference_sparse.select_pages).
void decode_select(at::Tensor& out,                  // [seqs, heads, 128]
                   const at::Tensor& q,              // [seqs, heads, 128]
                   const at::Tensor& cache,          // [blocks, kv_heads, region] uint8
                   const at::Tensor& block_table,    // [seqs, max_blocks] int32
                   const at::Tensor& seq_lens,       // [seqs] int32
                   at::Tensor& partial_out,          // [splits, seqs, heads, 128] f32
                   at::Tensor& partial_lse,          // [splits, seqs, heads] f32
                   const std::optional<at::Tensor>& rotation_signs,  // [128] f32
                   double softmax_scale, int64_t bits, int64_t group_size, int64_t block_size,
                   int64_t num_splits, int64_t min_tiles_per_split,
                   at::Tensor& sel_positions,        // [seqs, kv_heads or 1, budget] int32
                   at::Tensor& sel_count,            // [seqs] int32
                   at::Tensor& keys,                 // [(kv_heads or 1) * capacity] int32
                   const at::Tensor& key_offsets,    // [seqs] int64
                   int64_t min_seq_len, bool shared_selection, int64_t selection_unit,
                   // [seqs, kv_heads or 1, budget] int32, written with selection_unit 16:
                   // each listed page's place in the cache, block_table[r][page / (block_size
                   // / 16)] * (block_size / 16) + page % (block_size / 16)
                   const std::optional<at::Tensor>& sel_cache_tiles);

// Per-channel K mode (issue #7): V per token into the pages, every page whose last slot a
// token of this step writes quantized per channel (its earlier keys from the request's
// residual), then the K and V rows of each request's last written page into its residual
// (reference_kc.write_tokens_kc).
void write_tokens_kc(const at::Tensor& key,              // [tokens, kv_heads, 128]
                     const at::Tensor& value,            // [tokens, kv_heads, 128]
                     const at::Tensor& slot_mapping,     // [tokens] int64
                     const at::Tensor& query_start_loc,  // [reqs + 1] int32
                     const at::Tensor& seq_lens,         // [reqs] int32
                     const at::Tensor& row_slot,         // [reqs] int32
                     at::Tensor& cache,                  // [blocks, kv_heads, region] uint8
                     at::Tensor& residual,               // [slots, 2, kv_heads, bs, 128]
                     int64_t bits, int64_t group_size, int64_t block_size,
                     int64_t k_param_bits);

// Decode CTAs that fit on one SM at once (of decode, or decode_kc with channel_k and its
// k_param_bits); the split planner fills whole waves with it.
int64_t decode_ctas_per_sm(const at::Tensor& query_like,  // any CUDA tensor of the query dtype
                           int64_t bits, int64_t group_size, int64_t gqa, bool channel_k,
                           int64_t k_param_bits);

}  // namespace bitdecode
