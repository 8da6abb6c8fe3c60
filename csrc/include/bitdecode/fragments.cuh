// Register-level building blocks: dtype traits, mma.m16n8k16, lop3 unpacking of
// packed codes straight into MMA operand registers, and the in-row channel order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace bitdecode {

template <typename T>
struct DtypeTraits;

template <>
struct DtypeTraits<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  // (code | 0x4300) is the bf16 number 128 + code, exact for codes < 128.
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr float kMagicValue = 128.0f;
  static constexpr int kMantissaBits = 7, kExponentBias = 127;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  __host__ __device__ static float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
  __host__ __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct DtypeTraits<__half> {
  using pair = __half2;
  // (code | 0x6400) is the fp16 number 1024 + code, exact for codes < 1024.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr float kMagicValue = 1024.0f;
  static constexpr int kMantissaBits = 10, kExponentBias = 15;
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 p = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
  }
  __host__ __device__ static float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
  __host__ __device__ static uint32_t sub2(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {  // a * b + c, once rounded
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                        *reinterpret_cast<__half2*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// (x & mask) | bits in one instruction; on the host (tests/cpu/cuda/unpack_exact.cu) in C++.
__host__ __device__ __forceinline__ uint32_t lop3_and_or(uint32_t x, uint32_t mask,
                                                         uint32_t bits) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(x), "r"(mask), "r"(bits));
  return r;
#else
  return (x & mask) | bits;
#endif
}

// One code in each 16-bit half of a register: the mask of a pair at bit 0.
template <int BITS>
constexpr uint32_t kPairMask = BITS == 4 ? 0x000f000fu : 0x00030003u;

// Unpack the code pair (slot i, slot i + vpw/2) of a packed word into one register
// of two T values: low half = slot i, high half = slot i + vpw/2. No shuffles: the
// page stores codes in exactly this order (page_format.py). One lop3 (after a shift)
// per register: the values are kMagicValue + code, exactly. The decode kernel takes the
// offset back per score for K (sum(Q) uses the same rounded Q as the MMA).
template <typename T, int BITS>
__device__ __forceinline__ uint32_t unpack_pair_biased(uint32_t word, int i) {
  return lop3_and_or(word >> (BITS * i), kPairMask<BITS>, DtypeTraits<T>::kMagic);
}

// Where each code pair of a packed word can be read with MANTISSA_BITS mantissa bits to
// hold it: pair i (slot i, slot i + vpw/2) sits at bit bit[i] of the word shifted right by
// shift[i]. Greedy: a pair whose code still fits below the mantissa's top under the
// current shift needs no shift of its own.
template <int MANTISSA_BITS, int BITS>
struct MantissaSlots {
  static constexpr int kPairs = 16 / BITS;  // pairs per 32-bit word
  struct Table {
    int shift[8], bit[8];
  };
  static constexpr Table make() {
    Table t{};
    int s = 0;
    for (int i = 0; i < kPairs; ++i) {
      if (BITS * i - s + BITS > MANTISSA_BITS) s = BITS * i;
      t.shift[i] = s;
      t.bit[i] = BITS * i - s;
    }
    return t;
  }
  static constexpr Table kTable = make();
  static constexpr bool codes_fit() {
    for (int i = 0; i < kPairs; ++i)
      if (kTable.bit[i] + BITS > MANTISSA_BITS) return false;
    return true;
  }
  static_assert(codes_fit(), "every pair's code lies inside the mantissa");
};

// fp16 K fragments with as few shifts as fp16's 10 mantissa bits allow: the pair (slot
// i, slot i + vpw/2) of a packed word is read at mantissa bit b_i of a word shifted right
// by s_i (MantissaSlots<10, BITS>), as the fp16 number 1024 + code * 2^b_i (exact).
// 4 bits: pairs 0-1 at shift 0 (b = 0, 4), pairs 2-3 at shift 8; 2 bits: pairs 0-4 at
// shift 0 (b = 0 .. 8), pairs 5-7 at shift 10. One shift per word instead of 3 / 7. The
// decode kernel divides Q's channel by 2^b_i, so the product is q * code + 1024 q / 2^b_i.
template <int BITS>
struct HalfSlots : MantissaSlots<10, BITS> {
  using MantissaSlots<10, BITS>::kPairs;
  using MantissaSlots<10, BITS>::kTable;
  // the same as kTable.bit[i], in closed form for a run-time i
  __host__ __device__ static constexpr int bit(int i) {
    return BITS == 4 ? 4 * (i % 2) : (i < 5 ? 2 * i : 2 * i - 10);
  }
  static_assert(BITS == 4 || BITS == 2, "4 or 2 bits");
  static constexpr bool closed_form_matches() {
    for (int i = 0; i < kPairs; ++i)
      if (bit(i) != kTable.bit[i] || kTable.bit[i] + BITS > 10) return false;
    return true;
  }
  static_assert(closed_form_matches(), "bit(i) is the table's, and every code fits fp16");
};

