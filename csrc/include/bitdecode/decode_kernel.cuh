// Split-K paged decode attention over quantized pages, on tensor cores.
//
// Grid (num_splits, num_kv_heads, num_seqs), 4 warps. A CTA owns one KV head of one
// sequence and a contiguous range of 16-token tiles; the query heads of the GQA group
// fill the M = 16 rows of mma.m16n8k16 (rows beyond the group are zero). Each warp
// streams every 4th tile:
//
//   S = Q K^T   8 k-steps x 2 n-tiles; K codes go from the page into B-fragment
//               registers with one lop3 per register (page_format.py's K order),
//               as M + code (M = 128 for bf16, 1024 for fp16, exact); per-token
//               scale/zero are applied to the fp32 accumulator, M folded into zero:
//               S = scale * (Q . (M + codes)) + (zero - scale * M) * sum(Q)
//   softmax     online, in registers, base 2
//   O += P V    P's accumulator fragments are V's A operand (no shared memory);
//               the V scale multiplies P's columns, the V zero adds P . zero
//               (V codes are unbiased first: see unpack_pair_biased). The output is
//               rescaled only in steps where some row's running max moved.
//
// The four warps merge through shared memory; with several splits the CTA writes a
// normalized partial output and its log-sum-exp, and combine_kernel reduces them.
#pragma once

#include <cfloat>

#include "bitdecode/fragments.cuh"
#include "bitdecode/params.h"

