// Selection layers of sparse decode (docs/sparse-mode-design.md, issue #6): rank every
// older position of a decode row by its best scaled logit over the query heads that
// share the position set, and keep the newest position plus the token_budget - 1 best.
// The GPU twin of reference_sparse.select (aggregate "max_logit").
//
// Two kernels, no host synchronisation (CUDA graphs capture them):
//
// 1. select_score_kernel, grid (ceil(max_tokens / 128), num_kv_heads, num_seqs): one
//    thread per token dequantizes its K row and takes the dot product with the group's
//    query heads (rotated like K, in shared memory), the maximum over the heads becomes
//    an order-preserving 32-bit key in the row's slice of a key workspace. The slice is
//    indexed by (row offset + position), not by physical slot: rows that share prefix
//    pages have different queries, so their keys must not meet. With one set shared by
//    all KV heads, the KV heads atomicMax into one key.
// 2. select_topk_kernel, grid (num_seqs, num_sel_heads), 1024 threads: a three-round
//    radix select (11 + 11 + 10 bits) over the row's older keys finds the k-1-th largest
//    key T and how many keys equal to T to keep; one more pass writes the positions in
//    ascending order (keys > T, then the lowest positions among those equal to T), and
//    the newest position last. It also writes sel_count and resets the keys it consumed
//    when they were combined with atomicMax.
//
// This is the first, unfused version: the score pass reads K once more than the dense
// decode of the same layer. Fusing it into the dense kernel's S^T epilogue is the planned
// next step once this one is measured.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "bitdecode/fragments.cuh"
#include "bitdecode/params.h"

namespace bitdecode {

constexpr int kSelectScoreThreads = 128;   // tokens per score CTA
constexpr int kSelectTopkThreads = 1024;
constexpr int kSelectMaxGqa = 16;

// Larger float <=> larger unsigned key; NaN sorts below everything (-inf included).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) return 0u;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T, int HEAD, int BITS, int GROUP>
__global__ void __launch_bounds__(kSelectScoreThreads)
    select_score_kernel(SelectParams p) {
  using Tr = DtypeTraits<T>;
  using Order = RowOrder<HEAD, BITS>;
  constexpr int kGroups = HEAD / GROUP;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  static_assert(HEAD == 128, "one query row per warp, 4 channels per lane");
  const int kv_head = blockIdx.y, seq = blockIdx.z;
  const int gqa = p.num_heads / p.num_kv_heads;
  const int n = p.seq_lens[seq];
  const int64_t row0 = p.key_offsets[seq];
  // rows the select kernel decodes densely or leaves empty get no keys
  if (n < 1 || n < p.min_seq_len || row0 < 0 || row0 + n > p.key_capacity) return;
  if (static_cast<int>(blockIdx.x) * kSelectScoreThreads >= n) return;

  __shared__ float q_smem[kSelectMaxGqa][HEAD];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < gqa; h += kSelectScoreThreads / 32) {
    const T* src = static_cast<const T*>(p.q) + seq * p.q_stride_token +
                   (kv_head * gqa + h) * p.q_stride_head + 4 * lane;
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = Tr::to_float(src[j]);
    if (p.rotation_signs != nullptr) rotate_row_warp(v, p.rotation_signs, lane);
#pragma unroll
    for (int j = 0; j < 4; ++j) q_smem[h][4 * lane + j] = v[j] * p.softmax_scale;
  }
  __syncthreads();

  const int pos = blockIdx.x * kSelectScoreThreads + threadIdx.x;
  if (pos >= n) return;
  const int page = p.block_table[seq * p.block_table_stride + (pos >> p.page.block_shift)];
  const int offset = pos & (p.page.block_size - 1);
  const uint8_t* region = p.cache + static_cast<int64_t>(page) * p.cache_stride_block +
                          kv_head * p.cache_stride_head;
  // the token's packed K row, 16 bytes at a time (rows are 16-byte aligned)
  uint32_t words[Order::kRowWords];
  const uint4* row = reinterpret_cast<const uint4*>(region + offset * p.page.row_bytes);
#pragma unroll
  for (int i = 0; i < Order::kRowWords / 4; ++i) {
    const uint4 v = row[i];
    words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
  }
  const T* prm = reinterpret_cast<const T*>(region + p.page.params_offset +
                                            offset * p.page.param_bytes);
  float k_scale[kGroups], k_zero[kGroups];
#pragma unroll
  for (int gi = 0; gi < kGroups; ++gi) {
    k_scale[gi] = Tr::to_float(prm[2 * gi]);
    k_zero[gi] = Tr::to_float(prm[2 * gi + 1]);
  }
  float acc[kSelectMaxGqa];
#pragma unroll
  for (int h = 0; h < kSelectMaxGqa; ++h) acc[h] = 0.0f;
  // fully unrolled: channel, group and shared-memory offsets are compile-time constants
#pragma unroll
  for (int w = 0; w < Order::kRowWords; ++w) {
    const uint32_t word = words[w];
#pragma unroll
    for (int slot = 0; slot < Order::kValuesPerWord; ++slot) {
      const int ch = Order::k_channel(w, slot);
      const float code = static_cast<float>((word >> (BITS * slot)) & kMask);
      const float k = fmaf(code, k_scale[ch / GROUP], k_zero[ch / GROUP]);  // as dequantize
#pragma unroll
      for (int h = 0; h < kSelectMaxGqa; ++h)
        if (h < gqa) acc[h] = fmaf(q_smem[h][ch], k, acc[h]);
    }
  }
  float best = acc[0];
#pragma unroll
  for (int h = 1; h < kSelectMaxGqa; ++h)
    if (h < gqa) best = fmaxf(best, acc[h]);
  const uint32_t key = order_key(best);
  if (p.shared) {
    atomicMax(p.keys + (row0 + pos), key);
  } else {
    p.keys[(row0 + pos) * p.num_kv_heads + kv_head] = key;
  }
}