template <int BITS>
__device__ __forceinline__ uint32_t unpack_pair_half_slots(uint32_t word, int i) {
  constexpr auto kT = HalfSlots<BITS>::kTable;
  return lop3_and_or(word >> kT.shift[i], kPairMask<BITS> << kT.bit[i],
                     DtypeTraits<__half>::kMagic);
}

// The codes' centre, 2^(BITS-1).
template <int BITS>
constexpr float kCodeCentre = static_cast<float>(1 << (BITS - 1));

// 2^e as a T, in both halves of a register.
template <typename T>
__host__ __device__ constexpr uint32_t pair_of_power_of_two(int e) {
  const uint32_t h = static_cast<uint32_t>(DtypeTraits<T>::kExponentBias + e)
                     << DtypeTraits<T>::kMantissaBits;
  return h | h << 16;
}

// The pair (slot i, slot i + vpw/2) as code - 2^(BITS-1) (-8..7 or -2..1), exactly. V
// uses these (and channel K, in fp16). Summing P * scale * (M + code) over a long
// sequence and taking M * sum(P * scale) back at the end loses the result to fp32
// rounding (the two sums are M * sqrt(n) times larger than the output for values of
// either sign) and overflows where the values are large; centred codes keep every
// partial sum on the output's own scale.
// With as few shifts as T's mantissa allows (MantissaSlots; bf16 2 bits: pairs 0-2 at
// shift 0, 3-5 at 6, 6-7 at 12; fp16 4 bits: 0-1 at 0, 2-3 at 8; fp16 2 bits: 0-4 at 0,
// 5-7 at 10; bf16 4 bits: every pair its own shift), pair i is read at mantissa bit b_i
// under the exponent that gives that bit the weight 1, as the T number 2^(M - b_i) +
// code (M mantissa bits), and 2^(M - b_i) + centre comes off: the value a shift to bit
// 0 under the fixed magic gives, in fewer instructions.
template <typename T, int BITS>
__host__ __device__ __forceinline__ uint32_t unpack_pair_centred(uint32_t word, int i) {
  constexpr int M = DtypeTraits<T>::kMantissaBits;
  constexpr auto kT = MantissaSlots<M, BITS>::kTable;
  const int b = kT.bit[i];
  const uint32_t magic = pair_of_power_of_two<T>(M - b);       // 2^(M - b)
  const uint32_t centre = magic | (0x00010001u << (BITS - 1 + b));  // 2^(M - b) + centre
  const uint32_t biased = lop3_and_or(word >> kT.shift[i], kPairMask<BITS> << b, magic);
  return DtypeTraits<T>::sub2(biased, centre);
}

// ---- small quotients without a division --------------------------------------------
// n / d for 0 <= n < 256 and 1 <= d <= 256 (a query row over the query heads per KV
// head) as n * ceil(2^16 / d) >> 16: the reciprocal is 2^16 / d + e / d with e < d, so
// the product overshoots n / d by n * e / (d * 2^16) < 1 / d, which no fractional part
// of n / d (at most 1 - 1 / d) can carry over the next integer. A runtime integer
// division is some twenty instructions, and the decode kernel needs one per query row.
struct SmallDivisor {
  uint32_t divisor, reciprocal;
  __host__ __device__ explicit SmallDivisor(uint32_t d)
      : divisor(d), reciprocal((65536u + d - 1) / d) {}
  __host__ __device__ __forceinline__ uint32_t quotient(uint32_t n) const {
    return (n * reciprocal) >> 16;
  }
};

// ---- in-row channel order (the CUDA twin of page_format.py's *_channel_of_slot) ----
template <int HEAD, int BITS>
struct RowOrder {
  static constexpr int kValuesPerWord = 32 / BITS;
  static constexpr int kRowWords = HEAD * BITS / 32;
  static constexpr int kRowBytes = kRowWords * 4;
  static constexpr int kKWordsPerLane = kRowWords / 4;   // lane quad position t owns these
  static constexpr int kKStepsPerWord = kValuesPerWord / 4;
  static constexpr int kVWordsPerLane = kRowWords / 8;   // lane group c = lane/4 owns these

