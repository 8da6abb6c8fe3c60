// Top-k of a selection layer of sparse decode (docs/sparse-mode-design.md, issue #6):
// keep each decode row's newest position plus the token_budget - 1 older positions of the
// highest keys, ascending. The keys are what the layer's dense decode wrote
// (decode_kernel.cuh with p.sel_keys): one 32-bit order key per token and KV head (or
// one per token, shared), the token's best scaled logit over the heads that share the
// position set. The GPU twin of reference_sparse.select (aggregate "max_logit").
// With unit_shift = 4 (page granularity) the units ranked are 16-token pages (tiles),
// and the decode left one key per tile, the best of its tokens'; everything below then
// counts tiles instead of tokens (reference_sparse.select_pages).
//
// select_topk_kernel, one cluster of `ranks` 1024-thread CTAs per (row, selection head)
// (grid (num_seqs * ranks, num_sel_heads), ranks = 1 to 8: enough CTAs to fill the SMs
// when the batch is small; 1 for pages, launch_decode_select says why), no host
// synchronisation (CUDA graphs capture it). Each CTA
// owns a contiguous range of the row's older positions, each warp a contiguous share of
// that:
//   1. three radix rounds (11 + 11 + 10 bits): every CTA counts its range into its own
//      shared-memory histogram, the ranks add theirs into rank 0's (distributed shared
//      memory), and every CTA reads the sum and picks the same bin; the rounds find the
//      (k-1)-th largest key T and how many keys equal to T to keep (the lowest positions
//      among the ties);
//   2. each warp counts what it keeps of its share, reads the counts of the shares before
//      it (in every rank) for its output offset, and writes its positions in order: the
//      list comes out ascending without a block-wide scan per chunk;
//   3. with a shared set, each CTA returns the keys of its range to 0 for the next
//      atomicMax.
// Keys are read 16 bytes at a time where aligned in the rounds; the rounds and the two
// passes of 2. read them five times in all (4 bytes per token and head, in L2 at small
// batches), spread over ranks SMs.
#pragma once

#include <cooperative_groups.h>
#include <cub/warp/warp_scan.cuh>

#include <cstdint>

#include "bitdecode/params.h"
#include "bitdecode/selection.cuh"