// One radix round: histogram of the key bits [shift, shift + bits) among the older keys
// whose higher bits equal `prefix`, then the bin holding the `need`-th largest of them.
// Returns the bin; `need` becomes the rank inside it, `above` gains the keys of the bins
// above it.
template <int kThreads>
__device__ uint32_t select_round(const uint32_t* keys, int64_t stride, int count,
                                 uint32_t prefix, uint32_t prefix_mask, int shift, int bits,
                                 int& need, int& above, uint32_t* hist, int* shared_int) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  constexpr int kBins = 2048;
  constexpr int kPerThread = kBins / kThreads;
  const int bins = 1 << bits;
  for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += kThreads) {
    const uint32_t key = keys[i * stride];
    if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & (bins - 1)], 1u);
  }
  __syncthreads();
  // counts from the top bin down: thread t holds bins kBins-1-(t*kPerThread+j)
  int local[kPerThread];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    local[j] = static_cast<int>(hist[kBins - 1 - (threadIdx.x * kPerThread + j)]);
    sum += local[j];
  }
  int before = 0;  // keys in the bins above this thread's
  Scan(scan_storage).ExclusiveSum(sum, before);
  int running = before;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    // the bin where the count from the top first reaches `need`
    if (local[j] > 0 && running < need && running + local[j] >= need) {
      shared_int[0] = kBins - 1 - (threadIdx.x * kPerThread + j);
      shared_int[1] = running;
    }
    running += local[j];
  }
  __syncthreads();
  const uint32_t bin = static_cast<uint32_t>(shared_int[0]);
  need -= shared_int[1];
  above += shared_int[1];
  __syncthreads();  // shared_int and hist are reused by the next round
  return bin;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) select_topk_kernel(SelectParams p) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ uint32_t hist[2048];
  __shared__ int shared_int[2];
  const int seq = blockIdx.x, h = blockIdx.y;
  const int budget = p.sel_budget;
  int32_t* positions = p.sel_positions + seq * p.sel_stride_seq + h * p.sel_stride_head;
  const int n = seq < p.num_seqs ? p.seq_lens[seq] : 0;
  const int64_t row0 = seq < p.num_seqs ? p.key_offsets[seq] : 0;
  const bool has_keys = n >= 1 && n >= p.min_seq_len && row0 >= 0 && row0 + n <= p.key_capacity;
  const int sel_heads = p.shared ? 1 : p.num_kv_heads;
  uint32_t* keys = p.keys + row0 * sel_heads + h;
  const int64_t stride = sel_heads;

  int count = 0;  // padding row
  if (n >= 1) count = has_keys ? min(budget, n) : kSelDenseRow;
  if (h == 0 && threadIdx.x == 0) p.sel_count[seq] = count;
  if (count <= 0) {
    for (int i = threadIdx.x; i < budget; i += kThreads) positions[i] = -1;
    return;
  }
  if (n <= budget) {  // every position
    for (int i = threadIdx.x; i < budget; i += kThreads) positions[i] = i < n ? i : -1;
  } else {
    // the budget - 1 best of the n - 1 older positions, then the newest
    const int older = n - 1;
    int need = budget - 1, above = 0;
    uint32_t prefix = 0u, prefix_mask = 0u;
    constexpr int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
#pragma unroll
    for (int r = 0; r < 3; ++r) {
      if (need <= 0) break;
      const uint32_t bin = select_round<kThreads>(keys, stride, older, prefix, prefix_mask,
                                                  shifts[r], widths[r], need, above, hist,
                                                  shared_int);
      prefix |= bin << shifts[r];
      prefix_mask |= ((1u << widths[r]) - 1u) << shifts[r];
    }
    // prefix is now the threshold key T (when need > 0): `above` keys are larger, and
    // the `need` lowest positions with key T complete the set
    const uint32_t threshold = prefix;
    const int ties_wanted = need;
    const bool by_threshold = budget > 1;
    int written = 0, ties_seen = 0;
    for (int start = 0; start < older && by_threshold; start += kThreads) {
      const int i = start + threadIdx.x;
      const uint32_t key = i < older ? keys[static_cast<int64_t>(i) * stride] : 0u;
      const bool greater = i < older && key > threshold;
      const bool tie = i < older && key == threshold;
      int tie_rank = 0, tie_total = 0;
      Scan(scan_storage).ExclusiveSum(tie ? 1 : 0, tie_rank, tie_total);
      __syncthreads();
      const bool take = greater || (tie && ties_seen + tie_rank < ties_wanted);
      int slot = 0, taken = 0;
      Scan(scan_storage).ExclusiveSum(take ? 1 : 0, slot, taken);
      __syncthreads();
      if (take && written + slot < budget - 1) positions[written + slot] = i;
      written += taken;
      ties_seen += tie_total;
    }
    if (threadIdx.x == 0) positions[budget - 1] = n - 1;
  }
  if (p.shared) {  // atomicMax needs zeros next time
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) keys[static_cast<int64_t>(i) * stride] = 0u;
  }
}

}  // namespace bitdecode