  // K: (word, slot) -> channel, as page_format._k_channel_of_slot.
  __host__ __device__ static int k_channel(int word, int slot) {
    const int t = word / kKWordsPerLane, w = word % kKWordsPerLane;
    const int i = slot % (kValuesPerWord / 2), elem = slot / (kValuesPerWord / 2);
    const int kstep = w * kKStepsPerWord + i / 2;
    return 16 * kstep + 8 * (i % 2) + 2 * t + elem;
  }
  // V: (word, slot) -> channel, as page_format._v_channel_of_slot.
  __host__ __device__ static int v_channel(int word, int slot) {
    const int c = word / kVWordsPerLane, h = word % kVWordsPerLane;
    return c + 8 * (h * kValuesPerWord + slot);
  }
  // K: channel -> (word, slot). Inverse of page_format._k_channel_of_slot.
  __host__ __device__ static void k_slot(int channel, int& word, int& slot) {
    const int kstep = channel / 16, r = channel % 16;
    const int part = r / 8, t = (r % 8) / 2, elem = r % 2;
    const int i = 2 * (kstep % kKStepsPerWord) + part;
    word = t * kKWordsPerLane + kstep / kKStepsPerWord;
    slot = i + elem * (kValuesPerWord / 2);
  }
  // V: channel -> (word, slot). Inverse of page_format._v_channel_of_slot.
  __host__ __device__ static void v_slot(int channel, int& word, int& slot) {
    const int c = channel % 8, j = channel / 8;
    word = c * kVWordsPerLane + j / kValuesPerWord;
    slot = j % kValuesPerWord;
  }
};

// Fast Walsh-Hadamard transform of one 128-vector held by a warp, 4 consecutive values
// per lane (lane l: elements 4l .. 4l+3), with the sign flip first and the 1/sqrt(128)
// scale last: the same butterflies in the same order as reference.rotate, so results
// are bit-identical (the decode rotates Q with it, the quantize-on-write K). Distances 1
// and 2 stay in registers, 4 .. 64 use shuffles.
__device__ __forceinline__ void rotate_row_warp(float (&v)[4], const float* signs, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] *= signs[4 * lane + j];
#pragma unroll
  for (int h = 1; h <= 2; h *= 2)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j & h) continue;
      const float a = v[j], b = v[j + h];
      v[j] = a + b;
      v[j + h] = a - b;
    }
#pragma unroll
  for (int m = 1; m < 32; m *= 2) {  // distance 4m: the partner element is in lane ^ m
    const bool upper = lane & m;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float other = __shfl_xor_sync(0xffffffffu, v[j], m);
      v[j] = upper ? other - v[j] : v[j] + other;
    }
  }
  const float inv = static_cast<float>(1.0 / sqrt(128.0));  // as reference
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = __fmul_rn(v[j], inv);  // no fma with what follows
}

// Per-channel K mode: the block_size rows of K (kv = 0) or V (kv = 1) of one residual
// slot and KV head. The residual is [num_slots][2][num_kv_heads][block_size][HEAD].
template <int HEAD, typename Ptr>
__device__ __forceinline__ Ptr kc_residual_rows(Ptr residual, int64_t slot, int kv,
                                                int num_kv_heads, int head, int block_size) {
  return residual +
         ((slot * 2 + kv) * num_kv_heads + head) * static_cast<int64_t>(block_size) * HEAD;
}

// Per-channel K mode: where channel c's scale sits among the 2 * HEAD fp16 K params of a
// K group (its zc sits 4 further), the twin of reference_kc.k_param_index. Each 16-channel
// block holds, for t = 0..3, [s(2t), s(2t+1), s(2t+8), s(2t+9), zc(same four)]: the 16
// bytes lane quad position t needs for one MMA k-step, so one 128-bit load brings them.
__host__ __device__ __forceinline__ int kc_param_index(int c) {
  const int r = c % 16;
  return (c / 16) * 32 + ((r % 8) / 2) * 8 + (r / 8) * 2 + r % 2;
}

// K params in fp8 e4m3 (k_params="fp8"): the same order, one byte each. zc saturates at
// the largest e4m3 value, the scale is at least the smallest (reference_kc.FP8_MAX, ...).
constexpr float kE4m3Max = 448.0f;
constexpr float kE4m3MinScale = 0x1p-9f;
__device__ __forceinline__ float e4m3_to_float(uint8_t x) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(x, __NV_E4M3)));
}

// Two e4m3 bytes (low byte first) -> an fp16 pair (low half first): one cvt.
__device__ __forceinline__ uint32_t e4m3x2_to_half2(uint32_t two_bytes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
      static_cast<__nv_fp8x2_storage_t>(two_bytes & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// Nearest e4m3 to x, saturating at +-448 (round half to even, as torch's conversion).
__device__ __forceinline__ uint8_t float_to_e4m3(float x) {
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

}  // namespace bitdecode
