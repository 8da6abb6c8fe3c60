// Quantize-on-write and its inverse (dequantize pages for prefill over cached history).
//
// One warp per (token, KV head). Lane l holds channels 4l..4l+3 of K and of V; the
// optional K rotation is a warp-level Walsh-Hadamard transform (butterflies over
// registers, then over lanes), min/max per group are lane reductions, and the codes
// are repacked through shared memory into the MMA-friendly row order.
#pragma once

#include <cstring>

#include "bitdecode/fragments.cuh"
#include "bitdecode/params.h"

namespace bitdecode {

constexpr int kQuantizeWarps = 4;

// One warp per (token, KV head): this warp's pair, false for warps past the end.
__device__ __forceinline__ bool warp_token_head(int num_tokens, int num_kv_heads, int& token,
                                                int& head) {
  const int64_t item =
      static_cast<int64_t>(blockIdx.x) * kQuantizeWarps + static_cast<int>(threadIdx.x / 32);
  if (item >= static_cast<int64_t>(num_tokens) * num_kv_heads) return false;
  token = static_cast<int>(item / num_kv_heads);
  head = static_cast<int>(item % num_kv_heads);
  return true;
}

template <typename T>
__device__ __forceinline__ void unpack4(const uint2& raw, float (&x)[4]) {  // raw: 4 x 16-bit
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = DtypeTraits<T>::to_float(v[i]);
}

template <typename T>
__device__ __forceinline__ void load4(const T* src, float (&x)[4]) {
  unpack4<T>(*reinterpret_cast<const uint2*>(src), x);
}

// The stored (scale, zero) of a group whose values lie in [lo, hi]; true where it takes
// the wide path. Scale and zero are rounded to the stored dtype first, and codes are then
// computed against the stored values (code_of), so dequantization with them is the
// quantizer's own inverse. Shared by the per-token quantizer (quantize_lane) and the
// per-channel one (kc_write_kernel.cuh), and the twin of reference.quantize.
// A group spanning both signs near the float32 maximum overflows hi - lo; only there the
// scale is hi / L - lo / L and a code x / s - z / s, both finite. An inf input takes that
// branch too and leaves its group's parameters non-finite; a NaN is skipped by the min /
// max (fminf / fmaxf) and gets code 0 (reference.quantize spreads it instead).
template <typename T, int BITS>
__device__ __forceinline__ bool group_params(float lo, float hi, T& scale_out, T& zero_out) {
  constexpr float kLevels = static_cast<float>((1 << BITS) - 1);
  const float span = hi - lo;
  const bool wide = !isfinite(span);
  const float scale = wide ? __fsub_rn(__fdiv_rn(hi, kLevels), __fdiv_rn(lo, kLevels))
                           : __fdiv_rn(span, kLevels);
  scale_out = DtypeTraits<T>::from_float(scale);
  zero_out = DtypeTraits<T>::from_float(lo);
  // The top code must dequantize (code * scale + zero, one rounding) to a finite T. Where
  // the scale, rounded to nearest, puts it past T's maximum (fp16, a group spanning
  // +-65504: 15 * 8736 - 65504 = 65536), the scale goes one step down (as in
  // reference.quantize); ordinary groups never get here.
  const float s0 = DtypeTraits<T>::to_float(scale_out);
  const float z0 = DtypeTraits<T>::to_float(zero_out);
  if (s0 > 0.0f && isfinite(s0) && isfinite(z0) &&
      isinf(DtypeTraits<T>::to_float(DtypeTraits<T>::from_float(__fmaf_rn(kLevels, s0, z0))))) {
    uint16_t bits;
    memcpy(&bits, &scale_out, sizeof(bits));
    --bits;  // a positive finite 16-bit float: the next smaller value
    memcpy(&scale_out, &bits, sizeof(bits));
  }
  return wide;
}

// The code of x against the stored scale s and zero z (as floats) of its group.
template <int BITS>
__device__ __forceinline__ uint8_t code_of(float x, float s, float z, bool wide) {
  constexpr float kLevels = static_cast<float>((1 << BITS) - 1);
  float q = 0.0f;
  if (s > 0.0f) {
    const float t = wide ? __fsub_rn(__fdiv_rn(x, s), __fdiv_rn(z, s)) : __fdiv_rn(x - z, s);
    q = fminf(fmaxf(rintf(t), 0.0f), kLevels);
  }
  return static_cast<uint8_t>(q);
}

// Quantize the 4 values of this lane against its group's min/max; writes the codes to
// `codes` (natural channel order) and returns the stored (scale, zero) of the group.
template <typename T, int BITS, int GROUP>
__device__ __forceinline__ void quantize_lane(const float (&x)[4], uint8_t* codes, int lane,
                                              T& scale_out, T& zero_out) {
  constexpr int kLanesPerGroup = GROUP / 4;
  float lo = fminf(fminf(x[0], x[1]), fminf(x[2], x[3]));
  float hi = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
#pragma unroll
  for (int o = 1; o < kLanesPerGroup; o *= 2) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  const bool wide = group_params<T, BITS>(lo, hi, scale_out, zero_out);
  const float s = DtypeTraits<T>::to_float(scale_out);
  const float z = DtypeTraits<T>::to_float(zero_out);
#pragma unroll
  for (int i = 0; i < 4; ++i) codes[4 * lane + i] = code_of<BITS>(x[i], s, z, wide);
}

template <typename T, int HEAD, int BITS, int GROUP>
__global__ void __launch_bounds__(kQuantizeWarps * 32) quantize_kernel(QuantizeParams p) {
  static_assert(HEAD == 128, "one warp holds 4 channels per lane");
  using Order = RowOrder<HEAD, BITS>;
  constexpr int kGroups = HEAD / GROUP;
  __shared__ uint8_t codes[kQuantizeWarps][2][HEAD];

  // the decode after this write may be scheduled now: it reads no page before
  // griddepcontrol.wait, which waits for this grid to finish (launch_decode_tiles)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int token, head;
  if (!warp_token_head(p.num_tokens, p.num_kv_heads, token, head)) return;
  // The slot is only needed for the stores: a padding token (slot < 0) is quantized
  // into this warp's shared scratch and dropped, so that the loads of the slot and of
  // the rows are in flight together (with the padding check first, nvcc issued the row
  // loads only after the slot had arrived: a write of a few tokens is latency-bound).
  const int64_t slot = p.slot_mapping[token];
  float k[4], v[4];
  load4(static_cast<const T*>(p.key) + token * p.key_stride_token + head * p.key_stride_head +
            4 * lane, k);
  load4(static_cast<const T*>(p.value) + token * p.value_stride_token +
            head * p.value_stride_head + 4 * lane, v);
  if (p.rotation_signs != nullptr) rotate_row_warp(k, p.rotation_signs, lane);

  T ks, kz, vs, vz;
  quantize_lane<T, BITS, GROUP>(k, codes[warp][0], lane, ks, kz);
  quantize_lane<T, BITS, GROUP>(v, codes[warp][1], lane, vs, vz);
  if (slot < 0) return;  // padding token (the whole warp: one token)
  // block sizes are powers of two (page_geometry): a shift, not a 64-bit division
  const int64_t block = slot >> p.page.block_shift;
  const int offset = static_cast<int>(slot & (p.page.block_size - 1));
  uint8_t* region = p.cache + block * p.cache_stride_block + head * p.cache_stride_head;

  // params: [K: (scale, zero) x groups][V: (scale, zero) x groups]
  constexpr int kLanesPerGroup = GROUP / 4;
  if (lane % kLanesPerGroup == 0) {
    const int g = lane / kLanesPerGroup;
    T* prm = reinterpret_cast<T*>(region + tile_row(p.page.tile_bytes, offset,
                                                    p.page.params_offset, p.page.param_bytes));
    prm[2 * g] = ks;
    prm[2 * g + 1] = kz;
    prm[2 * (kGroups + g)] = vs;
    prm[2 * (kGroups + g) + 1] = vz;
  }
  __syncwarp();

  // Lanes [0, row_words) pack K words, the next row_words lanes pack V words.
  if (lane < 2 * Order::kRowWords) {
    const bool is_v = lane >= Order::kRowWords;
    const int word = is_v ? lane - Order::kRowWords : lane;
    const uint8_t* src = codes[warp][is_v ? 1 : 0];
    uint32_t packed = 0;
#pragma unroll
    for (int s = 0; s < Order::kValuesPerWord; ++s) {
      const int c = is_v ? Order::v_channel(word, s) : Order::k_channel(word, s);
      packed |= static_cast<uint32_t>(src[c]) << (BITS * s);
    }
    const int rows = is_v ? p.page.v_rows_offset : 0;
    reinterpret_cast<uint32_t*>(
        region + tile_row(p.page.tile_bytes, offset, rows, Order::kRowBytes))[word] = packed;
  }
}

// Inverse: pages -> model dtype, one warp per (sequence, token, KV head). KC: per-channel
// K pages (reference_kc.read_pages_kc), whose K is meaningful only once the page is full.
template <typename T, int HEAD, int BITS, int GROUP, bool KC = false, bool KP8 = false>
__global__ void __launch_bounds__(kQuantizeWarps * 32) dequantize_kernel(DequantizeParams p) {
  static_assert(HEAD == 128, "one warp holds 4 channels per lane");
  using Order = RowOrder<HEAD, BITS>;
  constexpr int kGroups = HEAD / GROUP;
  __shared__ uint32_t rows[kQuantizeWarps][2][Order::kRowWords];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int seq = blockIdx.y;
  // the grid's last CTA has warps past max_tokens * num_kv_heads: they stop here and not
  // only at seq_lens, which a caller may (wrongly) have larger than max_tokens
  int token, head;
  if (!warp_token_head(p.max_tokens, p.num_kv_heads, token, head)) return;
  if (token >= p.seq_lens[seq]) return;
  const int64_t block = p.block_table[seq * p.block_table_stride + token / p.page.block_size];
  const int offset = token % p.page.block_size;
  const uint8_t* region = p.cache + block * p.cache_stride_block + head * p.cache_stride_head;

  if (lane < 2 * Order::kRowWords) {
    const bool is_v = lane >= Order::kRowWords;
    const int word = is_v ? lane - Order::kRowWords : lane;
    const int base = is_v ? p.page.v_rows_offset : 0;
    rows[warp][is_v][word] = reinterpret_cast<const uint32_t*>(
        region + tile_row(p.page.tile_bytes, offset, base, Order::kRowBytes))[word];
  }
  __syncwarp();

  // per token: (scale, zero) of every group, K's then V's (KC: V's only)
  constexpr int kVFirst = KC ? 0 : kGroups;
  const T* prm = reinterpret_cast<const T*>(
      region + tile_row(p.page.tile_bytes, offset, p.page.params_offset,
                        KC ? p.page.param_bytes / 2 : p.page.param_bytes));
  const int g = (4 * lane) / GROUP;
  // KC only: the fp16 (or, KP8, e4m3) (scale, zc) of this token's 16-token K group, at
  // the end of its tile
  const uint8_t* kparams = region + offset / kTileTokens * p.page.tile_bytes + p.k_params_offset;
  auto k_param = [&](int i) {
    if constexpr (KP8) return e4m3_to_float(kparams[i]);
    return __half2float(reinterpret_cast<const __half*>(kparams)[i]);
  };
  const float ks = DtypeTraits<T>::to_float(prm[2 * g]);
  const float kz = DtypeTraits<T>::to_float(prm[2 * g + 1]);
  const float vs = DtypeTraits<T>::to_float(prm[2 * (kVFirst + g)]);
  const float vz = DtypeTraits<T>::to_float(prm[2 * (kVFirst + g) + 1]);
  constexpr uint32_t kMask = (1u << BITS) - 1;

  const int64_t out_row = static_cast<int64_t>(p.out_start[seq]) + token;
  T* k_out = static_cast<T*>(p.key_out) + (out_row * p.num_kv_heads + head) * HEAD + 4 * lane;
  T* v_out = static_cast<T*>(p.value_out) + (out_row * p.num_kv_heads + head) * HEAD + 4 * lane;
  T kv[4], vv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int w, s;
    Order::k_slot(4 * lane + i, w, s);
    // code * scale + zero rounded once, as reference.dequantize: code * scale is exact
    // (<= 4 + 11 bits), so this is mul-then-add bit for bit, except that it stays finite
    // where code * scale alone overflows (groups spanning both signs near the maximum)
    const float kc = static_cast<float>((rows[warp][0][w] >> (BITS * s)) & kMask);
    if constexpr (KC) {  // (code - centre) * scale + zc, reference_kc.dequantize_stored_k
      const int at = kc_param_index(4 * lane + i);
      kv[i] = DtypeTraits<T>::from_float(
          __fmaf_rn(kc - kCodeCentre<BITS>, k_param(at), k_param(at + 4)));
    } else {
      kv[i] = DtypeTraits<T>::from_float(__fmaf_rn(kc, ks, kz));
    }
    Order::v_slot(4 * lane + i, w, s);
    const float vc = static_cast<float>((rows[warp][1][w] >> (BITS * s)) & kMask);
    vv[i] = DtypeTraits<T>::from_float(__fmaf_rn(vc, vs, vz));
  }
  *reinterpret_cast<uint2*>(k_out) = *reinterpret_cast<const uint2*>(kv);
  *reinterpret_cast<uint2*>(v_out) = *reinterpret_cast<const uint2*>(vv);
}

}  // namespace bitdecode