namespace bitdecode {

constexpr int kSelectTopkThreads = 1024;
constexpr int kSelectMaxRanks = 8;  // CTAs per (row, head): the portable cluster size
constexpr int kSelectBins = 2048;   // histogram bins of a radix round (11 bits at most)
constexpr int kSelectRounds = 3;    // radix rounds over a 32-bit key: 11 + 11 + 10 bits

// The cluster's barrier, or the CTA's alone when the cluster is one CTA (page selection
// always; token selection per KV head from 9 rows on 8 KV heads and 132 SMs). On a launch
// with a cluster attribute, even of one CTA, cluster.sync() releases and acquires at
// cluster scope, which ptxas (13.0, sm_90a) emits as MEMBAR.ALL.GPU before the barrier and
// CCTL.IVALL after it: a GPU-wide fence and an L1 invalidation (the keys read again in the
// next pass then come from L2), six times per ranked top-k (eleven before each round had
// its own histogram); bar.sync needs neither.
__device__ __forceinline__ void cluster_barrier(cooperative_groups::cluster_group& cluster,
                                                bool one_cta) {
  if (one_cta) {
    __syncthreads();
  } else {
    cluster.sync();
  }
}

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

// One radix round: the cluster's histogram of the key bits [shift, shift + bits) among the
// older keys whose higher bits equal `prefix` (each CTA counts keys[0, count), its range),
// then the bin holding the `need`-th largest of them. Returns the bin; `need` becomes the
// rank inside it. Every CTA of the cluster calls it and gets the same answer. Each round
// has its own histogram, zeroed before the first (one cluster barrier for all three): no
// rank then zeroes a histogram another may still read, and the round needs one cluster
// barrier (the sum complete) where it had three.
template <int kThreads>
__device__ uint32_t select_round(cooperative_groups::cluster_group& cluster,
                                 const uint32_t* keys, int count, uint32_t prefix,
                                 uint32_t prefix_mask, int shift, int bits, int& need,
                                 uint32_t* hist, int* shared_int) {
  constexpr int kBins = kSelectBins;
  constexpr int kPerThread = kBins / kThreads;
  static_assert(kBins % kThreads == 0, "whole bins per thread");
  const uint32_t bin_mask = (1u << bits) - 1u;
  const bool one_cta = cluster.num_blocks() == 1;
  for_each_key<kThreads>(keys, count, [&](int, uint32_t key) {
    if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & bin_mask], 1u);
  });
  uint32_t* total = cluster.map_shared_rank(hist, 0);  // rank 0's, in the cluster's window
  if (cluster.block_rank() != 0) {
    __syncthreads();
    for (int b = threadIdx.x; b < kBins; b += kThreads)
      if (hist[b] != 0u) atomicAdd(&total[b], hist[b]);
  }
  cluster_barrier(cluster, one_cta);  // the sum is complete
  // counts from the top bin down: thread x holds bins kBins-1-(x*kPerThread+j)
  int local[kPerThread];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int b = kBins - 1 - (threadIdx.x * kPerThread + j);
    local[j] = static_cast<int>(one_cta ? hist[b] : total[b]);  // alone: ld.shared
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
  __syncthreads();  // shared_int is set
  const uint32_t bin = static_cast<uint32_t>(shared_int[0]);
  need -= shared_int[1];
  __syncthreads();  // shared_int is reused by the next round
  return bin;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) select_topk_kernel(SelectParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ uint32_t hist[kSelectRounds][kSelectBins];  // one per radix round
  __shared__ int shared_int[2];
  __shared__ int warp_keep[kWarps], warp_ties[kWarps];
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int ranks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int seq = blockIdx.x / ranks, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int budget = p.sel_budget;
  int32_t* positions = p.sel_positions + seq * p.sel_stride_seq + h * p.sel_stride_head;
  const int seq_len = seq < p.num_seqs ? p.seq_lens[seq] : 0;
  const int64_t row0 = seq < p.num_seqs ? p.key_offsets[seq] : 0;
  const bool has_keys = selection_row_has_keys(seq_len, row0, p.min_seq_len, p.key_capacity);
  // the row's units (tokens, or 16-token tiles), the last one holding the newest token
  const int n = (seq_len + (1 << p.unit_shift) - 1) >> p.unit_shift;
  uint32_t* keys = p.keys + h * p.key_capacity + row0;
  // a programmatic dependent of the selection layer's decode or combine
  // (launch_decode_select): the keys and the positions of the layers before are theirs
  // until that grid has finished
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // the cluster's threads, for work split evenly over them
  const int thread = rank * kThreads + threadIdx.x, stride = ranks * kThreads;

  // Every branch below is taken by the whole cluster (it depends on the row only), so
  // the cluster barriers inside the ranked branch are reached by all of its CTAs.
  int count = 0;  // padding row
  if (n >= 1) count = has_keys ? min(budget, n) : kSelDenseRow;
  if (h == 0 && thread == 0) p.sel_count[seq] = count;
  if (count <= 0) {
    for (int i = thread; i < budget; i += stride) positions[i] = -1;
    return;
  }
  // List entry `slot` is `unit`; with cache tiles also its place in the cache, for the
  // reuse layers (one block-table load here instead of one in each of them).
  int32_t* cache_tiles = p.sel_cache_tiles == nullptr
                             ? nullptr
                             : p.sel_cache_tiles + seq * p.sel_stride_seq + h * p.sel_stride_head;
  const int32_t* table = p.block_table + seq * p.block_table_stride;
  auto put = [&](int slot, int unit) {
    positions[slot] = unit;
    if (cache_tiles != nullptr) cache_tiles[slot] = cache_tile(table, unit, p.tile_shift);
  };
  // Positions [begin, end) of the older ones are this CTA's; warp w's share is
  // [warp_begin, warp_end), a whole number of kChunk-key chunks.
  constexpr int kUnroll = 8, kChunk = 32 * kUnroll;
  const int older = n - 1;
  const int per_warp = ((older + ranks * kWarps - 1) / (ranks * kWarps) + kChunk - 1) /
                       kChunk * kChunk;
  const int begin = min(rank * kWarps * per_warp, older);
  const int end = min(begin + kWarps * per_warp, older);
  if (n <= budget) {  // every position
    for (int i = thread; i < budget; i += stride) {
      if (i < n) {
        put(i, i);
      } else {
        positions[i] = -1;
      }
    }
  } else if (budget > 1) {
    // the budget - 1 best of the n - 1 older positions, then the newest
    int need = budget - 1;
    uint32_t prefix = 0u, prefix_mask = 0u;
#pragma unroll
    for (int r = 0; r < kSelectRounds; ++r)
      for (int b = threadIdx.x; b < kSelectBins; b += kThreads) hist[r][b] = 0u;
    cluster_barrier(cluster, ranks == 1);  // rank 0's histograms are zero before any adds
    constexpr int kShifts[kSelectRounds] = {21, 10, 0}, kWidths[kSelectRounds] = {11, 11, 10};
#pragma unroll
    for (int r = 0; r < kSelectRounds; ++r) {
      const uint32_t bin = select_round<kThreads>(cluster, keys + begin, end - begin, prefix,
                                                  prefix_mask, kShifts[r], kWidths[r], need,
                                                  hist[r], shared_int);
      prefix |= bin << kShifts[r];
      prefix_mask |= ((1u << kWidths[r]) - 1u) << kShifts[r];
    }
    // prefix is now the threshold key T: the keys above it and the `need` lowest
    // positions among the keys equal to it are the budget - 1 kept
    const uint32_t threshold = prefix;
    const int ties_wanted = need;
    const int warp_begin = min(begin + warp * per_warp, end);
    const int warp_end = min(warp_begin + per_warp, end);
    // kUnroll loads of 32 consecutive keys in flight, then the ballots in order
    auto load_chunk = [&](int base, uint32_t (&v)[kUnroll]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + 32 * u + lane;
        v[u] = i < warp_end ? keys[i] : 0u;
      }
    };
    int greater = 0, tie = 0;
    for (int base = warp_begin; base < warp_end; base += kChunk) {
      uint32_t v[kUnroll];
      load_chunk(base, v);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool in = base + 32 * u + lane < warp_end;
        greater += __popc(__ballot_sync(0xffffffffu, in && v[u] > threshold));
        tie += __popc(__ballot_sync(0xffffffffu, in && v[u] == threshold));
      }
    }
    if (lane == 0) warp_keep[warp] = greater, warp_ties[warp] = tie;
    cluster_barrier(cluster, ranks == 1);
    // The shares before this warp's, in every rank: their keys above T, and their ties,
    // which go to the lowest positions, so to the first shares.
    const int share = rank * kWarps + warp;
    int keep_before = 0, ties_before = 0;
    if (ranks == 1) {  // this CTA's counts, without the cluster's window
      for (int s = lane; s < share; s += 32) {
        keep_before += warp_keep[s];
        ties_before += warp_ties[s];
      }
    } else {
      for (int s = lane; s < share; s += 32) {
        const int* keep = cluster.map_shared_rank(warp_keep, s / kWarps);
        const int* ties = cluster.map_shared_rank(warp_ties, s / kWarps);
        keep_before += keep[s % kWarps];
        ties_before += ties[s % kWarps];
      }
    }
