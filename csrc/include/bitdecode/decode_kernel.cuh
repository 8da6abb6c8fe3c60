// Split-K paged decode attention over quantized pages, on tensor cores.
//
// Grid (num_splits, num_kv_heads, num_seqs), 4 warps. A CTA owns one KV head of one
// sequence and a contiguous range of 16-token tiles; warp w takes tiles w, w+4, w+8, ...
// of that range and streams them through its own ring of shared-memory buffers, filled
// by the bulk-copy engine (cp.async.bulk + one mbarrier per buffer): a tile is one
// contiguous region of its page (page_format.py), so one copy per tile at every block
// size. Nothing in flight sits in registers and the warps never wait for each other
// until the final merge.
//
// The products are computed transposed, so that the few query heads of a GQA group fill
// the MMA's N = 8 dimension instead of padding its M = 16 (with several query tokens per
// sequence, the drafts of speculative decoding, their heads sit side by side there, each
// token's masked past its own position, so that a page is read once for all of them):
//
//   S^T  = K Q^T     mma.m16n8k16, A = 16 tokens x 16 channels of K codes, B = Q^T.
//                    K codes go from the page into A-fragment registers with one lop3
//                    per register (page_format.py's K order) as fp16 M + code * 2^bit
//                    of their slot in the word (M = 1024, HalfSlots), exact, against Q
//                    in fp16 scaled by 2^-e for the CTA and by 2^-bit per slot (except
//                    at V group 64, where K meets Q in the model dtype as M + code, M =
//                    128 for bf16, 1024 for fp16); per-token scale and zero act on the fp32
//                    accumulator, and M comes back through per-slot sums of Q:
//                    S = scale * (Q . codes) + zero * sum(Q), with 2^e in the scale
//   softmax          online, base 2, over steps of one or two 16-token tiles; the output
//                    is rescaled only in steps where some head's running max moved
//   O^T += V^T P^T   A = 16 channels x 16 tokens of V codes, centred (code - 2^(bits-1),
//                    the page's V order), B = P^T: the S^T accumulator times half the
//                    per-token V scale, rounded to 16 bits and transposed in registers
//                    (movmatrix); the end doubles O, and P . (zero + 2^(bits-1) scale)
//                    adds the rest in fp32. fp16 models weight the tokens by 2^k P (the
//                    running maximum less k, fp16_lift_exp), so that small V scales
//                    still give normal fp16 operands; the warp hands on its maximum less
//                    k, which takes the lift back.
//
// The four warps merge through shared memory; with several splits the CTA writes a
// normalized partial output and its log-sum-exp, and combine_kernel reduces them.
//
// SPARSE = true is the reuse-layer kernel of sparse decode (docs/sparse-mode-design.md):
// the same kernel with another producer. A row attends to the list of positions that a
// selection layer left in sel_positions, in tiles of 16 list entries; each entry's K row,
// V row and parameters are gathered from its own page (page = block_table[pos >> shift],
// slot = pos & (block_size - 1), in tile slot / 16) by all 32 lanes with cp.async into a
// ring buffer laid out exactly like a page tile, so unpacking, MMAs and the online
// softmax are untouched and the softmax over the selected tokens is exact. With page
// granularity (sel_unit_shift = 4) the list holds 16-token tiles instead: the kernel
// walks them as the dense kernel walks a sequence, one bulk copy per tile, the last (the
// row's own tile) partial; with the selection layer's sel_cache_tiles the entries are
// the tiles' places in the cache already, so no block-table load. Rows marked
// kSelDenseRow walk their pages as the dense kernel does; rows with count 0 write zeros
// without reading a page.
//
// SELECT = 1 is the selection layer of sparse decode (decode_select): the dense
// kernel that also leaves every token's selection key: the maximum of its S^T column over the
// KV head's query heads (the logits this attention used, log2-scaled, so in the same
// order), made an order key, stored 16 consecutive keys per tile; select_kernel.cuh then
// ranks them. SELECT = 16 (page granularity) stores one key per tile instead, the best of
// its tokens', so that the top-k reads 16 times fewer keys. 0: not a selection layer.
// The K codes are read once for both.
//
// KC = true is per-channel K (docs/per-channel-k-design.md, section 7): every page but the
// sequence's own one holds K codes against one fp16 (scale, zc) per channel and 16-token
// K group, zc = zero + C scale with C = 2^(bits-1), which the tile copy brings along
// (512 bytes). K is dequantized in registers, straight into the A fragments:
//   k_c = (code_c - C) * s_c + zc_c      one HFMA2 per channel pair, fp16
// and the MMA runs in fp16 against Q rounded to the model dtype and then to fp16 (exact
// in fp16's normal range), for both model dtypes: k rounded to fp16 (11 bits) keeps the
// kernel as close to the reference as the former Q' = q * s form did, where bf16 (8 bits)
// measured up to 2.4e-2 in a CPU emulation with an outlier channel, and no per-tile
// rescale of Q, bias or shuffle is left. The price: |K| and |q| must stay below 65504.
// The own page (positions from ((seq_len - 1) / block_size) * block_size on) is read with
// exact K and V: the rows of the sequence's residual slot, loaded straight into A
// fragments (in fp16, converted from bf16 where the model is bf16; at most
// block_size / 16 tiles per sequence); P meets exact V there with
// scale 1/2 and zero 0 in the V algebra below. Earlier pages keep V per token.
// KP8: the K params are stored in e4m3 (256 bytes per tile). The 8 lanes that share a
// quad position need the same parameters, so instead of converting in the fragment path
// (32 conversions per lane and tile) the warp converts the tile's block once into a
// 512-byte fp16 scratch in the same order (lane l: bytes 8l..8l+7, 4 conversions), and
// the fp16 path reads that.
#pragma once

#include <cfloat>
#include <type_traits>

#include "bitdecode/async_copy.cuh"
#include "bitdecode/fragments.cuh"
#include "bitdecode/params.h"
#include "bitdecode/selection.cuh"

namespace bitdecode {

constexpr int kDecodeWarps = 4;  // a tile (params.h, kTileTokens) is one k-step of P V
constexpr int kMaxGqa = 16;      // query heads per KV head: two MMA N tiles

// Compile-time shape of one decode instantiation. HEAD_TILES = 1 serves up to 8 query
// heads per KV head, 2 up to 16.
template <typename T, int HEAD, int BITS, int GROUP, int HEAD_TILES, bool KC = false,
          bool KP8 = false>
struct DecodeShape {
  using Order = RowOrder<HEAD, BITS>;
  static constexpr int kGroups = HEAD / GROUP;
  static constexpr int kHeads = 8 * HEAD_TILES;
  static constexpr int kRowBytes = Order::kRowBytes;
  // per token: (scale, zero) of every group, for K and V (KC: for V only)
  static constexpr int kParamBytes = (KC ? 1 : 2) * 2 * kGroups * static_cast<int>(sizeof(T));
  // A staged tile: K rows [16][kRowBytes], V rows [16][kRowBytes], params [16][kParamBytes],
  // and with KC the fp16 (KP8: e4m3) K params (scale, zc) [2 * HEAD] of the tile's
  // 16-token K group, in kc_param_index order: a tile of the page as it is stored.
  static constexpr int kVOffset = kTileTokens * kRowBytes;
  static constexpr int kParamOffset = 2 * kTileTokens * kRowBytes;
  static constexpr int kKParamOffset = kParamOffset + kTileTokens * kParamBytes;
  static constexpr int kKParamBytes = KC ? 2 * HEAD * (KP8 ? 1 : 2) : 0;
  static_assert(KC || !KP8, "e4m3 K params belong to per-channel pages");
  static constexpr int kTileBytes = kKParamOffset + kKParamBytes;
  static_assert(!KC || kTileTokens == kKCGroupTokens, "a tile is one K group");
  // Tiles per softmax step: 2, or 1 where two tiles' state would spill (group 32 with
  // two head tiles).
  static constexpr int kStepTiles = kGroups * HEAD_TILES >= 8 ? 1 : 2;
  // Buffers per warp: the step being computed plus as many tiles in flight as fit in
  // 44 KB per CTA (four CTAs per SM), at most 8.
  static constexpr int kFit = 44 * 1024 / (kDecodeWarps * kTileBytes);
  static constexpr int kStages = kFit >= 8 ? 8 : kFit;
  static_assert(kStages >= 4, "at least two tiles in flight per warp");
  static constexpr int kRingBytes = kDecodeWarps * kStages * kTileBytes;
  static constexpr int kMergeBytes = kDecodeWarps * kHeads * (HEAD + 2) * 4;
  static constexpr int kSmemBytes = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static_assert(kTileBytes % 16 == 0, "bulk copies move multiples of 16 bytes");
  static_assert(kSmemBytes <= 48 * 1024, "fits the default dynamic shared memory limit");
  static_assert(GROUP % 16 == 0, "an MMA tile of 16 channels lies in one group");
};

// 2^x in one MUFU op; 2^-inf = 0, which masked tokens and empty rows rely on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Online-softmax states (a maximum m, and a sum l and a weighted value a, both scaled by
// 2^-m) of W warps folded into one, scaled to their largest maximum; a warp that saw no
// token (m = -inf) adds nothing, and if none did, l = 0. state_of(w): warp w's state.
struct SoftmaxState {
  float m, l, a;
};
template <int W, typename StateOf>
__device__ __forceinline__ SoftmaxState fold_states(StateOf state_of) {
  SoftmaxState r{-INFINITY, 0.0f, 0.0f};
#pragma unroll
  for (int w = 0; w < W; ++w) r.m = fmaxf(r.m, state_of(w).m);
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const SoftmaxState s = state_of(w);
    const float f = s.m == -INFINITY ? 0.0f : fast_exp2(s.m - r.m);
    r.l += s.l * f;
    r.a += s.a * f;
  }
  return r;
}

