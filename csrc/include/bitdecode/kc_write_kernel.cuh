// Per-channel K mode (issue #7): one step's write into the channel-mode pages and the
// requests' residuals, the GPU twin of reference_kc.write_tokens_kc. Two launches in
// this order (docs/per-channel-k-design.md, section 5):
//
// 1. kc_page_kernel (phase A), one 128-thread CTA per (token, KV head), working only for
//    tokens that land on the last slot of a 16-token K group of a page: thread c gathers
//    channel c of the group's keys (this step's `key` for positions computed in this
//    step, the request's residual for earlier ones: they lie in the request's last
//    written page), quantizes it over the group with the per-token quantizer's rules
//    (group_params / code_of, parameters in fp16 for both model dtypes) and writes the
//    group's packed K rows and its K params, (scale, zc = zero + 2^(BITS-1) * scale),
//    the form the decode kernel dequantizes with one HFMA2 per pair. With K params in
//    e4m3 (KP8, reference_kc.quantize_channels_fp8) zc comes first, the range's centre
//    rounded to e4m3, then the smallest e4m3 scale that reaches both ends from it. It
//    reads nothing the step writes, so CTAs run in any order.
// 2. kc_value_residual_kernel (phase B), one warp per (token, KV head): the token's V per
//    token and group into the page (codes and V params), as the per-token page does,
//    then the K and V rows of each request's last written page to its residual slot.
//    After phase A, which may read residual rows this overwrites (a chunk that fills a
//    page and ends in the next); the V writes touch bytes phase A neither reads nor
//    writes, so they ride along (until 2026-12-03 they were a launch of their own, before
//    phase A: 0.21 -> 0.17 ms of writes a step at 1 x 128K, 2-bit, on an H200). It lets
//    the decode after it start (griddepcontrol.launch_dependents): the decode waits for
//    it before reading a page or a residual row, and phase A is a plain launch, so it
//    has finished before B starts.
//
// The residual is [num_slots][2][num_kv_heads][block_size][HEAD] in the model dtype: K
// rows, then V rows (kc_residual_rows).
//
// A token's batch row comes from a binary search over query_start_loc, its position from
// seq_lens; padding tokens (slot < 0) do nothing. No host synchronisation anywhere.
#pragma once

#include <cstdint>

#include "bitdecode/fragments.cuh"
#include "bitdecode/params.h"
#include "bitdecode/quantize_kernel.cuh"

