// Top-k of a selection layer of sparse decode (docs/sparse-mode-design.md, issue #6):
// keep each decode row's newest position plus the token_budget - 1 older positions of the
// highest keys, ascending. The keys are what the layer's dense decode wrote
// (decode_kernel.cuh with p.sel_keys): one 32-bit order key per token and KV head (or
// one per token, shared), the token's best scaled logit over the heads that share the
// position set. The GPU twin of reference_sparse.select (aggregate "max_logit").
//
// select_topk_kernel, grid (num_seqs, num_sel_heads), 1024 threads, no host
// synchronisation (CUDA graphs capture it):
//   1. three radix rounds (11 + 11 + 10 bits) over the row's older keys find the
//      (k-1)-th largest key T, how many keys are above it and how many keys equal T
//      to keep (the lowest positions among the ties);
//   2. each warp counts what it keeps of its contiguous share of the positions, one
//      scan over the 32 warps gives each its output offset, and each warp writes its
//      positions in order: the list comes out ascending without a block-wide scan per
//      chunk;
//   3. with a shared set, the keys it consumed go back to 0 for the next atomicMax.
// Keys are read 16 bytes at a time where aligned; each round and the two passes of 2.
// read them once more (they sit in L2 after the first: 4 bytes per token and head).
#pragma once

#include <cub/warp/warp_scan.cuh>

#include <cstdint>

#include "bitdecode/params.h"
#include "bitdecode/selection.cuh"

namespace bitdecode {

constexpr int kSelectTopkThreads = 1024;

// f(position, key) for every position in [0, count) of keys[], spread over the CTA's
// threads; the aligned middle in 16-byte loads, four of them in flight per thread.
template <int kThreads, typename F>
__device__ __forceinline__ void for_each_key(const uint32_t* keys, int count, F&& f) {
  const int misaligned = static_cast<int>(reinterpret_cast<uintptr_t>(keys) & 15u) / 4;
  const int lead = min(count, (4 - misaligned) & 3);
  if (static_cast<int>(threadIdx.x) < lead) f(threadIdx.x, keys[threadIdx.x]);
  const uint4* vec = reinterpret_cast<const uint4*>(keys + lead);
  const int num_vec = (count - lead) / 4;
  constexpr int kUnroll = 4;
  for (int base = 0; base < num_vec; base += kThreads * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      v[u] = i < num_vec ? vec[i] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      if (i < num_vec) {
        const int pos = lead + 4 * i;
        f(pos, v[u].x), f(pos + 1, v[u].y), f(pos + 2, v[u].z), f(pos + 3, v[u].w);
      }
    }
  }
  const int tail = lead + 4 * num_vec + static_cast<int>(threadIdx.x);
  if (tail < count) f(tail, keys[tail]);
}