// fp16 models lift the softmax weights P by 2^k (decode_kernel's lift_k): the V
// product's B operand is fp16(P * v_scale / 2), and with small V (|V| ~ 1e-4) it fell
// below fp16's smallest normal for small P and kept few bits. k puts the largest x =
// v_scale / 2 at x * 2^k in [2^14, 2^15), so that P <= 2^k keeps the operand under
// fp16's maximum. At most kMaxLiftExp: a nonzero fp16 scale is at least 2^-24 (k <= 39),
// and 2^40 per token keeps the weights' sum finite in fp32 whatever the length. At least
// 0: an infinite scale (a group holding inf) lifts nothing, as before.
constexpr int kMaxLiftExp = 40;
__device__ __forceinline__ int fp16_lift_exp(float x) {
  return max(min(141 - (__float_as_int(x) >> 23), kMaxLiftExp), 0);  // x < 2^(e - 126)
}

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* src, uint32_t (&dst)[N]) {
  static_assert(N == 1 || N == 2 || N % 4 == 0, "vector width");
  if constexpr (N == 1) {
    dst[0] = *reinterpret_cast<const uint32_t*>(src);
  } else if constexpr (N == 2) {
    const uint2 r = *reinterpret_cast<const uint2*>(src);
    dst[0] = r.x, dst[1] = r.y;
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const uint4 r = reinterpret_cast<const uint4*>(src)[i];
      dst[4 * i] = r.x, dst[4 * i + 1] = r.y, dst[4 * i + 2] = r.z, dst[4 * i + 3] = r.w;
    }
  }
}

// Selection keys of one tile (see the top): token g + 8 r's best logit over the valid
// heads (8 ht + 2t + c < gqa; the padded heads' zeros must not count), gathered over
// the 4 lanes t of the token, stored by lane t = 0. Every lane takes part (shuffles).
// With UNIT = 16 (page granularity), one key for the tile instead: the best over its
// valid tokens (then over the 8 lane groups g), stored at key_row[token0 / 16].
template <int HT, int UNIT>
__device__ __forceinline__ void store_selection_keys(uint32_t* key_row, const float (&s)[HT][4],
                                                     int token0, int num_tokens, int gqa,
                                                     bool shared, int g, int t) {
  static_assert(UNIT == 1 || UNIT == kTileTokens, "a key per token or per tile");
  auto store = [&](int at, float x) {
    const uint32_t key = order_key(x);
    if (shared) {
      atomicMax(key_row + at, key);
    } else {
      key_row[at] = key;
    }
  };
  float tile = -INFINITY;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float best = -INFINITY;
#pragma unroll
    for (int ht = 0; ht < HT; ++ht)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        if (8 * ht + 2 * t + c < gqa) best = fmaxf(best, s[ht][2 * r + c]);
    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 1));
    best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, 2));
    const int pos = token0 + g + 8 * r;
    if constexpr (UNIT == 1) {
      if (t == 0 && pos < num_tokens) store(pos, best);
    } else if (pos < num_tokens) {
      tile = fmaxf(tile, best);
    }
  }
  if constexpr (UNIT != 1) {
#pragma unroll
    for (int x = 4; x < 32; x *= 2) tile = fmaxf(tile, __shfl_xor_sync(0xffffffffu, tile, x));
    if (g == 0 && t == 0) store(token0 / kTileTokens, tile);
  }
}

// One head tile: 4 CTAs (16 warps) per SM at V groups of 64 or 128, 128 registers with
// no spill in the step loop for every mode (ptxas and tools/sass_loops.py, 2026-11-30; the
// page-selection kernel at V group 64 spills a little, tests/cpu/test_decode_occupancy.py).
// Unbounded, the per-token and sparse
// kernels had crept to 137-161 registers, so 3 CTAs (6 splits instead of 8 at B=8; 0.361
// against 0.346 ms at 8 x 128K in two H200 runs of 2026-11-30, before and after). V groups
// of 32: 3 (154-173 registers; at 4 the loop would spill, and KC's 171 unbounded would
// leave 2). Two head tiles: unbounded.
template <typename T, int HEAD, int BITS, int GROUP, int HEAD_TILES, bool SPARSE = false,
          bool KC = false, int SELECT = 0, bool KP8 = false>