namespace bitdecode {

// The next fp16 value above (up) or below a finite x: its bit pattern one further from
// zero, or closer (reference_kc._fp16_step).
__device__ __forceinline__ __half fp16_step(__half x, bool up) {
  uint16_t bits = __half_as_ushort(x);
  if ((bits & 0x7fffu) == 0) return __ushort_as_half(up ? 0x0001u : 0x8001u);
  const bool grow = ((bits & 0x8000u) != 0) != up;  // the magnitude grows
  return __ushort_as_half(static_cast<uint16_t>(grow ? bits + 1 : bits - 1));
}

// The stored zero point zc = zero + C scale in fp16 (reference_kc.centred_zero): one fma,
// rounded once. At the edge of fp16's range that rounding (up to 16 near 65504) can
// carry the read-back of code 0 or of the top code, (code - C) * scale + zc rounded once
// (the decode's HFMA2), past the maximum (a key of -65504 beside -57376 read back as
// -inf); there zc moves one step the other way.
template <int BITS>
__device__ __forceinline__ __half centred_zero(__half scale, float zero) {
  using H = DtypeTraits<__half>;
  constexpr float kC = kCodeCentre<BITS>;
  constexpr float kTop = static_cast<float>((1 << BITS) - 1) - kC;
  const __half zc = H::from_float(__fmaf_rn(kC, H::to_float(scale), zero));
  if (__hisinf(__hfma(__float2half(-kC), scale, zc))) return fp16_step(zc, true);
  if (__hisinf(__hfma(__float2half(kTop), scale, zc))) return fp16_step(zc, false);
  return zc;
}

// The batch row of token t: the last r with query_start_loc[r] <= t (t inside the batch).
__device__ __forceinline__ int kc_token_row(const int32_t* qsl, int num_reqs, int t) {
  int lo = 0, hi = num_reqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (qsl[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Position of token t of row r in its sequence, and the row's first position this step.
__device__ __forceinline__ void kc_token_position(const KCWriteParams& p, int r, int t,
                                                  int& pos, int& start) {
  const int end = p.query_start_loc[r + 1];
  pos = p.seq_lens[r] - (end - t);
  start = p.seq_lens[r] - (end - p.query_start_loc[r]);
}

// The token's V row into its page: codes and (scale, zero) per group, as per-token mode
// stores V. One warp; `v_raw` is the lane's 4 values of the row as loaded, `codes` the
// warp's HEAD bytes of shared memory.
template <typename T, int HEAD, int BITS, int GROUP>
__device__ __forceinline__ void kc_write_value(const KCWriteParams& p, int head, int64_t slot,
                                               const uint2& v_raw, uint8_t* codes, int lane) {
  using Order = RowOrder<HEAD, BITS>;
  const int64_t block = slot / p.block_size;
  const int offset = static_cast<int>(slot % p.block_size);
  uint8_t* region = p.cache + block * p.cache_stride_block + head * p.cache_stride_head;

  float v[4];
  unpack4<T>(v_raw, v);
  T vs, vz;
  quantize_lane<T, BITS, GROUP>(v, codes, lane, vs, vz);
  constexpr int kLanesPerGroup = GROUP / 4;
  if (lane % kLanesPerGroup == 0) {
    const int g = lane / kLanesPerGroup;
    T* prm = reinterpret_cast<T*>(
        region + tile_row(p.tile_bytes, offset, p.v_params_offset, p.v_param_bytes));
    prm[2 * g] = vs;
    prm[2 * g + 1] = vz;
  }
  __syncwarp();
  if (lane < Order::kRowWords) {
    uint32_t packed = 0;
#pragma unroll
    for (int s = 0; s < Order::kValuesPerWord; ++s)
      packed |= static_cast<uint32_t>(codes[Order::v_channel(lane, s)]) << (BITS * s);
    reinterpret_cast<uint32_t*>(
        region + tile_row(p.tile_bytes, offset, p.v_rows_offset, Order::kRowBytes))[lane] = packed;
  }
}

template <typename T, int HEAD, int BITS, bool KP8>
__global__ void __launch_bounds__(HEAD) kc_page_kernel(KCWriteParams p) {
  static_assert(HEAD == 128, "one thread per channel");
  using Order = RowOrder<HEAD, BITS>;
  constexpr int G = kKCGroupTokens;
  __shared__ uint8_t codes[G][HEAD];
  const int token = blockIdx.x, head = blockIdx.y, c = threadIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot % G != G - 1) return;  // not the last slot of a K group
  const int r = kc_token_row(p.query_start_loc, p.num_reqs, token);
  int pos, start;
  kc_token_position(p, r, token, pos, start);
  const int first = pos - (G - 1);  // the group's first position
  const int q0 = p.query_start_loc[r];
  const T* residual = kc_residual_rows<HEAD>(static_cast<const T*>(p.residual), p.row_slot[r],
                                             0, p.num_kv_heads, head, p.block_size);
  auto key_at = [&](int i) {  // channel c of the group's i-th key
    const int q = first + i;
    if (q >= start) {
      const T* k = static_cast<const T*>(p.key) + static_cast<int64_t>(q0 + q - start) *
                   p.key_stride_token + head * p.key_stride_head;
      return DtypeTraits<T>::to_float(k[c]);
    }
    return DtypeTraits<T>::to_float(residual[static_cast<int64_t>(q % p.block_size) * HEAD + c]);
  };
  float lo = key_at(0), hi = lo;
  for (int i = 1; i < G; ++i) {
    const float x = key_at(i);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  const int64_t block = slot / p.block_size;
  const int first_slot = static_cast<int>(slot % p.block_size) - (G - 1);
  static_assert(G == kTileTokens, "a K group is one tile: its K rows, then its K params");
  uint8_t* tile = p.cache + block * p.cache_stride_block + head * p.cache_stride_head +
                  first_slot / G * p.tile_bytes;
  const int at = kc_param_index(c);  // scale, then zc 4 further (reference_kc.pack_k_params)
  if constexpr (KP8) {  // reference_kc.quantize_channels_fp8, op for op (no contraction)
    constexpr float kLevels = static_cast<float>((1 << BITS) - 1);
    constexpr float kC = kCodeCentre<BITS>;
    const float mid = __fadd_rn(lo, __fmul_rn(kC, __fdiv_rn(__fsub_rn(hi, lo), kLevels)));
    const uint8_t zc8 = float_to_e4m3(fminf(fmaxf(mid, -kE4m3Max), kE4m3Max));
    const float zc = e4m3_to_float(zc8);
    const float need = fminf(fmaxf(fmaxf(__fdiv_rn(__fsub_rn(zc, lo), kC),
                                         __fdiv_rn(__fsub_rn(hi, zc), kLevels - kC)),
                                   kE4m3MinScale),
                             kE4m3Max);
    uint8_t s8 = float_to_e4m3(need);
    if (e4m3_to_float(s8) < need) ++s8;  // round up: positive e4m3 bytes order as values
    const float s = e4m3_to_float(s8);
    for (int i = 0; i < G; ++i) {
      const float q = rintf(__fadd_rn(__fdiv_rn(__fsub_rn(key_at(i), zc), s), kC));
      codes[i][c] = static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), kLevels));
    }
    uint8_t* k_params = tile + p.k_params_offset;
    k_params[at] = s8;
    k_params[at + 4] = zc8;
  } else {
    using H = DtypeTraits<__half>;
    __half scale, zero;
    const bool wide = group_params<__half, BITS>(lo, hi, scale, zero);
    const float s = H::to_float(scale), z = H::to_float(zero);
    for (int i = 0; i < G; ++i) codes[i][c] = code_of<BITS>(key_at(i), s, z, wide);
    __half* k_params = reinterpret_cast<__half*>(tile + p.k_params_offset);
    k_params[at] = scale;
    k_params[at + 4] = centred_zero<BITS>(scale, z);
  }
  __syncthreads();
  // pack the group's K rows in the per-token page's row order
  uint8_t* rows = tile;  // K rows start the tile
  for (int idx = c; idx < G * Order::kRowWords; idx += HEAD) {
    const int i = idx / Order::kRowWords, word = idx % Order::kRowWords;
    uint32_t packed = 0;
#pragma unroll
    for (int sl = 0; sl < Order::kValuesPerWord; ++sl)
      packed |= static_cast<uint32_t>(codes[i][Order::k_channel(word, sl)]) << (BITS * sl);
    reinterpret_cast<uint32_t*>(rows + i * Order::kRowBytes)[word] = packed;
  }
}

template <typename T, int HEAD, int BITS, int GROUP>
__global__ void __launch_bounds__(kQuantizeWarps * 32) kc_value_residual_kernel(KCWriteParams p) {
  static_assert(HEAD == 128, "one warp holds a row, 4 channels per lane");
  // the decode after this write may be scheduled now: it reads no page or residual row
  // before griddepcontrol.wait, which waits for this grid, the last of the two, to finish
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  __shared__ uint8_t codes[kQuantizeWarps][HEAD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int token, head;
  if (!warp_token_head(p.num_tokens, p.num_kv_heads, token, head)) return;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;
  // the lane's 4 values of the token's V row, loaded once: quantized into the page, and
  // copied as they are to the residual when the token lies in its request's last page
  const uint2 v_raw = *reinterpret_cast<const uint2*>(
      static_cast<const T*>(p.value) + token * p.value_stride_token +
      head * p.value_stride_head + 4 * lane);
  kc_write_value<T, HEAD, BITS, GROUP>(p, head, slot, v_raw, codes[warp], lane);

  const int r = kc_token_row(p.query_start_loc, p.num_reqs, token);
  int pos, start;
  kc_token_position(p, r, token, pos, start);
  const int last_page_start = (p.seq_lens[r] - 1) / p.block_size * p.block_size;
  if (pos < last_page_start) return;  // its page is closed: nothing reads it exactly again
  const int64_t row = (pos % p.block_size) * HEAD + 4 * lane;
  const T* key = static_cast<const T*>(p.key) + token * p.key_stride_token +
                 head * p.key_stride_head + 4 * lane;
  T* rows = static_cast<T*>(p.residual);
  T* k_dst = kc_residual_rows<HEAD>(rows, p.row_slot[r], 0, p.num_kv_heads, head, p.block_size);
  T* v_dst = kc_residual_rows<HEAD>(rows, p.row_slot[r], 1, p.num_kv_heads, head, p.block_size);
  *reinterpret_cast<uint2*>(k_dst + row) = *reinterpret_cast<const uint2*>(key);
  *reinterpret_cast<uint2*>(v_dst + row) = v_raw;
}

}  // namespace bitdecode