namespace bitdecode {

constexpr int kDecodeWarps = 4;
constexpr int kTileTokens = 16;  // one PV k-step
constexpr int kMaxGqa = 16;      // query heads per KV head that fit the MMA M dimension
// 16-token tiles in flight per warp: 3 fit the registers at group 128 (217 at 4 bits,
// no spills); finer groups hold more accumulators and would spill at 3.
constexpr int stages_for_group(int group) { return group == 128 ? 3 : 2; }

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* src, uint32_t (&dst)[N]) {
  static_assert(N == 1 || N == 2 || N == 4 || N == 8, "vector width");
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

// What one lane needs of one 16-token tile, loaded straight from the page.
template <int HEAD, int BITS, int GROUP>
struct TileRegs {
  using Order = RowOrder<HEAD, BITS>;
  static constexpr int kGroups = HEAD / GROUP;
  uint32_t k[2][Order::kKWordsPerLane];  // tokens g and g + 8 (the two S n-tiles)
  uint32_t v[4][Order::kVWordsPerLane];  // tokens 2t, 2t+1, 2t+8, 2t+9
  uint32_t prm[4][2 * kGroups];          // same 4 tokens: K (scale, zero) x groups, then V

  __device__ void load(const uint8_t* head_page, int offset, const PageGeometry& pg, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const uint8_t* row = head_page + (offset + nt * 8 + g) * Order::kRowBytes;
      load_words(row + t * Order::kKWordsPerLane * 4, k[nt]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = offset + token_of(i, t);
      load_words(head_page + pg.v_rows_offset + tok * Order::kRowBytes +
                     g * Order::kVWordsPerLane * 4, v[i]);
      load_words(head_page + pg.params_offset + tok * pg.param_bytes, prm[i]);
    }
  }
  // Token (within the tile) of this lane's i-th V / param slot.
  __device__ static int token_of(int i, int t) { return 2 * t + (i & 1) + 8 * (i >> 1); }
};

// Forcing 3 CTAs/SM (<= 168 registers) was measured slower at large batches on an
// H100 (wave quantization, spills), so the compiler keeps its 182 registers.
template <typename T, int HEAD, int BITS, int GROUP>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(DecodeParams p) {
  using Tr = DtypeTraits<T>;
  using Order = RowOrder<HEAD, BITS>;
  using Tile = TileRegs<HEAD, BITS, GROUP>;
  constexpr int kGroups = HEAD / GROUP;
  constexpr int kKSteps = HEAD / 16;
  constexpr int kNTiles = HEAD / 8;
  constexpr int kRows = 16;
  constexpr int kHalf = Order::kValuesPerWord / 2;

  __shared__ float q_smem[kRows * HEAD];
  __shared__ float merge_o[kDecodeWarps][kRows * HEAD];
  __shared__ float merge_m[kDecodeWarps][kRows];
  __shared__ float merge_l[kDecodeWarps][kRows];
  __shared__ float qsum_smem[kRows][kGroups];

  const int split = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int gqa = p.num_heads / p.num_kv_heads;
  const int seq_len = p.seq_lens[seq];
  const int num_tiles = (seq_len + kTileTokens - 1) / kTileTokens;
  const int per_split =
      max((num_tiles + p.num_splits - 1) / p.num_splits, p.min_tiles_per_split);
  const int tile_begin = split * per_split;
  const int tile_end = min(tile_begin + per_split, num_tiles);

  if (tile_begin >= tile_end) {  // nothing to read: an empty split, or seq_len == 0
    for (int idx = threadIdx.x; idx < gqa * HEAD; idx += blockDim.x) {
      const int head = kv_head * gqa + idx / HEAD, c = idx % HEAD;
      if (p.num_splits == 1) {
        static_cast<T*>(p.out)[seq * p.out_stride_token + head * p.out_stride_head + c] =
            Tr::from_float(0.0f);
      } else if (c == 0) {
        p.partial_lse[(static_cast<int64_t>(split) * p.num_seqs + seq) * p.num_heads + head] =
            -INFINITY;
      }
    }
    return;
  }

  // ---- Q: load the group's heads, rotate like K, round to T, per-group sums ----------
  for (int idx = threadIdx.x; idx < kRows * HEAD; idx += blockDim.x) {
    const int row = idx / HEAD, c = idx % HEAD;
    float x = 0.0f;
    if (row < gqa) {
      x = Tr::to_float(static_cast<const T*>(p.q)[seq * p.q_stride_token +
                                                  (kv_head * gqa + row) * p.q_stride_head + c]);
    }
    q_smem[idx] = x;
  }
  __syncthreads();
  if (p.rotation_signs != nullptr) rotate_rows_smem<HEAD>(q_smem, kRows, p.rotation_signs);
  for (int idx = threadIdx.x; idx < kRows * HEAD; idx += blockDim.x) {
    q_smem[idx] = Tr::to_float(Tr::from_float(q_smem[idx]));  // the values the MMA sees
  }
  __syncthreads();
  if (threadIdx.x < kRows * kGroups) {
    const int row = threadIdx.x / kGroups, gi = threadIdx.x % kGroups;
    float s = 0.0f;
    for (int c = 0; c < GROUP; ++c) s += q_smem[row * HEAD + gi * GROUP + c];
    qsum_smem[row][gi] = s;
  }
  uint32_t qa[kKSteps][4];  // A fragments of Q for every k-step
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    const float* r0 = q_smem + g * HEAD + 16 * ks + 2 * t;
    const float* r1 = r0 + 8 * HEAD;
    qa[ks][0] = Tr::pack(r0[0], r0[1]);
    qa[ks][1] = Tr::pack(r1[0], r1[1]);
    qa[ks][2] = Tr::pack(r0[8], r0[9]);
    qa[ks][3] = Tr::pack(r1[8], r1[9]);
  }
  __syncthreads();
  float qsum[2][kGroups];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) qsum[r][gi] = qsum_smem[g + 8 * r][gi];

  // ---- stream tiles --------------------------------------------------------------
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const uint8_t* head_base = p.cache + kv_head * p.cache_stride_head;
  const int32_t* table = p.block_table + seq * p.block_table_stride;
  auto tile_page = [&](int tile, int& offset) {
    const int token0 = tile * kTileTokens;
    offset = token0 % p.page.block_size;
    return head_base + static_cast<int64_t>(table[token0 / p.page.block_size]) *
                           p.cache_stride_block;
  };

  float o[kNTiles][4];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float zsum[2][kGroups];  // sum over tokens of P * V zero, per row and group
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) zsum[r][gi] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};

  // Each warp keeps kStages tiles of loads in flight (register ring, compile-time
  // indexed after unrolling): decode is latency-bound at one tile of look-ahead.
  constexpr int kStages = stages_for_group(GROUP);
  Tile ring[kStages];
  auto load_tile = [&](int tile, Tile& dst) {
    int off;
    const uint8_t* pg = tile_page(tile, off);
    dst.load(pg, off, p.page, lane);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    const int tile = tile_begin + warp + s * kDecodeWarps;
    if (tile < tile_end) load_tile(tile, ring[s]);
  }
  auto process = [&](const Tile& cur, int tile) {
    const int token0 = tile * kTileTokens;

    // per-token scale / zero of this lane's 4 tokens; tokens past the end get 0 so that
    // whatever bytes sit there cannot turn into NaN
    float k_scale[4][kGroups], k_zero[4][kGroups], v_scale[4][kGroups], v_zero[4][kGroups];
    bool valid[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      valid[i] = token0 + Tile::token_of(i, t) < seq_len;
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        const T* kp = reinterpret_cast<const T*>(&cur.prm[i][gi]);
        const T* vp = reinterpret_cast<const T*>(&cur.prm[i][kGroups + gi]);
        k_scale[i][gi] = valid[i] ? Tr::to_float(kp[0]) : 0.0f;
        k_zero[i][gi] = valid[i] ? Tr::to_float(kp[1]) - k_scale[i][gi] * Tr::kMagicValue : 0.0f;
        v_scale[i][gi] = valid[i] ? Tr::to_float(vp[0]) : 0.0f;
        v_zero[i][gi] = valid[i] ? Tr::to_float(vp[1]) : 0.0f;
      }
    }

    // S = Q . codes per group
    float acc[kGroups][2][4];
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) acc[gi][nt][0] = acc[gi][nt][1] = acc[gi][nt][2] = acc[gi][nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const int gi = ks * 16 / GROUP;
      const int w = ks / Order::kKStepsPerWord, i0 = 2 * (ks % Order::kKStepsPerWord);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint32_t b0 = unpack_pair_biased<T, BITS>(cur.k[nt][w], i0);
        const uint32_t b1 = unpack_pair_biased<T, BITS>(cur.k[nt][w], i0 + 1);
        Tr::mma(acc[gi][nt], qa[ks], b0, b1);
      }
    }
    // scores in the log2 domain; element (nt, r): row g + 8 (r >> 1), token 8 nt + 2t + (r & 1)
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = 2 * nt + (r & 1);
        float x = 0.0f;
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi)
          x += k_scale[i][gi] * acc[gi][nt][r] + k_zero[i][gi] * qsum[r >> 1][gi];
        s[nt][r] = valid[i] ? x * scale_log2 : -INFINITY;
      }

    // online softmax over the two rows this lane holds
    float p_[2][4], corr[2];
    bool moved = false;
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      float mx = fmaxf(fmaxf(s[0][2 * row], s[0][2 * row + 1]),
                       fmaxf(s[1][2 * row], s[1][2 * row + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[row], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      corr[row] = exp2f(m_run[row] - m_use);
      moved |= m_new != m_run[row];
      m_run[row] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          p_[nt][2 * row + c] = exp2f(s[nt][2 * row + c] - m_use);
          sum += p_[nt][2 * row + c];
        }
      l_run[row] = l_run[row] * corr[row] + sum;
    }
    // Once the running max settles (most of a long sequence), this branch is skipped.
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int row = 0; row < 2; ++row) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) o[j][2 * row] *= corr[row], o[j][2 * row + 1] *= corr[row];
#pragma unroll
        for (int gi = 0; gi < kGroups; ++gi) zsum[row][gi] *= corr[row];
      }
    }

    // O += (P * v_scale) . codes  +  P . v_zero