__global__ void __launch_bounds__(kDecodeWarps * 32,
                                  HEAD_TILES == 1 ? (GROUP >= 64 ? 4 : 3) : 1)
    decode_kernel(DecodeParams p) {
  static_assert(!(SPARSE && KC), "sparse decode over per-channel pages is not written");
  static_assert(SELECT == 0 || (!SPARSE && !KC), "a selection layer decodes densely, per token");
  static_assert(SELECT == 0 || SELECT == 1 || SELECT == kTileTokens, "tokens per selection key");
  using Tr = DtypeTraits<T>;
  using Shape = DecodeShape<T, HEAD, BITS, GROUP, HEAD_TILES, KC, KP8>;
  using Order = typename Shape::Order;
  constexpr int kGroups = Shape::kGroups;
  constexpr int kHeads = Shape::kHeads;
  constexpr int HT = HEAD_TILES;
  constexpr int kKSteps = HEAD / 16;  // k-steps of S^T, and m-tiles of O^T
  constexpr int kHalf = Order::kValuesPerWord / 2;
  constexpr int kStages = Shape::kStages;
  constexpr int kStep = Shape::kStepTiles;
  constexpr int R = Shape::kRowBytes, P = Shape::kParamBytes;

  extern __shared__ __align__(128) uint8_t smem[];  // copy rings, then the merge area
  __shared__ float q_smem[kHeads * HEAD];
  __shared__ float qsum_smem[kHeads][kGroups];
  __shared__ float qsum_slots_smem[kHeads][kGroups];  // sum of q / 2^bit(slot): see Q below
  __shared__ float qmax_smem[kDecodeWarps];
  // several query tokens per sequence: where each query row's visible positions end
  __shared__ int row_end_smem[!SPARSE && !KC && SELECT == 0 ? kHeads : 1];
  __shared__ uint64_t bars[kDecodeWarps][kStages];
  __shared__ __align__(16) __half kp_scratch[kDecodeWarps][KP8 ? 2 * HEAD : 8];  // KP8 only

  // the split combine may be scheduled now; it waits for this grid to finish
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int split = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int gqa = p.num_heads / p.num_kv_heads;
  // The CTA's query rows, token-major: row = token * gqa + head in the KV head's group.
  // One token (row seq of q) unless p.query_start gives the sequence several; a sequence
  // with none (a CUDA graph's padding) has nothing to read or write, and neither has one
  // with more than max_query_len (a caller's broken promise, which the host cannot see
  // without a sync): its rows would pass the kernel's 16 and its partials reach into the
  // next sequence's. The combine skips it too, so its output rows stay as they were.
  constexpr bool kQueries = !SPARSE && !KC && SELECT == 0;
  int q_token0 = seq, q_count = 1;
  if constexpr (kQueries) {
    if (p.query_start != nullptr) {
      q_token0 = p.query_start[seq];
      q_count = p.query_start[seq + 1] - q_token0;
      if (q_count <= 0 || q_count > p.max_query_len) return;
    }
  }
  const int q_rows = gqa * q_count;
  // query row `row`: its token in the sequence and its query head
  const SmallDivisor by_gqa(gqa);
  auto row_token = [&](int row) { return kQueries ? int(by_gqa.quotient(row)) : 0; };
  auto row_head = [&](int row) { return kv_head * gqa + row - row_token(row) * gqa; };
  // this lane's 4 channels of query row `row`
  auto q_row = [&](int row) {
    return static_cast<const T*>(p.q) + (q_token0 + row_token(row)) * p.q_stride_token +
           row_head(row) * p.q_stride_head + 4 * lane;
  };
  // The tokens attended to, in order: the whole sequence, or in the sparse kernel
  // (`gather`) the row's selected positions, list entry j at position positions[j].
  int num_tokens = p.seq_lens[seq];
  bool gather = false;     // token positions, gathered one by one
  bool tile_list = false;  // whole 16-token tiles, the last one the own, partial tile
  const int32_t* positions = nullptr;
  // A split's share of a row's tiles (the same for every split but the last).
  auto tiles_per_split = [&](int tiles) {
    return max((tiles + p.num_splits - 1) / p.num_splits, p.min_tiles_per_split);
  };
  // Tile lists: a row that selected its whole budget (the usual case) has a tile range
  // that does not depend on its count, so this warp's first two windows of list entries
  // are loaded now, beside the count, and not after it: one dependent global load less
  // in a kernel of a few microseconds. -1: not loaded.
  int pre_first_tile = -1;
  int pre_tile[2] = {-1, -1};
  // the tile list's entries are places in the cache already (DecodeParams::sel_cache_tiles)
  bool cache_tiles = false;
  if constexpr (SPARSE) {
    cache_tiles = p.sel_unit_shift != 0 && p.sel_cache_tiles != nullptr;
    const int32_t* row_positions = (cache_tiles ? p.sel_cache_tiles : p.sel_positions) +
                                   seq * p.sel_stride_seq +
                                   (p.sel_shared ? 0 : kv_head) * p.sel_stride_head;
    if (p.sel_unit_shift != 0) {
      pre_first_tile = split * tiles_per_split(p.sel_budget) + warp;
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        const int idx = pre_first_tile + kDecodeWarps * (32 * w + lane);
        if (idx < p.sel_budget) pre_tile[w] = row_positions[idx];
      }
    }
    const int count = p.sel_count[seq];
    if (count != kSelDenseRow) {
      const int c = min(max(count, 0), p.sel_budget);
      positions = row_positions;
      if (p.sel_unit_shift == 0) {
        gather = true;
        num_tokens = c;
      } else {  // the list's tiles as one sequence: all full but the last
        tile_list = true;
        const int own = ((num_tokens - 1) & (kTileTokens - 1)) + 1;  // the own tile's tokens
        num_tokens = c == 0 ? 0 : (c - 1) * kTileTokens + own;
      }
    }
  }
  const int num_tiles = (num_tokens + kTileTokens - 1) / kTileTokens;
  // KC: the first position of the own page (a multiple of 16, so no tile straddles it)
  // and the sequence's exact K and V rows of this KV head in its residual slot
  int own_begin = num_tokens;
  const T* residual_k = nullptr;
  const T* residual_v = nullptr;
  if constexpr (KC) {
    if (num_tokens > 0) {
      own_begin = ((num_tokens - 1) >> p.page.block_shift) << p.page.block_shift;
      const T* rows = static_cast<const T*>(p.residual);
      residual_k = kc_residual_rows<HEAD>(rows, p.row_slot[seq], 0, p.num_kv_heads, kv_head,
                                          p.page.block_size);
      residual_v = kc_residual_rows<HEAD>(rows, p.row_slot[seq], 1, p.num_kv_heads, kv_head,
                                          p.page.block_size);
    }
  }
  // selection layer: this row's keys of this KV head (or of all, shared), if it has any
  uint32_t* key_row = nullptr;
  if constexpr (SELECT != 0) {
    if (p.sel_keys != nullptr) {
      const int64_t row0 = p.key_offsets[seq];
      if (selection_row_has_keys(num_tokens, row0, p.sel_min_seq_len, p.key_capacity))
        key_row = p.sel_keys + (p.sel_shared ? 0 : kv_head * p.key_capacity) + row0;
    }
  }
  const int per_split = tiles_per_split(num_tiles);
  const int tile_begin = split * per_split;
  const int tile_end = min(tile_begin + per_split, num_tiles);

  // Query row `row`'s result in channel c: the output (one split), or this split's
  // partial and, with channel 0, its log-sum-exp (log2 domain; -inf: it saw no token).
  auto write_row = [&](int row, int c, float result, float lse) {
    const int token = row_token(row), head = row_head(row);
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(q_token0 + token) * p.out_stride_token +
                             head * p.out_stride_head + c] = Tr::from_float(result);
    } else {
      const int64_t slots = kQueries ? p.max_query_len : 1;  // query tokens per sequence
      const int64_t base =
          ((static_cast<int64_t>(split) * p.num_seqs + seq) * slots + token) * p.num_heads +
          head;
      p.partial_out[base * HEAD + c] = result;
      if (c == 0) p.partial_lse[base] = lse;
    }
  };
  if (tile_begin >= tile_end) {  // nothing to read: an empty split, or no tokens
    // Its writes wait too: when two decode calls follow each other with no kernel
    // between (a caller's own loop; the benchmarks' untimed warm-up calls), the
    // first call's combine triggers this launch at its start and may still be reading
    // the partials. In vLLM's steps the KV-cache write comes between.
    asm volatile("griddepcontrol.wait;" ::: "memory");
    for (int idx = threadIdx.x; idx < q_rows * HEAD; idx += blockDim.x)
      write_row(idx / HEAD, idx % HEAD, 0.0f, -INFINITY);
    return;
  }

  // ---- this warp's tiles, its copy ring, and the block-table entries ahead of it ------
  const int first_tile = tile_begin + warp;
  const int n_local =
      first_tile < tile_end ? (tile_end - first_tile + kDecodeWarps - 1) / kDecodeWarps : 0;
  uint8_t* ring = smem + warp * kStages * Shape::kTileBytes;
  uint64_t* bar = bars[warp];
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbarrier_init(&bar[s], gather ? 32 : 1);
    fence_mbarrier_init();
  }
  __syncwarp();

  const uint8_t* head_base = p.cache + kv_head * p.cache_stride_head;
  // nullptr when the tile list's entries are places in the cache already: the marker
  // itself, not a flag beside it, so that no extra register lives through the tile loop
  // (a flag spilled into it in the 4-bit group-64 one-head-tile kernel)
  const int32_t* table =
      tile_list && cache_tiles ? nullptr : p.block_table + seq * p.block_table_stride;
  const int block_shift = p.page.block_shift;
  auto tile_token0 = [&](int i) { return (first_tile + kDecodeWarps * i) * kTileTokens; };
  // Local tile i's page (tile first_tile + 4 i of the sequence), or with a tile list its
  // place in the cache as page << tile_shift | tile in the page (pages of 1 << tile_shift
  // tiles; the host checks that it fits) for the tile its list entry names. Two
  // encodings, so that kernels without tile lists keep their registers (one encoding for
  // both made the channel-K kernel spill at 2 bits, V group 64).
  const int tile_shift = block_shift - 4;
  // a tile list's entry as that place: read as it is when the list holds places already
  auto list_entry = [&](int listed) {
    return table == nullptr ? listed : cache_tile(table, listed, tile_shift);
  };
  auto table_entry = [&](int i) {
    if (i >= n_local) return 0;
    if (tile_list) return list_entry(positions[first_tile + kDecodeWarps * i]);
    return table[tile_token0(i) >> block_shift];
  };
  // Lane l holds the source address of local tile 32 * window + l, and of the window
  // after it, so the block-table load is never on the path of a copy. Every lane turns
  // its entry into the address when it loads it, so a copy only shuffles it to lane 0.
  int window = 0;
  auto tile_address = [&](int entry, int i) -> uint64_t {  // entry: table_entry(i)
    // the page, and the tile's first token's offset in it (16 x its tile index)
    const int page = tile_list ? entry >> tile_shift : entry;
    const int token_in_page = tile_list ? (entry & ((1 << tile_shift) - 1)) * kTileTokens
                                        : tile_token0(i) & (p.page.block_size - 1);
    const int64_t offset = static_cast<int64_t>(page) * p.cache_stride_block +
                           token_in_page * (Shape::kTileBytes / kTileTokens);
    return reinterpret_cast<uint64_t>(head_base + offset);
  };
  uint64_t addr_cur = 0, addr_next = 0;
  if (tile_list && first_tile == pre_first_tile) {  // the entries loaded at the start
    addr_cur = lane < n_local ? tile_address(list_entry(pre_tile[0]), lane) : 0;
    addr_next = 32 + lane < n_local ? tile_address(list_entry(pre_tile[1]), 32 + lane) : 0;
  } else if (!gather) {
    addr_cur = tile_address(table_entry(lane), lane);
    addr_next = tile_address(table_entry(32 + lane), 32 + lane);
  }

  // Gather: lanes l and l + 16 hold list entry l of the next tile to copy as its page and
  // its slot in the page (slot -1: past the count, not copied), and the entry's position
  // in the tile after, so that the two dependent index loads run a tile ahead of the
  // copies that need them.
  auto position_of = [&](int i) {
    const int idx = tile_token0(i) + lane % kTileTokens;
    return i < n_local && idx < num_tokens ? positions[idx] : -1;
  };
  int gather_page = 0, gather_slot = -1, gather_pos_next = -1;
  auto gather_ahead = [&](int pos, int i_after) {
    gather_page = pos >= 0 ? table[pos >> block_shift] : 0;
    gather_slot = pos >= 0 ? pos & (p.page.block_size - 1) : -1;
    gather_pos_next = position_of(i_after);
  };
  if (gather) gather_ahead(position_of(0), 1);
  // All lanes: copy the 16 entries held in gather_page / gather_slot into ring buffer dst
  // in the layout of a page tile, then arrive on its barrier (initialised for 32 lanes).
  // K and V rows go in 16-byte pieces, consecutive lanes on consecutive pieces of a row.
  auto copy_gathered = [&](uint8_t* dst, uint64_t* b) {
    constexpr int kRowPieces = R / 16;  // 4 at 4 bits, 2 at 2 bits
    constexpr int kRowsPerCopy = 32 / kRowPieces;
    static_assert(R % 16 == 0 && kTileTokens % kRowsPerCopy == 0, "whole K or V rows per copy");
#pragma unroll
    for (int k = 0; k < 2 * kTileTokens / kRowsPerCopy; ++k) {
      const int row = k * kRowsPerCopy + lane / kRowPieces;  // K rows 0-15, V rows 16-31
      const int token = row % kTileTokens, offset = 16 * (lane % kRowPieces);
      const bool is_v = row >= kTileTokens;
      const int page = __shfl_sync(0xffffffffu, gather_page, token);
      const int slot = __shfl_sync(0xffffffffu, gather_slot, token);
      if (slot >= 0) {
        const uint8_t* src = head_base + static_cast<int64_t>(page) * p.cache_stride_block +
                             tile_row(Shape::kTileBytes, slot, is_v ? Shape::kVOffset : 0, R) +
                             offset;
        cp_async<16>(dst + (is_v ? Shape::kVOffset : 0) + token * R + offset, src);
      }
    }
    // parameters: 16 tokens x P bytes in pieces of up to 16 bytes, one piece per lane
    constexpr int kPiece = P < 16 ? P : 16;
    constexpr int kPieces = P / kPiece;  // per token
    static_assert(P % kPiece == 0 && kTileTokens * kPieces <= 32, "one piece per lane");
    const int token = lane / kPieces % kTileTokens, offset = kPiece * (lane % kPieces);
    const int page = __shfl_sync(0xffffffffu, gather_page, token);
    const int slot = __shfl_sync(0xffffffffu, gather_slot, token);
    if (lane < kTileTokens * kPieces && slot >= 0) {
      const uint8_t* src = head_base + static_cast<int64_t>(page) * p.cache_stride_block +
                           tile_row(Shape::kTileBytes, slot, Shape::kParamOffset, P) + offset;
      cp_async<kPiece>(dst + Shape::kParamOffset + token * P + offset, src);
    }
    cp_async_mbarrier_arrive(b);
  };

  // All lanes, i increasing: copy local tile i into ring buffer `stage`.
  auto issue = [&](int i, int stage) {
    if (gather) {
      copy_gathered(ring + stage * Shape::kTileBytes, &bar[stage]);
      gather_ahead(gather_pos_next, i + 2);
      return;
    }
    if (i >= 32 * (window + 1)) {
      ++window;
      addr_cur = addr_next;
      const int j = 32 * (window + 1) + lane;
      addr_next = tile_address(table_entry(j), j);
    }
    const uint64_t addr = __shfl_sync(0xffffffffu, addr_cur, i % 32);
    if (lane == 0) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(addr);
      uint64_t* b = &bar[stage];
      fence_proxy_async_shared();  // the warp's reads of this buffer come first
      mbarrier_arrive_expect_tx(b, Shape::kTileBytes);
      bulk_copy_to_smem(ring + stage * Shape::kTileBytes, src, Shape::kTileBytes, b);
    }
  };
  // This grid may have started while the kernel before it still runs (a programmatic
  // dependent, launch_decode_tiles): in a decode step the KV-cache write, and Q may come
  // from a kernel just before. Read so far: the lengths and block tables, written before
  // the step's first layer, and a reuse layer's selected positions, written by the
  // top-k of an earlier layer, which finished before the write began (a plain launch).
  // Nothing of the pages or of Q is read before this wait.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // Query row `warp` (the only one a warp prepares up to 4 heads per KV head), loaded
  // before the first copies are issued, so that its latency overlaps theirs instead of
  // following it in the Q preparation below. Not in the selection kernels of V groups
  // below 128: their loop spilled with it (page selection, V group 64: 44 bytes;
  // tests/cpu/test_decode_occupancy.py).
  constexpr bool kQFirst = SELECT == 0 || GROUP == 128;
  T q_first[4];
  if constexpr (kQFirst) {
    const T* src = q_row(min(warp, q_rows - 1));
#pragma unroll
    for (int j = 0; j < 4; ++j) q_first[j] = src[j];
  }
  for (int i = 0; i < kStages && i < n_local; ++i) issue(i, i);

  // ---- Q: warp w prepares rows w, w + 4, ...: load, rotate like K, round to T (the
  // values the MMA sees), and sum per group --------------------------------------------
  // (Scaling Q by softmax_scale * log2(e) before the rounding would save a multiply per
  // token and score, but it rounds Q elsewhere than the references do, and a logit's
  // rounding error is relative to the logit: tests/gpu failed by up to 3% on 2026-11-30.)
  // Per-token K (not KC) meets Q in fp16 MMAs whatever the model dtype: fp16's 10
  // mantissa bits hold two 4-bit codes (five 2-bit ones) of a word without a shift
  // (HalfSlots). Q, rounded to T as before, is scaled by 2^-e for the CTA (its largest
  // |q| lands in [2^14, 2^15), exact: fp16 holds bf16's 8 significant bits) and each
  // channel by 2^-bit of its slot; the score scale takes 2^e back, and the fp16 magic's
  // 1024 comes back through the per-slot sum of Q. Not at V group 64, where the second
  // sum's registers made the selection kernels spill 36-52 bytes (the dense, sparse and
  // selection kernels must take the same path: their outputs are compared bit for bit).
  constexpr bool kHalfK = !KC && GROUP != 64;
  using KTr = std::conditional_t<kHalfK, DtypeTraits<__half>, Tr>;  // the K MMA's type
  using KSlots = HalfSlots<BITS>;
  static_assert(HEAD == 32 * 4, "a warp holds one row, 4 channels per lane");
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  float warp_qmax = 0.0f;
  for (int row = warp; row < kHeads; row += kDecodeWarps) {
    if constexpr (kQueries) {  // the row's token sees positions below this (causal)
      if (lane == 0)
        row_end_smem[row] = num_tokens - (row < q_rows ? q_count - 1 - row_token(row) : 0);
    }
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kQFirst && row == warp && row < q_rows) {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = Tr::to_float(q_first[j]);
    } else if (row < q_rows) {
      const T* src = q_row(row);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = Tr::to_float(src[j]);
    }
    if (p.rotation_signs != nullptr) rotate_row_warp(v, p.rotation_signs, lane);
    float part = 0.0f, part_slots = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[j] = Tr::to_float(Tr::from_float(v[j]));
      q_smem[row * HEAD + 4 * lane + j] = v[j];
      part += v[j];
      if constexpr (kHalfK) {
        int word, slot;
        Order::k_slot(4 * lane + j, word, slot);
        part_slots += ldexpf(v[j], -KSlots::bit(slot % kHalf));
        warp_qmax = fmaxf(warp_qmax, fabsf(v[j]));
      }
    }
    constexpr int kLanesPerGroup = GROUP / 4;
