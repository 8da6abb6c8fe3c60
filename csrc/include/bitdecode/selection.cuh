// What the selection layer's decode (decode_kernel.cuh) and its top-k (select_kernel.cuh)
// agree on: which rows get score keys, and how a score becomes a key.
#pragma once

#include <cstdint>

namespace bitdecode {

// Larger float <=> larger unsigned key; NaN sorts below everything (-inf included), as
// the reset value 0 of the shared workspace does.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) return 0u;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Rows shorter than min_seq_len decode densely and rows past the workspace's capacity
// too: neither gets keys; nor does a row whose row0 is negative (the builder's mark for a
// prompt's chunk on the decode path, which stays dense). row0 is the row's first
// workspace key; a row has one key per selection unit, so counting its tokens here is
// exact for tokens and conservative for pages (the builder leaves one row's tokens of
// slack: score_workspace_keys).
__device__ __forceinline__ bool selection_row_has_keys(int seq_len, int64_t row0,
                                                       int min_seq_len, int64_t capacity) {
  return seq_len >= 1 && seq_len >= min_seq_len && row0 >= 0 && row0 + seq_len <= capacity;
}

// A 16-token tile of a sequence as its place in the cache: the tile's page from the
// row's block table, shifted by tile_shift (pages of 1 << tile_shift tiles), or'd with
// the tile's index in that page. The host checks that every place fits an int32
// (csrc/ops.cpp, check_cache). The reuse kernel takes this from the block table, or
// from the selection layer's top-k, which wrote it (sel_cache_tiles).
__device__ __forceinline__ int cache_tile(const int32_t* table, int tile, int tile_shift) {
  return table[tile >> tile_shift] << tile_shift | (tile & ((1 << tile_shift) - 1));
}

}  // namespace bitdecode