#pragma unroll
    for (int gv = 0; gv < kGroups; ++gv) {
      uint32_t pa[4];
      pa[0] = Tr::pack(p_[0][0] * v_scale[0][gv], p_[0][1] * v_scale[1][gv]);
      pa[1] = Tr::pack(p_[0][2] * v_scale[0][gv], p_[0][3] * v_scale[1][gv]);
      pa[2] = Tr::pack(p_[1][0] * v_scale[2][gv], p_[1][1] * v_scale[3][gv]);
      pa[3] = Tr::pack(p_[1][2] * v_scale[2][gv], p_[1][3] * v_scale[3][gv]);
#pragma unroll
      for (int row = 0; row < 2; ++row) {
        zsum[row][gv] += p_[0][2 * row] * v_zero[0][gv] + p_[0][2 * row + 1] * v_zero[1][gv] +
                         p_[1][2 * row] * v_zero[2][gv] + p_[1][2 * row + 1] * v_zero[3][gv];
      }
#pragma unroll
      for (int j = gv * GROUP / 8; j < (gv + 1) * GROUP / 8; ++j) {
        const int h = j / Order::kValuesPerWord, slot = j % Order::kValuesPerWord;
        const uint32_t sel = slot < kHalf ? 0x5410u : 0x7632u;
        const uint32_t ab = __byte_perm(cur.v[0][h], cur.v[1][h], sel);  // tokens 2t, 2t+1
        const uint32_t cd = __byte_perm(cur.v[2][h], cur.v[3][h], sel);  // tokens 2t+8, 2t+9
        Tr::mma(o[j], pa, Tr::sub_magic(unpack_pair_biased<T, BITS>(ab, slot % kHalf)),
                Tr::sub_magic(unpack_pair_biased<T, BITS>(cd, slot % kHalf)));
      }
    }
  };
  for (int base = tile_begin + warp; base < tile_end; base += kStages * kDecodeWarps) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      const int tile = base + s * kDecodeWarps;
      if (tile < tile_end) {
        const int ahead = tile + (kStages - 1) * kDecodeWarps;
        if (ahead < tile_end) load_tile(ahead, ring[(s + kStages - 1) % kStages]);
        process(ring[s], tile);
      }
    }
  }

  // ---- finish this warp: quad sums, add the V zero term, hand to shared memory ------