#pragma unroll
    for (int x = 1; x < kLanesPerGroup; x *= 2) {
      part += __shfl_xor_sync(0xffffffffu, part, x);
      if constexpr (kHalfK) part_slots += __shfl_xor_sync(0xffffffffu, part_slots, x);
    }
    if (lane % kLanesPerGroup == 0) {
      qsum_smem[row][lane / kLanesPerGroup] = part;
      if constexpr (kHalfK) qsum_slots_smem[row][lane / kLanesPerGroup] = part_slots;
    }
  }
  if constexpr (kHalfK) {
#pragma unroll
    for (int x = 1; x < 32; x *= 2)
      warp_qmax = fmaxf(warp_qmax, __shfl_xor_sync(0xffffffffu, warp_qmax, x));
    if (lane == 0) qmax_smem[warp] = warp_qmax;
  }
  __syncthreads();
  // q_pow2 = 2^-e brings the CTA's largest |Q| into [2^14, 2^15), up or down, so that it
  // fits fp16 with room to spare (1 where Q is all zero or not finite: those rows stay
  // as they are)
  float q_pow2 = 1.0f;
  if constexpr (kHalfK) {
    float qmax = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) qmax = fmaxf(qmax, qmax_smem[w]);
    if (qmax > 0.0f && qmax <= FLT_MAX) q_pow2 = ldexpf(1.0f, min(14 - ilogbf(qmax), 127));
  }
  // the scores' scale: log2(e) / sqrt(d), and 2^e where Q was scaled by 2^-e
  const float score_scale = scale_log2 / q_pow2;
  // B fragments of Q^T: head 8 ht + g, channels of k-step ks, in the K fragments' type:
  // fp16 for KC and kHalfK, else T. kHalfK: scaled by 2^-e and by 2^-bit of the
  // channels' slot (pair j of the word for channels 16 ks + 2t (+1), j + 1 for 8
  // further), all exact.
  using QTr = std::conditional_t<KC || kHalfK, DtypeTraits<__half>, Tr>;
  uint32_t qb[kKSteps][HT][2];
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
    for (int ht = 0; ht < HT; ++ht) {
      const float* r = q_smem + (8 * ht + g) * HEAD + 16 * ks + 2 * t;
      float lo = 1.0f, hi = 1.0f;
      if constexpr (kHalfK) {
        const int j = 2 * (ks % Order::kKStepsPerWord);
        lo = ldexpf(q_pow2, -KSlots::bit(j));
        hi = ldexpf(q_pow2, -KSlots::bit(j + 1));
      }
      qb[ks][ht][0] = QTr::pack(r[0] * lo, r[1] * lo);
      qb[ks][ht][1] = QTr::pack(r[8] * hi, r[9] * hi);
    }
  // heads 8 ht + 2t + c: sum(q) (per-token K: sum(q) 2^-e, for the zero) and the sum of
  // what the MMA saw, sum(q 2^-e 2^-bit), for the magic 1024
  float qsum[HT][2][kGroups];
  float qsum_magic[HT][2][kGroups];