#pragma unroll
    for (int x = 16; x > 0; x /= 2) {
      keep_before += __shfl_xor_sync(0xffffffffu, keep_before, x);
      ties_before += __shfl_xor_sync(0xffffffffu, ties_before, x);
    }
    if (ranks > 1) cluster.sync();  // no CTA reads another's shared memory after this
    int offset = keep_before + min(ties_wanted, ties_before);
    int tie_quota = max(0, min(tie, ties_wanted - ties_before));
    const unsigned lower = (1u << lane) - 1u;
    for (int base = warp_begin; base < warp_end; base += kChunk) {
      uint32_t v[kUnroll];
      load_chunk(base, v);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + 32 * u + lane;
        const bool is_tie = i < warp_end && v[u] == threshold;
        const unsigned tie_mask = __ballot_sync(0xffffffffu, is_tie);
        const bool take = (i < warp_end && v[u] > threshold) ||
                          (is_tie && __popc(tie_mask & lower) < tie_quota);
        const unsigned take_mask = __ballot_sync(0xffffffffu, take);
        if (take) put(offset + __popc(take_mask & lower), i);
        offset += __popc(take_mask);
        tie_quota -= min(tie_quota, __popc(tie_mask));
      }
    }
    if (thread == 0) put(budget - 1, n - 1);
  } else if (thread == 0) {  // a budget of 1 keeps the newest position only
    put(0, n - 1);
  }
  if (p.shared) {  // atomicMax needs zeros next time
    if (n <= budget) {  // no ranges were read: split [0, n) evenly
      for (int i = thread; i < n; i += stride) keys[i] = 0u;
    } else {  // this CTA's range (its own reads are done: barrier), and the newest
      __syncthreads();
      for (int i = begin + static_cast<int>(threadIdx.x); i < end; i += kThreads) keys[i] = 0u;
      if (thread == 0) keys[n - 1] = 0u;
    }
  }
}

}  // namespace bitdecode