#pragma unroll
  for (int row = 0; row < 2; ++row) {
    l_run[row] += __shfl_xor_sync(0xffffffffu, l_run[row], 1);
    l_run[row] += __shfl_xor_sync(0xffffffffu, l_run[row], 2);
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      zsum[row][gi] += __shfl_xor_sync(0xffffffffu, zsum[row][gi], 1);
      zsum[row][gi] += __shfl_xor_sync(0xffffffffu, zsum[row][gi], 2);
    }
  }
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const int gi = 8 * j / GROUP, c = 8 * j + 2 * t;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r >> 1);
      merge_o[warp][row * HEAD + c + (r & 1)] = o[j][r] + zsum[r >> 1][gi];
    }
  }
  if (t == 0) {
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      merge_m[warp][g + 8 * row] = m_run[row];
      merge_l[warp][g + 8 * row] = l_run[row];
    }
  }
  __syncthreads();

  // ---- merge the warps; write the output or this split's partial ---------------------
  for (int idx = threadIdx.x; idx < gqa * HEAD; idx += blockDim.x) {
    const int row = idx / HEAD, c = idx % HEAD;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, merge_m[w][row]);
    float l = 0.0f, acc_o = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float f = merge_m[w][row] == -INFINITY ? 0.0f : exp2f(merge_m[w][row] - m);
      l += merge_l[w][row] * f;
      acc_o += merge_o[w][row * HEAD + c] * f;
    }
    const float result = l > 0.0f ? acc_o / l : 0.0f;
    const int head = kv_head * gqa + row;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[seq * p.out_stride_token + head * p.out_stride_head + c] =
          Tr::from_float(result);
    } else {
      const int64_t base = (static_cast<int64_t>(split) * p.num_seqs + seq) * p.num_heads + head;
      p.partial_out[base * HEAD + c] = result;
      if (c == 0) p.partial_lse[base] = l > 0.0f ? m + log2f(l) : -INFINITY;
    }
  }
}

// Reduce the splits of every (sequence, head): out = sum_s w_s o_s, w_s ~ 2^lse_s.
template <typename T, int HEAD>
__global__ void __launch_bounds__(HEAD) combine_kernel(DecodeParams p) {
  const int seq = blockIdx.x, head = blockIdx.y, c = threadIdx.x;
  const int64_t stride = static_cast<int64_t>(p.num_seqs) * p.num_heads;
  const int64_t base = static_cast<int64_t>(seq) * p.num_heads + head;
  float m = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, p.partial_lse[s * stride + base]);
  float total = 0.0f, acc = 0.0f;
  if (m != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse = p.partial_lse[s * stride + base];
      if (lse == -INFINITY) continue;  // an empty split wrote no partial output
      const float w = exp2f(lse - m);
      total += w;
      acc += w * p.partial_out[(s * stride + base) * HEAD + c];
    }
  }
  static_cast<T*>(p.out)[seq * p.out_stride_token + head * p.out_stride_head + c] =
      DtypeTraits<T>::from_float(total > 0.0f ? acc / total : 0.0f);
}

}  // namespace bitdecode