#pragma unroll
  for (int ht = 0; ht < HT; ++ht)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        qsum[ht][c][gi] = qsum_smem[8 * ht + 2 * t + c][gi] * q_pow2;
        qsum_magic[ht][c][gi] = kHalfK ? qsum_slots_smem[8 * ht + 2 * t + c][gi] * q_pow2
                                       : qsum_smem[8 * ht + 2 * t + c][gi];
      }

  // A fragment of K codes (as M + code) for k-step ks: tokens g / g + 8, natural channels
  // 16 ks + 2t (+1) and 16 ks + 2t + 8 (+9), from the page's K order.
  auto k_fragment = [&](const uint32_t (&kw)[2][Order::kKWordsPerLane], int ks,
                        uint32_t (&a)[4]) {
    const int w = ks / Order::kKStepsPerWord, j = 2 * (ks % Order::kKStepsPerWord);
    if constexpr (kHalfK) {  // fp16 1024 + code * 2^bit
      a[0] = unpack_pair_half_slots<BITS>(kw[0][w], j);
      a[1] = unpack_pair_half_slots<BITS>(kw[1][w], j);
      a[2] = unpack_pair_half_slots<BITS>(kw[0][w], j + 1);
      a[3] = unpack_pair_half_slots<BITS>(kw[1][w], j + 1);
    } else {  // T, M + code
      a[0] = unpack_pair_biased<T, BITS>(kw[0][w], j);
      a[1] = unpack_pair_biased<T, BITS>(kw[1][w], j);
      a[2] = unpack_pair_biased<T, BITS>(kw[0][w], j + 1);
      a[3] = unpack_pair_biased<T, BITS>(kw[1][w], j + 1);
    }
  };
  // KC, a page quantized per channel: K dequantized into fp16 A fragments (see the top),
  // scores in the S^T layout (x[ht][2 r + c]: token g + 8 r, head 8 ht + 2t + c), not
  // yet scaled.
  using H = DtypeTraits<__half>;
  auto channel_page_scores = [&](float (&x)[HT][4], const __half* kparams,
                                 const uint32_t (&kw)[2][Order::kKWordsPerLane]) {
#pragma unroll
    for (int ht = 0; ht < HT; ++ht) x[ht][0] = x[ht][1] = x[ht][2] = x[ht][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int w = ks / Order::kKStepsPerWord, j = 2 * (ks % Order::kKStepsPerWord);
      // scale and zc of channels 16 ks + 2t (+1) and 8 further, 16 bytes (kc_param_index)
      const uint4 prm = *reinterpret_cast<const uint4*>(kparams + 32 * ks + 8 * t);
      const uint32_t scale2[2] = {prm.x, prm.y}, zc2[2] = {prm.z, prm.w};
      // a[0] / a[1]: tokens g / g + 8 at channels 16 ks + 2t (+1); a[2] / a[3]: 8 further
      const uint32_t a[4] = {
          H::fma2(unpack_pair_centred<__half, BITS>(kw[0][w], j), scale2[0], zc2[0]),
          H::fma2(unpack_pair_centred<__half, BITS>(kw[1][w], j), scale2[0], zc2[0]),
          H::fma2(unpack_pair_centred<__half, BITS>(kw[0][w], j + 1), scale2[1], zc2[1]),
          H::fma2(unpack_pair_centred<__half, BITS>(kw[1][w], j + 1), scale2[1], zc2[1])};
#pragma unroll
      for (int ht = 0; ht < HT; ++ht) H::mma(x[ht], a, qb[ks][ht][0], qb[ks][ht][1]);
    }
  };
  // KC, the own page: exact K rows from the residual, straight into fp16 A fragments.
  // Rows past the end may hold anything; their scores are masked to -inf afterwards.
  auto own_page_scores = [&](float (&x)[HT][4], int token0) {
    const T* rows = residual_k + static_cast<int64_t>(token0 - own_begin) * HEAD;
#pragma unroll
    for (int ht = 0; ht < HT; ++ht) x[ht][0] = x[ht][1] = x[ht][2] = x[ht][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int c = 16 * ks + 2 * t;
      uint32_t a[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // token g + 8 (k & 1), channels c + 8 (k >> 1) (+1)
        a[k] = *reinterpret_cast<const uint32_t*>(rows + (g + 8 * (k & 1)) * HEAD + c +
                                                  8 * (k >> 1));
        if constexpr (!std::is_same_v<T, __half>) {
          const float2 f = Tr::unpack(a[k]);
          a[k] = H::pack(f.x, f.y);
        }
      }
#pragma unroll
      for (int ht = 0; ht < HT; ++ht) H::mma(x[ht], a, qb[ks][ht][0], qb[ks][ht][1]);
    }
  };

  // ---- stream the tiles ----------------------------------------------------------------
  // Accumulator layouts (c = 0, 1 picks head 8 ht + 2t + c):
  //   S^T  s[ht][2 r + c]       token g + 8 r of the tile
  //   O^T  o[ht][m][2 r + c]    channel 16 m + g + 8 r
  float o[HT][kKSteps][4];
  // O^T holds half of sum(P * v_scale * (code - centre)) (see below); zero_sum the rest
  float zero_sum[HT][2][kGroups];   // sum over this lane's tokens of P * (zero + centre * scale)
  float m_run[HT][2], l_run[HT][2];
  // fp16 models: the weights are exp2(s - m_run + lift_k), not exp2(s - m_run), so P,
  // its sum l_run, o and zero_sum all carry 2^lift_k (fp16_lift_exp of the largest
  // v_scale the warp has read; the same in every lane, since an MMA sums over all lanes'
  // tokens). A larger scale lowers it, which rescales them as a moved maximum does, and
  // the warp hands on m_run - lift_k as its maximum, which takes it back.
  // Per-channel K at every V group, per-token K at group 128 (the default): the sparse
  // kernel at V group 32, and the per-token kernels at group 64 once their output
  // accumulator is in registers (docs/patches/group64-o-registers.patch), have no
  // register left for it (ptxas spilled 4-8 bytes with every form tried), and the dense,
  // sparse and selection kernels of one group must stay equal bit for bit. fp16
  // per-token decode at V groups 32 and 64 keeps the old precision for small V.
  // The subtractions round up, so that P <= 2^lift_k also where the maximum is so large
  // (2^24 and up) that m - lift_k rounds: the same value every time, so that an unmoved
  // step's correction stays exactly 1 and the maximum handed on is the one P used.
  constexpr bool kLiftV = std::is_same<T, __half>::value && (KC || GROUP == 128);
  float lift_k = kMaxLiftExp;