// One radix round: histogram of the key bits [shift, shift + bits) among the older keys
// whose higher bits equal `prefix`, then the bin holding the `need`-th largest of them.
// Returns the bin; `need` becomes the rank inside it.
template <int kThreads>
__device__ uint32_t select_round(const uint32_t* keys, int count, uint32_t prefix,
                                 uint32_t prefix_mask, int shift, int bits, int& need,
                                 uint32_t* hist, int* shared_int) {
  constexpr int kBins = 2048;
  constexpr int kPerThread = kBins / kThreads;
  static_assert(kBins % kThreads == 0, "whole bins per thread");
  const uint32_t bin_mask = (1u << bits) - 1u;
  for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0u;
  __syncthreads();
  for_each_key<kThreads>(keys, count, [&](int, uint32_t key) {
    if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & bin_mask], 1u);
  });
  __syncthreads();
  // counts from the top bin down: thread x holds bins kBins-1-(x*kPerThread+j)
  int local[kPerThread];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    local[j] = static_cast<int>(hist[kBins - 1 - (threadIdx.x * kPerThread + j)]);
    sum += local[j];
  }
  // exclusive sum over the threads: within each warp, then over the warps
  using WarpScan = cub::WarpScan<int>;
  __shared__ typename WarpScan::TempStorage warp_scan[kThreads / 32];
  __shared__ int warp_total[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int before = 0;
  WarpScan(warp_scan[warp]).ExclusiveSum(sum, before);
  if (lane == 31) warp_total[warp] = before + sum;
  __syncthreads();
  int warps_before = 0;
  for (int w = 0; w < warp; ++w) warps_before += warp_total[w];
  int running = warps_before + before;  // keys in the bins above this thread's
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
  __syncthreads();  // shared_int and hist are reused by the next round
  return bin;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) select_topk_kernel(SelectParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ uint32_t hist[2048];
  __shared__ int shared_int[2];
  __shared__ int warp_keep[kWarps], warp_ties[kWarps];
  const int seq = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int budget = p.sel_budget;
  int32_t* positions = p.sel_positions + seq * p.sel_stride_seq + h * p.sel_stride_head;
  const int n = seq < p.num_seqs ? p.seq_lens[seq] : 0;
  const int64_t row0 = seq < p.num_seqs ? p.key_offsets[seq] : 0;
  const bool has_keys = selection_row_has_keys(n, row0, p.min_seq_len, p.key_capacity);
  uint32_t* keys = p.keys + h * p.key_capacity + row0;

  int count = 0;  // padding row
  if (n >= 1) count = has_keys ? min(budget, n) : kSelDenseRow;
  if (h == 0 && threadIdx.x == 0) p.sel_count[seq] = count;
  if (count <= 0) {
    for (int i = threadIdx.x; i < budget; i += kThreads) positions[i] = -1;
    return;
  }
  if (n <= budget) {  // every position
    for (int i = threadIdx.x; i < budget; i += kThreads) positions[i] = i < n ? i : -1;
  } else if (budget > 1) {
    // the budget - 1 best of the n - 1 older positions, then the newest
    const int older = n - 1;
    int need = budget - 1;
    uint32_t prefix = 0u, prefix_mask = 0u;
    constexpr int kShifts[3] = {21, 10, 0}, kWidths[3] = {11, 11, 10};
#pragma unroll
    for (int r = 0; r < 3; ++r) {
      const uint32_t bin = select_round<kThreads>(keys, older, prefix, prefix_mask,
                                                  kShifts[r], kWidths[r], need, hist,
                                                  shared_int);
      prefix |= bin << kShifts[r];
      prefix_mask |= ((1u << kWidths[r]) - 1u) << kShifts[r];
    }
    // prefix is now the threshold key T: the keys above it and the `need` lowest
    // positions among the keys equal to it are the budget - 1 kept
    const uint32_t threshold = prefix;
    const int ties_wanted = need;
    // Warp w owns positions [begin, end), a multiple of kChunk long, and walks them kChunk
    // at a time: kUnroll loads of 32 consecutive keys in flight, then the ballots in order.
    constexpr int kUnroll = 8, kChunk = 32 * kUnroll;
    const int share = ((older + kWarps - 1) / kWarps + kChunk - 1) / kChunk * kChunk;
    const int begin = min(warp * share, older), end = min(begin + share, older);
    auto load_chunk = [&](int base, uint32_t (&v)[kUnroll]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + 32 * u + lane;
        v[u] = i < end ? keys[i] : 0u;
      }
    };
    int greater = 0, tie = 0;
    for (int base = begin; base < end; base += kChunk) {
      uint32_t v[kUnroll];
      load_chunk(base, v);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool in = base + 32 * u + lane < end;
        greater += __popc(__ballot_sync(0xffffffffu, in && v[u] > threshold));
        tie += __popc(__ballot_sync(0xffffffffu, in && v[u] == threshold));
      }
    }
    if (lane == 0) warp_keep[warp] = greater, warp_ties[warp] = tie;
    __syncthreads();
    // ties go to the lowest positions, so to the first warps that hold any
    int offset = 0, ties_before = 0;
    for (int w = 0; w < warp; ++w) {
      offset += warp_keep[w] + max(0, min(warp_ties[w], ties_wanted - ties_before));
      ties_before += warp_ties[w];
    }
    int tie_quota = max(0, min(tie, ties_wanted - ties_before));
    const unsigned lower = (1u << lane) - 1u;
    for (int base = begin; base < end; base += kChunk) {
      uint32_t v[kUnroll];
      load_chunk(base, v);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + 32 * u + lane;
        const bool is_tie = i < end && v[u] == threshold;
        const unsigned tie_mask = __ballot_sync(0xffffffffu, is_tie);
        const bool take = (i < end && v[u] > threshold) ||
                          (is_tie && __popc(tie_mask & lower) < tie_quota);
        const unsigned take_mask = __ballot_sync(0xffffffffu, take);
        if (take) positions[offset + __popc(take_mask & lower)] = i;
        offset += __popc(take_mask);
        tie_quota -= min(tie_quota, __popc(tie_mask));
      }
    }
    if (threadIdx.x == 0) positions[budget - 1] = n - 1;
  } else if (threadIdx.x == 0) {  // a budget of 1 keeps the newest position only
    positions[0] = n - 1;
  }
  if (p.shared) {  // atomicMax needs zeros next time
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = 0u;
  }
}

}  // namespace bitdecode
