// Plain-data parameter blocks of the BITDECODE kernels. Torch-free: raw pointers,
// int64 strides in elements of the pointed-to type (bytes for the cache).
#pragma once

#include <cstdint>

namespace bitdecode {

// Per-channel K mode (reference_kc.py): K is quantized per channel over K groups of 16
// tokens of a page (one tile), each group with its own (scale, zero) per channel; pages
// hold at most kKCMaxBlockSize tokens (each live request keeps that many exact K and V
// rows).
constexpr int kKCGroupTokens = 16;
constexpr int kKCMaxBlockSize = 128;

// Geometry of one page, mirrored from vllm_bitdecode/page_format.py (the tests check
// that both agree). A head region is block_size / 16 tiles of kTileTokens tokens; token
// t of a page lies in tile t / 16 at row t % 16, and the offsets below are bytes from
// the start of a tile.
constexpr int kTileTokens = 16;
struct PageGeometry {
  int block_size;       // tokens per page, a power of two
  int block_shift;      // log2(block_size)
  int row_bytes;        // packed bytes of one token's K (or V) row
  int param_bytes;      // K and V scale + zero of every group of one token
  int tile_bytes;       // one tile: 16 * (2 * row_bytes + param_bytes); KC: see KCWriteParams
  int v_rows_offset;    // = 16 * row_bytes
  int params_offset;    // = 32 * row_bytes
};

// Bytes from a head region's start to row `offset % 16` of the tile of page offset
// `offset`, in a region starting `field` bytes into every tile with `bytes` per token.
__host__ __device__ __forceinline__ int tile_row(int tile_bytes, int offset, int field,
                                                 int bytes) {
  return offset / kTileTokens * tile_bytes + field + offset % kTileTokens * bytes;
}

// Quantize-on-write: tokens [num_tokens, num_kv_heads, head_size] -> pages.
struct QuantizeParams {
  const void* key;               // [num_tokens, num_kv_heads, head_size]
  const void* value;             // [num_tokens, num_kv_heads, head_size]
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  const int64_t* slot_mapping;   // [num_tokens]; block * block_size + offset, < 0 skips
  uint8_t* cache;                // [num_blocks, num_kv_heads, head_region_bytes]
  int64_t cache_stride_block, cache_stride_head;
  const float* rotation_signs;   // [head_size] or nullptr: no K rotation
  int num_tokens;
  int num_kv_heads;
  PageGeometry page;
};

// Decode attention: one query token per sequence over its quantized pages, or several
// (query_start: the drafts of speculative decoding), each seeing the positions up to its own.
struct DecodeParams {
  const void* q;                 // [num_tokens, num_heads, head_size]
  int64_t q_stride_token, q_stride_head;
  void* out;                     // [num_tokens, num_heads, head_size]
  int64_t out_stride_token, out_stride_head;
  // Sequence s's query tokens are rows query_start[s] .. query_start[s + 1] - 1 of q and
  // out (none, or more than max_query_len: nothing read or written), the last at position
  // seq_lens[s] - 1 and token j of count at seq_lens[s] - count + j, seeing the positions
  // up to its own. They sit beside the query heads in the kernel's MMA columns
  // (gqa * max_query_len <= 16), so every page is read once for all of them. nullptr:
  // one token per sequence, row s (max_query_len 1). Dense per-token kernel only.
  const int32_t* query_start;    // [num_seqs + 1] or nullptr
  int max_query_len;
  const uint8_t* cache;          // [num_blocks, num_kv_heads, head_region_bytes]
  int64_t cache_stride_block, cache_stride_head;
  const int32_t* block_table;    // [num_seqs, max_blocks_per_seq]
  int64_t block_table_stride;
  const int32_t* seq_lens;       // [num_seqs]
  // [num_splits, num_seqs, max_query_len, num_heads, head_size], if num_splits > 1
  float* partial_out;
  float* partial_lse;            // [num_splits, num_seqs, max_query_len, num_heads] (log2)
  const float* rotation_signs;   // [head_size] or nullptr: Q is not rotated
  float softmax_scale;
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int num_splits;                // grid.x; fixed per batch size so CUDA graphs can replay it
  int min_tiles_per_split;       // a split never gets fewer 16-token tiles than this
  PageGeometry page;
  // Sparse decode (reuse layers, docs/sparse-mode-design.md); the dense kernel ignores
  // these fields. A row attends to sel_positions[seq, h, :sel_count[seq]] only, where h is
  // the KV head, or 0 when one set is shared by all KV heads.
  const int32_t* sel_positions;  // [>= num_seqs, num_kv_heads or 1, sel_budget] positions
  int64_t sel_stride_seq, sel_stride_head;
  const int32_t* sel_count;      // [>= num_seqs]: kSelDenseRow, 0 (padding row: zeros) or
                                 // a count; counts above sel_budget are read as sel_budget
  int sel_budget;
  bool sel_shared;
  // Selection unit: 0, sel_positions are token positions (gathered one by one); 4, they
  // are 16-token pages (tiles, token t in tile t / 16; each read whole with one bulk
  // copy), ascending, the last one the sequence's own (partial) tile.
  int sel_unit_shift;
  // nullptr, or with sel_unit_shift 4 the same lists as places in the cache, written by
  // the selection layer beside sel_positions (same strides): tile t of the sequence as
  // block_table[seq][t >> (block_shift - 4)] << (block_shift - 4) | t's tile in its page,
  // so that a reuse layer's first copy waits for one load, not for the list and then the
  // block table.
  const int32_t* sel_cache_tiles;
  // Selection layer (decode_select): the dense kernel also writes, for every unit (token,
  // or 16-token tile with sel_unit_shift 4) of a row with keys (selection_row_has_keys),
  // the order key of its highest scaled logit over the KV head's query heads (all heads
  // with sel_shared, combined with atomicMax) at
  // sel_keys[h * key_capacity + key_offsets[seq] + unit], h the KV head or 0.
  uint32_t* sel_keys;            // [num_kv_heads or 1, key_capacity], nullptr: no keys
  const int64_t* key_offsets;    // [num_seqs] first workspace key of each row
  int64_t key_capacity;          // keys per head in the workspace
  int sel_min_seq_len;           // shorter rows decode densely and get no keys
  // Per-channel K mode (docs/per-channel-k-design.md, section 7); the per-token kernels
  // ignore these fields. A tile is K rows | V rows | V params [16][groups][2] | K params
  // [2][head_size] (every scale, then every zero), page.tile_bytes in all, staged whole;
  // the sequence's own page (the one holding position seq_len - 1) takes its K and V from
  // the residual.
  const void* residual;          // [num_slots, 2 (K, V), num_kv_heads, block_size, head_size]
  const int32_t* row_slot;       // [>= num_seqs] residual slot of each sequence
  bool k_params_fp8;             // K params in e4m3 (256 B per tile), not fp16 (512 B)
};

// sel_count of a row that attends to its whole sequence (reference_sparse.DENSE_ROW).
constexpr int kSelDenseRow = -1;

// Top-k of the selection layer (select_kernel.cuh), over the keys its decode wrote.
struct SelectParams {
  const int32_t* seq_lens;       // [num_seqs]; 0 = padding row
  const int64_t* key_offsets;    // [num_seqs] first workspace key of each row
  uint32_t* keys;                // [num_kv_heads or 1, key_capacity] score keys
  int64_t key_capacity;          // keys per head; rows past it decode densely
  int32_t* sel_positions;        // [>= num_seqs, num_kv_heads or 1, sel_budget], written
  int64_t sel_stride_seq, sel_stride_head;
  int32_t* sel_count;            // [>= num_seqs], written: count | kSelDenseRow | 0
  int sel_budget;                // budget k, in units of 1 << unit_shift tokens
  int unit_shift;                // 0: rank tokens; 4: rank 16-token pages (tiles)
  int num_seqs;
  int min_seq_len;               // rows shorter than this decode densely
  bool shared;                   // one position set for all KV heads (keys reset to 0)
  // nullptr, or with unit_shift 4 the lists again as places in the cache (DecodeParams::
  // sel_cache_tiles), written through the rows' block tables
  int32_t* sel_cache_tiles;      // [>= num_seqs, num_kv_heads or 1, sel_budget], written
  const int32_t* block_table;    // [>= num_seqs, block_table_stride]
  int64_t block_table_stride;
  int tile_shift;                // log2(16-token tiles per page)
};

// Per-channel K mode (issue #7, docs/per-channel-k-design.md): one step's K/V into the
// channel-mode pages and the requests' residuals (reference_kc.write_tokens_kc).
// Tile (16 tokens, one K group): K rows [16][R] | V rows [16][R] | V params [16][groups][2]
// | K params [2 * head_size] (scale and zc of every channel in kc_param_index order, fp16
// or e4m3); offsets below are in a tile.
struct KCWriteParams {
  const void* key;               // [num_tokens, num_kv_heads, head_size]
  const void* value;             // [num_tokens, num_kv_heads, head_size]
  int64_t key_stride_token, key_stride_head;
  int64_t value_stride_token, value_stride_head;
  const int64_t* slot_mapping;   // [num_tokens]; block * block_size + offset, < 0 skips
  const int32_t* query_start_loc;  // [num_reqs + 1]
  const int32_t* seq_lens;       // [num_reqs], context length including this step's tokens
  const int32_t* row_slot;       // [num_reqs] residual slot of each batch row
  uint8_t* cache;                // [num_blocks, num_kv_heads, head_region_bytes]
  int64_t cache_stride_block, cache_stride_head;
  void* residual;                // [num_slots, 2 (K, V), num_kv_heads, block_size, head_size]
  int num_tokens;
  int num_reqs;
  int num_kv_heads;
  int block_size;
  int row_bytes;
  int v_rows_offset;
  int v_params_offset;
  int v_param_bytes;             // V (scale, zero) of every group of one token
  int k_params_offset;
  int tile_bytes;
  bool k_params_fp8;             // K (scale, zc) in e4m3, one byte each, not fp16
};

// Dequantize pages back to the model dtype (prefill over cached, quantized history).
struct DequantizeParams {
  const uint8_t* cache;
  int64_t cache_stride_block, cache_stride_head;
  const int32_t* block_table;    // [num_seqs, max_blocks_per_seq]
  int64_t block_table_stride;
  const int32_t* seq_lens;       // [num_seqs] tokens to read per sequence
  const int32_t* out_start;      // [num_seqs + 1] first output row of each sequence
  void* key_out;                 // [total_tokens, num_kv_heads, head_size] (rotated if stored so)
  void* value_out;               // [total_tokens, num_kv_heads, head_size]
  int num_seqs;
  int num_kv_heads;
  int max_tokens;                // upper bound of seq_lens, sizes the grid
  PageGeometry page;
  int k_params_offset;           // per-channel K pages only: in each tile, its K group's
                                 // K scale[HEAD], then zero[HEAD] (page.tile_bytes is KC's)
  bool k_params_fp8;             // ... in e4m3, one byte each, not fp16
};

}  // namespace bitdecode