#pragma unroll
  for (int ht = 0; ht < HT; ++ht) {
#pragma unroll
    for (int m = 0; m < kKSteps; ++m) o[ht][m][0] = o[ht][m][1] = o[ht][m][2] = o[ht][m][3] = 0.0f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) zero_sum[ht][0][gi] = zero_sum[ht][1][gi] = 0.0f;
    m_run[ht][0] = m_run[ht][1] = -INFINITY;
    l_run[ht][0] = l_run[ht][1] = 0.0f;
  }

  // Ring position of the next tile to consume, and the barrier phase it completes.
  int stage = 0;
  uint32_t phase = 0;
  // One softmax step over NT tiles (all of them present: no per-tile checks). OWN: the
  // tiles are the KC own page's (exact K and V from the residual), else packed pages.
  // MASKED: tokens past num_tokens get no weight; without it every token counts (the
  // steps before a warp's last tile: only the sequence's last tile can be partial).
  auto run_step = [&](auto num_tiles, auto own_tiles, auto masked_tiles, int i0) {
    constexpr int NT = decltype(num_tiles)::value;
    constexpr bool own = decltype(own_tiles)::value;
    constexpr bool masked = decltype(masked_tiles)::value;
    static_assert(KC || !own, "only per-channel pages have an own page");
    float s[NT][HT][4];
    float v_scale[NT][2][kGroups], v_zero[NT][2][kGroups];
    int stages[NT];

    // S^T of each tile of the step, in the log2 domain
#pragma unroll
    for (int st = 0; st < NT; ++st) {
      const int i = i0 + st;
      stages[st] = stage;
      mbarrier_wait(&bar[stage], phase);
      if (++stage == kStages) stage = 0, phase ^= 1;
      const uint8_t* buf = ring + stages[st] * Shape::kTileBytes;
      const int token0 = tile_token0(i);

      uint32_t kw[2][Order::kKWordsPerLane];  // tokens g, g + 8
      uint32_t prm[2][P / 4];
      bool valid[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        load_words(buf + (g + 8 * r) * R + t * Order::kKWordsPerLane * 4, kw[r]);
        load_words(buf + Shape::kParamOffset + (g + 8 * r) * P, prm[r]);
        valid[r] = !masked || token0 + g + 8 * r < num_tokens;
      }
      // Tokens past the end get no weight and zero V parameters, whatever bytes sit there.
      // V = scale * (code - centre) + (zero + centre * scale); the MMAs see half the
      // scale (exact) so that |code - centre| * scale / 2 stays in range even for a
      // group spanning +-3.4e38, and the end doubles it. fmaf: no overflow on the way.
      auto set_v_params = [&](int r, int gi, const uint32_t& word) {
        const T* vp = reinterpret_cast<const T*>(&word);
        const float vsc = Tr::to_float(vp[0]);
        v_scale[st][r][gi] = valid[r] ? 0.5f * vsc : 0.0f;
        v_zero[st][r][gi] = valid[r] ? fmaf(kCodeCentre<BITS>, vsc, Tr::to_float(vp[1])) : 0.0f;
      };
      if constexpr (KC) {
        float x[HT][4];
        if constexpr (own) {
          own_page_scores(x, token0);
        } else if constexpr (KP8) {  // the tile's e4m3 params -> this warp's fp16 scratch
          const uint2 raw =
              *reinterpret_cast<const uint2*>(buf + Shape::kKParamOffset + 8 * lane);
          const uint4 pairs = make_uint4(e4m3x2_to_half2(raw.x), e4m3x2_to_half2(raw.x >> 16),
                                         e4m3x2_to_half2(raw.y), e4m3x2_to_half2(raw.y >> 16));
          *reinterpret_cast<uint4*>(&kp_scratch[warp][8 * lane]) = pairs;
          __syncwarp();
          channel_page_scores(x, kp_scratch[warp], kw);
          __syncwarp();  // read before the next tile overwrites it
        } else {
          channel_page_scores(x, reinterpret_cast<const __half*>(buf + Shape::kKParamOffset),
                              kw);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int gi = 0; gi < kGroups; ++gi) {
            if constexpr (own) {  // exact V from the residual: P / 2 meets the values themselves
              v_scale[st][r][gi] = valid[r] ? 0.5f : 0.0f;
              v_zero[st][r][gi] = 0.0f;
            } else {
              set_v_params(r, gi, prm[r][gi]);
            }
          }
#pragma unroll
          for (int ht = 0; ht < HT; ++ht)
#pragma unroll
            for (int c = 0; c < 2; ++c)
              s[st][ht][2 * r + c] = valid[r] ? x[ht][2 * r + c] * scale_log2 : -INFINITY;
        }
      } else {
        float acc[kGroups][HT][4];
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi)
#pragma unroll
          for (int ht = 0; ht < HT; ++ht)
            acc[gi][ht][0] = acc[gi][ht][1] = acc[gi][ht][2] = acc[gi][ht][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t a[4];
          k_fragment(kw, ks, a);
#pragma unroll
          for (int ht = 0; ht < HT; ++ht)
            KTr::mma(acc[ks * 16 / GROUP][ht], a, qb[ks][ht][0], qb[ks][ht][1]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float k_scale[kGroups], k_zero[kGroups];
#pragma unroll
          for (int gi = 0; gi < kGroups; ++gi) {
            const T* kp = reinterpret_cast<const T*>(&prm[r][gi]);
            k_scale[gi] = Tr::to_float(kp[0]) * score_scale;
            k_zero[gi] = Tr::to_float(kp[1]) * score_scale;
            set_v_params(r, gi, prm[r][kGroups + gi]);
          }
#pragma unroll
          for (int ht = 0; ht < HT; ++ht)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              // acc = sum Q (M + code): take M sum(Q) back before the scale multiplies, so
              // that a huge scale cannot overflow where the score itself is finite. The
              // first group starts the sum (0 + x is not x for x = -0, so nvcc keeps an add).
              auto group_score = [&](int gi) {
                return k_scale[gi] *
                           fmaf(-KTr::kMagicValue, qsum_magic[ht][c][gi], acc[gi][ht][2 * r + c]) +
                       k_zero[gi] * qsum[ht][c][gi];
              };
              float x = group_score(0);
#pragma unroll
              for (int gi = 1; gi < kGroups; ++gi) x += group_score(gi);
              bool seen = valid[r];
              if constexpr (kQueries && masked)  // a query row sees up to its own token
                seen = token0 + g + 8 * r < row_end_smem[8 * ht + 2 * t + c];
              s[st][ht][2 * r + c] = seen ? x : -INFINITY;
            }
        }
        if constexpr (SELECT != 0) {
          if (key_row != nullptr)
            store_selection_keys<HT, SELECT>(key_row, s[st], token0, num_tokens, gqa,
                                             p.sel_shared, g, t);
        }
      }
    }

    // fp16: the lift for this step, from the largest V scale the warp has read
    float lift_old = 0.0f;  // the exponent before; lift_k is the one after
    if constexpr (kLiftV) {
      float x = 0.0f;
#pragma unroll
      for (int st = 0; st < NT; ++st)
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int gi = 0; gi < kGroups; ++gi) x = fmaxf(x, v_scale[st][r][gi]);
      // the warp's maximum in one redux: non-negative floats order as their bit patterns
      x = __int_as_float(__reduce_max_sync(0xffffffffu, __float_as_int(x)));
      lift_old = lift_k;
      lift_k = fminf(lift_k, static_cast<float>(fp16_lift_exp(x)));
    }

    // online softmax per head over the step's 32 tokens (8 lanes g share a head)
    float corr[HT][2];
    bool moved = false;
#pragma unroll
    for (int ht = 0; ht < HT; ++ht)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float mx = -INFINITY;
#pragma unroll
        for (int st = 0; st < NT; ++st) mx = fmaxf(mx, fmaxf(s[st][ht][c], s[st][ht][2 + c]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m_run[ht][c], mx);
        const float m_top = m_new == -INFINITY ? 0.0f : m_new;
        const float m_use = kLiftV ? __fsub_ru(m_top, lift_k) : m_top;  // fp16: P <= 2^lift_k
        corr[ht][c] =
            fast_exp2((kLiftV ? __fsub_ru(m_run[ht][c], lift_old) : m_run[ht][c]) - m_use);
        moved |= m_new != m_run[ht][c];
        if constexpr (kLiftV) moved |= lift_k != lift_old;
        m_run[ht][c] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int st = 0; st < NT; ++st)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            s[st][ht][2 * r + c] = fast_exp2(s[st][ht][2 * r + c] - m_use);
            sum += s[st][ht][2 * r + c];
          }
        l_run[ht][c] = l_run[ht][c] * corr[ht][c] + sum;
      }
    // Once the running max settles (most of a long sequence), this branch is skipped.
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int ht = 0; ht < HT; ++ht)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float f = corr[ht][k & 1];
#pragma unroll
          for (int m = 0; m < kKSteps; ++m) o[ht][m][k] *= f;
          if (k < 2) {
#pragma unroll
            for (int gi = 0; gi < kGroups; ++gi) zero_sum[ht][k][gi] *= f;
          }
        }
    }

    // O^T += (V codes - centre)^T (P * v_scale / 2)^T, per tile and V group (KC, own
    // page: exact V^T (P / 2)^T)
#pragma unroll
    for (int st = 0; st < NT; ++st) {
      const int token0 = tile_token0(i0 + st);
      const uint8_t* vrows = ring + stages[st] * Shape::kTileBytes + Shape::kVOffset;
      uint32_t vw[4][Order::kVWordsPerLane];  // tokens 2t, 2t+1, 2t+8, 2t+9; channels g + 8j
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int tok = 2 * t + (k & 1) + 8 * (k >> 1);
        load_words(vrows + tok * R + g * Order::kVWordsPerLane * 4, vw[k]);
      }
      // register of V^T codes: channel g + 8j, tokens (2t, 2t+1) [lo = 0] or (2t+8, 2t+9)
      auto v_pair = [&](int j, int lo) {
        const int h = j / Order::kValuesPerWord, slot = j % Order::kValuesPerWord;
        const uint32_t sel = slot < kHalf ? 0x5410u : 0x7632u;
        return unpack_pair_centred<T, BITS>(__byte_perm(vw[lo][h], vw[lo + 1][h], sel),
                                            slot % kHalf);
      };
      // KC, own page: the same register of exact values from the residual's V rows.
      // Tokens past the end read as 0: their rows may hold anything, and 0 * NaN = NaN.
      auto own_v_pair = [&](int j, int lo) {
        const int tok = token0 + 2 * t + 4 * lo;  // lo = 2: tokens 2t + 8, 2t + 9
        const uint16_t* col = reinterpret_cast<const uint16_t*>(residual_v) + g + 8 * j;
        const int64_t row = tok - own_begin;
        const uint32_t first = tok < num_tokens ? col[row * HEAD] : 0u;
        const uint32_t second = tok + 1 < num_tokens ? col[(row + 1) * HEAD] : 0u;
        return first | (second << 16);
      };
#pragma unroll
      for (int gv = 0; gv < kGroups; ++gv) {
        uint32_t pb[HT][2];  // B fragments of (P * v_scale / 2)^T: tokens 2t.. / 2t+8.., head g
#pragma unroll
        for (int ht = 0; ht < HT; ++ht) {
          const float* pr = s[st][ht];
          const float vs0 = v_scale[st][0][gv], vs1 = v_scale[st][1][gv];
          pb[ht][0] = movmatrix_trans(Tr::pack(pr[0] * vs0, pr[1] * vs0));
          pb[ht][1] = movmatrix_trans(Tr::pack(pr[2] * vs1, pr[3] * vs1));
#pragma unroll
          for (int c = 0; c < 2; ++c)
            zero_sum[ht][c][gv] += pr[c] * v_zero[st][0][gv] + pr[2 + c] * v_zero[st][1][gv];
        }
        // O^T channels 16 m .. 16 m + 15 of this V group
        auto v_mma = [&](int m) {
          uint32_t a[4];
          if constexpr (own) {
            a[0] = own_v_pair(2 * m, 0), a[1] = own_v_pair(2 * m + 1, 0);
            a[2] = own_v_pair(2 * m, 2), a[3] = own_v_pair(2 * m + 1, 2);
          } else {
            a[0] = v_pair(2 * m, 0), a[1] = v_pair(2 * m + 1, 0);
            a[2] = v_pair(2 * m, 2), a[3] = v_pair(2 * m + 1, 2);
          }
#pragma unroll
          for (int ht = 0; ht < HT; ++ht) Tr::mma(o[ht][m], a, pb[ht][0], pb[ht][1]);
        };
        // Two forms of one loop, each the one that nvcc 13.0 compiles best. With the bounds
        // of the second, the loop stays rolled at V group 64 and o, indexed at run time,
        // goes to local memory (160-336 bytes of stack frame, no "spill" in ptxas' count;
        // the dense decode at group 64 ran 2-35x slower for it, 2026-12-05): so KC's
        // kernels and every kernel at group 64 take the fixed count of the first. The
        // one-head-tile sparse and selection kernels at 4 bits then spill 4-32 bytes.
        if constexpr (KC || GROUP == 64) {
#pragma unroll
          for (int mg = 0; mg < GROUP / 16; ++mg) v_mma(gv * GROUP / 16 + mg);
        } else {
#pragma unroll
          for (int m = gv * GROUP / 16; m < (gv + 1) * GROUP / 16; ++m) v_mma(m);
        }
      }
    }

    // refill the step's buffers once every lane has read them
    __syncwarp();
#pragma unroll
    for (int st = 0; st < NT; ++st) {
      const int i = i0 + st + kStages;
      if (i < n_local) issue(i, stages[st]);
    }
  };
  // KC: this warp's own-page tiles are its last ones (local tile i starts at token
  // 16 (first_tile + 4 i)); they run after the packed ones, in a loop of their own, so
  // that the hot loop holds only the packed pages' code.
  const int own_tile = own_begin / kTileTokens;
  const int n_packed =
      KC ? min(max((own_tile - first_tile + kDecodeWarps - 1) / kDecodeWarps, 0), n_local)
         : n_local;
  // The sequence's last tile, the only one that can be partial, is a warp's last packed
  // tile if it is packed at all: the steps before it need no masking (16 predicated
  // selects and 4 compares less per tile). Every kernel splits its steps so (the sparse
  // kernel over every page must equal the dense one bit for bit). The bound costs the
  // sparse kernel at V group 64 a spilled register (4 bytes; tests/cpu/test_decode_occupancy.py).
  using Packed = std::false_type;
  using Masked = std::true_type;
  using Exact = std::false_type;
  // With several query tokens, the positions from the first token's on are hidden from
  // some query rows: at most the last two tiles (q_count <= 16), each its warp's last.
  const int seen_by_all = num_tokens - (q_count - 1);
  const int n_exact = n_packed > 0 && tile_token0(n_packed - 1) + kTileTokens > seen_by_all
                          ? n_packed - 1
                          : n_packed;
  int i0 = 0;
  for (; i0 + kStep <= n_exact; i0 += kStep)
    run_step(std::integral_constant<int, kStep>{}, Packed{}, Exact{}, i0);
  for (; i0 < n_packed; ++i0) run_step(std::integral_constant<int, 1>{}, Packed{}, Masked{}, i0);
  if constexpr (KC) {
    for (; i0 < n_local; ++i0)
      run_step(std::integral_constant<int, 1>{}, std::true_type{}, Masked{}, i0);
  }


  // ---- finish this warp: sums over the 8 lanes of a head, hand to shared memory ------
#pragma unroll
  for (int ht = 0; ht < HT; ++ht)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int x = 4; x < 32; x *= 2) {
        l_run[ht][c] += __shfl_xor_sync(0xffffffffu, l_run[ht][c], x);
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi)
          zero_sum[ht][c][gi] += __shfl_xor_sync(0xffffffffu, zero_sum[ht][c][gi], x);
      }
    }
  __syncthreads();  // the merge area overlaps every warp's copy ring
  float* merge_o = reinterpret_cast<float*>(smem);       // [warps][kHeads][HEAD]
  float* merge_m = merge_o + kDecodeWarps * kHeads * HEAD;  // [warps][kHeads]
  float* merge_l = merge_m + kDecodeWarps * kHeads;         // [warps][kHeads]
#pragma unroll
  for (int ht = 0; ht < HT; ++ht) {
#pragma unroll
    for (int m = 0; m < kKSteps; ++m)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int ch = 16 * m + g + 8 * (k >> 1), head = 8 * ht + 2 * t + (k & 1);
        const int gi = ch / GROUP;
        merge_o[(warp * kHeads + head) * HEAD + ch] =
            fmaf(2.0f, o[ht][m][k], zero_sum[ht][k & 1][gi]);
      }
    if (g == 0) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        merge_m[warp * kHeads + 8 * ht + 2 * t + c] =
            kLiftV ? __fsub_ru(m_run[ht][c], lift_k) : m_run[ht][c];
        merge_l[warp * kHeads + 8 * ht + 2 * t + c] = l_run[ht][c];
      }
    }
  }
  __syncthreads();

  // ---- merge the warps; write the output or this split's partial ---------------------
  for (int idx = threadIdx.x; idx < q_rows * HEAD; idx += blockDim.x) {
    const int row = idx / HEAD, c = idx % HEAD;
    const SoftmaxState st = fold_states<kDecodeWarps>([&](int w) {
      const int i = w * kHeads + row;
      return SoftmaxState{merge_m[i], merge_l[i], merge_o[i * HEAD + c]};
    });
    // a query row that saw no token of this split (a later token's positions) has l = 0
    write_row(row, c, st.l > 0.0f ? st.a / st.l : 0.0f,
              st.l > 0.0f ? st.m + log2f(st.l) : -INFINITY);
  }
}

// Reduce the splits of every (query token, head): out = sum_s w_s o_s, w_s ~ 2^lse_s.
// One CTA per (query token, head). A single long sequence is split up to 64 ways (the
// planner's MAX_SPLITS), so the splits are read in parallel, not in a chain: warp w
// takes splits w, w + kCombineWarps, ... (each lane 4 channels, one 16-byte load per
// split), loading a split's log-sum-exp and output together, up to 8 splits a pass,
// and keeps its own running maximum, rescaling its sums when it moves (as the decode's
// online softmax does); the warps' sums meet in shared memory, each scaled to the
// largest maximum. So one round of loads from L2 after griddepcontrol.wait, not two (all
// the maxima first, then the outputs). With two rounds the combine ended some 2.3 us
// after the decode at B = 1; one round took the page reuse layer at 1 x 128K from
// 9.9-10.2 to 9.2-9.5 us in a step (H100, 2026-12-06, docs/patches/README.md).
// (One thread per channel walking every split took 22 us of a 50 us decode at 1 x 32K
// under Nsight Compute.)
constexpr int kCombineWarps = 8;

// A load from L2 (relaxed, GPU scope: nothing cached in L1) if `pred`; `dst` keeps its
// value where not. Volatile, so nvcc issues it where it is written (plain loads were sunk
// under the test of the value loaded before them), and predicated in the PTX itself,
// where a guard in C++ became branches that waited on the first load before issuing the
// rest (SASS, 2026-12-06).
__device__ __forceinline__ void load_l2_if(bool pred, const float* src, float& dst) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p ld.relaxed.gpu.global.f32 %0, [%2];\n}"
      : "+f"(dst)
      : "r"(static_cast<int>(pred)), "l"(src));
}
__device__ __forceinline__ void load_l2_if(bool pred, const float4* src, float4& dst) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n"
      " @p ld.relaxed.gpu.global.v4.f32 {%0, %1, %2, %3}, [%5];\n}"
      : "+f"(dst.x), "+f"(dst.y), "+f"(dst.z), "+f"(dst.w)
      : "r"(static_cast<int>(pred)), "l"(src));
}

// combine_kernel's splits per warp and pass for num_splits splits: 1, 2, 4 or 8
constexpr int combine_in_flight(int num_splits) {
  const int per_warp = (num_splits + kCombineWarps - 1) / kCombineWarps;
  return per_warp <= 1 ? 1 : per_warp <= 2 ? 2 : per_warp <= 4 ? 4 : 8;
}

// kInFlight: the splits each warp loads in one pass, ceil(num_splits / kCombineWarps)
// rounded up to a power of two, at most 8 (combine_in_flight, on the host). A first form
// always loaded 8, clamped to the last split: at 8 splits in all each warp loaded its one
// split and 7 repeats, and the dense decode at 8 x 32K took 2% longer than with the two
// rounds (H100, 2026-12-06); the form of 8 also takes twice the registers of the form
// of 1 (64 and 32), which would halve the CTAs resident per SM for every split count.
template <typename T, int HEAD, int kInFlight>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(DecodeParams p) {
  static_assert(HEAD == 32 * 4, "a warp holds one row, 4 channels per lane");
  __shared__ float warp_max[kCombineWarps];
  __shared__ float warp_total[kCombineWarps];
  __shared__ float4 warp_acc[kCombineWarps][32];
  // a programmatic dependent of the decode (launch_combine): its partials first. The
  // selection layer's top-k is in turn a programmatic dependent of this kernel: it may
  // be scheduled now, and waits for this grid to finish.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // blockIdx.x: query token `token` of sequence `seq` (one per sequence without
  // p.query_start), its output row `row`
  const int seq = blockIdx.x / p.max_query_len, token = blockIdx.x % p.max_query_len;
  const int head = blockIdx.y;
  int row = seq;
  if (p.query_start != nullptr) {
    row = p.query_start[seq] + token;
    const int end = p.query_start[seq + 1];
    // the sequence has fewer tokens, or more than the decode would read (it wrote none)
    if (row >= end || end - p.query_start[seq] > p.max_query_len) return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(p.num_seqs) * p.max_query_len * p.num_heads;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.num_heads + head;
  const float* lse = p.partial_lse + base;
  const float4* out4 = reinterpret_cast<const float4*>(p.partial_out + base * HEAD) + lane;

  // this warp's splits (warp, warp + kCombineWarps, ...): running maximum m, and the
  // sums scaled by 2^-m. A pass's loads (each split's lse and output) are all issued
  // before any is looked at.
  float m = -INFINITY, total = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int s0 = warp; s0 < p.num_splits; s0 += kInFlight * kCombineWarps) {
    float l[kInFlight];
    float4 o[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int s = s0 + k * kCombineWarps;
      const bool real = k == 0 || s < p.num_splits;  // (k = 0: the loop's own test)
      l[k] = -INFINITY;  // no such split
      o[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      load_l2_if(real, lse + int64_t{s} * stride, l[k]);
      load_l2_if(real, out4 + int64_t{s} * stride * (HEAD / 4), o[k]);
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      // no token in this split (an empty split, or a row that saw none of its tokens,
      // wrote zeros with lse -inf), or no split
      if (l[k] == -INFINITY) continue;
      if (l[k] > m) {  // the first split with tokens, or a larger maximum: rescale
        const float f = fast_exp2(m - l[k]);  // 0 while m is -inf
        total *= f;
        acc.x *= f, acc.y *= f, acc.z *= f, acc.w *= f;
        m = l[k];
      }
      const float w = fast_exp2(l[k] - m);
      total += w;
      acc.x = fmaf(w, o[k].x, acc.x);
      acc.y = fmaf(w, o[k].y, acc.y);
      acc.z = fmaf(w, o[k].z, acc.z);
      acc.w = fmaf(w, o[k].w, acc.w);
    }
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_total[warp] = total;
  }
  warp_acc[warp][lane] = acc;
  __syncthreads();
  if (threadIdx.x >= HEAD) return;
  const int c = threadIdx.x;
  const SoftmaxState st = fold_states<kCombineWarps>([&](int w) {
    return SoftmaxState{warp_max[w], warp_total[w],
                        reinterpret_cast<const float*>(&warp_acc[w][c / 4])[c % 4]};
  });
  static_cast<T*>(p.out)[row * p.out_stride_token + head * p.out_stride_head + c] =
      DtypeTraits<T>::from_float(st.l > 0.0f ? st.a / st.l : 0.0f);
}

}  // namespace bitdecode
