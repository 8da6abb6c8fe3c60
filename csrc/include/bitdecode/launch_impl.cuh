// Definitions of the launchers declared in launch.h (included by the instantiation files).
#pragma once

#include <type_traits>

#include "bitdecode/decode_kernel.cuh"
#include "bitdecode/kc_write_kernel.cuh"
#include "bitdecode/launch.h"
#include "bitdecode/quantize_kernel.cuh"
#include "bitdecode/select_kernel.cuh"

namespace bitdecode {

constexpr int kHeadSize = 128;

// f(std::true_type{}) or f(std::false_type{}) as `flag` says: a run-time flag picks one of
// two instantiations, written once (FlashAttention's BOOL_SWITCH, as a function).
template <typename F>
decltype(auto) bool_switch(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Static plus dynamic shared memory may pass the 48 KB that a kernel gets without
// asking; ask once per device and kernel (a host-side setting: CUDA graphs keep it).
template <typename T, int BITS, int GROUP, int HEAD_TILES, bool SPARSE, bool KC = false,
          int SELECT = 0, bool KP8 = false>
void allow_decode_smem() {
  using Shape = DecodeShape<T, kHeadSize, BITS, GROUP, HEAD_TILES, KC, KP8>;
  constexpr int kMaxDevices = 64;
  static bool done[kMaxDevices] = {};  // one array per instantiation
  int device = 0;
  cudaGetDevice(&device);
  if (device < kMaxDevices && done[device]) return;
  cudaFuncSetAttribute(
      decode_kernel<T, kHeadSize, BITS, GROUP, HEAD_TILES, SPARSE, KC, SELECT, KP8>,
      cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (device < kMaxDevices) done[device] = true;
}

template <typename T, int BITS, int GROUP>
void launch_quantize(const QuantizeParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  if (items == 0) return;
  const dim3 grid(static_cast<unsigned>((items + kQuantizeWarps - 1) / kQuantizeWarps));
  quantize_kernel<T, kHeadSize, BITS, GROUP><<<grid, kQuantizeWarps * 32, 0, stream>>>(p);
}

template <typename T, int BITS, int GROUP, bool KC, bool KP8 = false>
void launch_dequantize_pages(const DequantizeParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.max_tokens) * p.num_kv_heads;
  if (items == 0 || p.num_seqs == 0) return;
  const dim3 grid(static_cast<unsigned>((items + kQuantizeWarps - 1) / kQuantizeWarps),
                  p.num_seqs);
  dequantize_kernel<T, kHeadSize, BITS, GROUP, KC, KP8>
      <<<grid, kQuantizeWarps * 32, 0, stream>>>(p);
}

template <typename T, int BITS, int GROUP>
void launch_dequantize(const DequantizeParams& p, cudaStream_t stream) {
  launch_dequantize_pages<T, BITS, GROUP, false>(p, stream);
}

template <typename T, int BITS, int GROUP>
void launch_dequantize_kc(const DequantizeParams& p, cudaStream_t stream) {
  bool_switch(p.k_params_fp8, [&](auto kp8) {
    launch_dequantize_pages<T, BITS, GROUP, true, decltype(kp8)::value>(p, stream);
  });
}

// kernel<<<grid, block, smem, stream>>>(params) as a programmatic dependent of the kernel
// before it in the stream: it may be scheduled once every CTA of that kernel has run
// griddepcontrol.launch_dependents (or exited), and must run griddepcontrol.wait before
// it reads what that kernel writes. After a kernel that never triggers, a plain launch.
template <typename Params>
void launch_dependent(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, const Params& params) {
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kernel, params);
}

// The decode is a programmatic dependent of the kernel before it, in a decode step the
// KV-cache write (quantize_kernel, or kc_value_residual_kernel, the last of channel K's
// two write kernels): its CTAs load the lengths and block-table entries while the write
// runs, and wait (griddepcontrol.wait) before they read Q, a page or a residual row.
template <typename T, int BITS, int GROUP, int HEAD_TILES, bool SPARSE, bool KC, int SELECT,
          bool KP8>
void launch_decode_tiles(const DecodeParams& p, cudaStream_t stream) {
  using Shape = DecodeShape<T, kHeadSize, BITS, GROUP, HEAD_TILES, KC, KP8>;
  auto* kernel = decode_kernel<T, kHeadSize, BITS, GROUP, HEAD_TILES, SPARSE, KC, SELECT, KP8>;
  allow_decode_smem<T, BITS, GROUP, HEAD_TILES, SPARSE, KC, SELECT, KP8>();
  const dim3 grid(p.num_splits, p.num_kv_heads, p.num_seqs);
  launch_dependent(kernel, grid, dim3(kDecodeWarps * 32), Shape::kSmemBytes, stream, p);
}

template <typename T, int BITS, int GROUP, int HEAD_TILES, bool KC, bool KP8 = false>
int decode_tiles_ctas_per_sm() {
  using Shape = DecodeShape<T, kHeadSize, BITS, GROUP, HEAD_TILES, KC, KP8>;
  int ctas = 0;
  allow_decode_smem<T, BITS, GROUP, HEAD_TILES, false, KC, 0, KP8>();
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &ctas, decode_kernel<T, kHeadSize, BITS, GROUP, HEAD_TILES, false, KC, 0, KP8>,
      kDecodeWarps * 32, Shape::kSmemBytes);
  return err == cudaSuccess ? ctas : -1;
}

template <typename T, int BITS, int GROUP>
int decode_ctas_per_sm(int gqa, bool channel_k, bool k_params_fp8) {
  auto for_pages = [&](auto kc, auto kp8) {
    constexpr bool kKC = decltype(kc)::value, kKP8 = decltype(kp8)::value;
    return gqa <= 8 ? decode_tiles_ctas_per_sm<T, BITS, GROUP, 1, kKC, kKP8>()
                    : decode_tiles_ctas_per_sm<T, BITS, GROUP, 2, kKC, kKP8>();
  };
  if (!channel_k) return for_pages(std::false_type{}, std::false_type{});
  return bool_switch(k_params_fp8, [&](auto kp8) { return for_pages(std::true_type{}, kp8); });
}

// The split combine as a programmatic dependent launch of the decode: the decode lets it
// be scheduled from its start (griddepcontrol.launch_dependents), so its launch overlaps
// the decode's tail instead of following it, and it waits (griddepcontrol.wait) until the
// decode grid has finished and its writes are visible. A decode with splits fits in one
// wave (plan_num_splits), so the waiting CTAs never keep a decode CTA off an SM.
// Its form (the splits a warp loads at once) is chosen here, so that the forms for few
// splits keep their fewer registers.
template <typename T>
void launch_combine(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_seqs * p.max_query_len, p.num_heads), block(kCombineWarps * 32);
  switch (combine_in_flight(p.num_splits)) {
    case 1: return launch_dependent(combine_kernel<T, kHeadSize, 1>, grid, block, 0, stream, p);
    case 2: return launch_dependent(combine_kernel<T, kHeadSize, 2>, grid, block, 0, stream, p);
    case 4: return launch_dependent(combine_kernel<T, kHeadSize, 4>, grid, block, 0, stream, p);
    default: return launch_dependent(combine_kernel<T, kHeadSize, 8>, grid, block, 0, stream, p);
  }
}

template <typename T, int BITS, int GROUP, bool SPARSE, bool KC = false, int SELECT = 0,
          bool KP8 = false>
void launch_decode_and_combine(const DecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return;
  // the query rows of a KV head: its heads, times the query tokens of a sequence
  if (p.num_heads * p.max_query_len <= 8 * p.num_kv_heads) {
    launch_decode_tiles<T, BITS, GROUP, 1, SPARSE, KC, SELECT, KP8>(p, stream);
  } else {
    launch_decode_tiles<T, BITS, GROUP, 2, SPARSE, KC, SELECT, KP8>(p, stream);
  }
  if (p.num_splits > 1) launch_combine<T>(p, stream);
}

template <typename T, int BITS, int GROUP>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  launch_decode_and_combine<T, BITS, GROUP, false>(p, stream);
}

template <typename T, int BITS, int GROUP>
void launch_decode_sparse(const DecodeParams& p, cudaStream_t stream) {
  launch_decode_and_combine<T, BITS, GROUP, true>(p, stream);
}

template <typename T, int BITS, int GROUP>
void launch_decode_kc(const DecodeParams& p, cudaStream_t stream) {
  bool_switch(p.k_params_fp8, [&](auto kp8) {
    launch_decode_and_combine<T, BITS, GROUP, false, true, 0, decltype(kp8)::value>(p, stream);
  });
}

// A launch of select_topk_kernel in clusters of `ranks` CTAs along x; `dependent`: as a
// programmatic dependent of the kernel before it (the selection layer's decode or its
// combine), whose launch then overlaps that kernel's tail as the combine's does; the
// top-k waits in griddepcontrol.wait before it reads a key. Not copyable: the config
// points at the attributes next to it.
struct TopkClusterLaunch {
  cudaLaunchAttribute attrs[2];
  cudaLaunchConfig_t config;
  TopkClusterLaunch(dim3 grid, int ranks, cudaStream_t stream, bool dependent = false)
      : attrs{}, config{} {
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = static_cast<unsigned>(ranks);
    attrs[0].val.clusterDim.y = 1;
    attrs[0].val.clusterDim.z = 1;
    attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[1].val.programmaticStreamSerializationAllowed = 1;
    config.gridDim = grid;
    config.blockDim = dim3(kSelectTopkThreads);
    config.stream = stream;
    config.attrs = attrs;
    config.numAttrs = dependent ? 2 : 1;
  }
  TopkClusterLaunch(const TopkClusterLaunch&) = delete;
  TopkClusterLaunch& operator=(const TopkClusterLaunch&) = delete;
};

// CTAs per (row, selection head) of the top-k: a power of two up to kSelectMaxRanks, as
// many as keep every cluster's CTAs on an SM of their own (one 1024-thread CTA per SM)
// with room to spare. With 8 KV heads on 132 SMs: 8 at batches 1-2, 4 at 3-4, 2 at 5-8, 1 from 9.
inline int select_topk_ranks(int rows_and_heads) {
  constexpr int kMaxDevices = 64;
  static int sms[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  int count = device < kMaxDevices ? sms[device] : 0;
  if (count == 0) {
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (device < kMaxDevices) sms[device] = count;
  }
  int ranks = 1;
  while (ranks < kSelectMaxRanks && 2 * ranks * rows_and_heads <= count) ranks *= 2;
  // a cluster must fit on one GPC at once; ask, once per device and size, and halve if not
  static signed char fits[kMaxDevices][kSelectMaxRanks + 1] = {};  // 0 unknown, 1 yes, -1 no
  while (ranks > 1) {
    signed char& known = fits[device < kMaxDevices ? device : 0][ranks];
    if (known == 0) {
      const TopkClusterLaunch launch(dim3(ranks), ranks, nullptr);
      int clusters = 0;
      const cudaError_t err = cudaOccupancyMaxActiveClusters(
          &clusters, select_topk_kernel<kSelectTopkThreads>, &launch.config);
      if (err != cudaSuccess) cudaGetLastError();  // not sticky: clear it and step down
      known = err == cudaSuccess && clusters > 0 ? 1 : -1;
    }
    if (known > 0) break;
    ranks /= 2;
  }
  return ranks;
}

template <typename T, int BITS, int GROUP>
void launch_decode_select(const DecodeParams& decode, const SelectParams& select,
                          cudaStream_t stream) {
  if (decode.num_seqs == 0) return;
  const int heads = select.shared ? 1 : decode.num_kv_heads;
  // Pages: one CTA per (row, head). A row has 16 times fewer keys (8K at 128K tokens),
  // and the cluster's fixed cost dominated: under Nsight Compute (H200, d0cede5) the
  // page top-k took 28-31 us in clusters of 8 at B = 1, at 32K and 128K alike, and 17.4
  // / 19.7 us in clusters of 2 at B = 8 with 1K / 4K keys per CTA. With one CTA the whole
  // selection layer at B = 1 fell by 10-11 us (H200, 7ae9977); beyond some 16K pages per
  // row a cluster would pay again.
  const int ranks = select.unit_shift == 0 ? select_topk_ranks(select.num_seqs * heads) : 1;
  // (before the decode's launch: the cluster query clears the error state it may leave,
  // which would hide a failed decode launch from the caller's launch check)
  if (select.unit_shift == 0) {  // + a key per token
    launch_decode_and_combine<T, BITS, GROUP, false, false, 1>(decode, stream);
  } else {  // + a key per 16-token tile
    launch_decode_and_combine<T, BITS, GROUP, false, false, kTileTokens>(decode, stream);
  }
  const TopkClusterLaunch launch(dim3(select.num_seqs * ranks, heads), ranks, stream,
                                 /*dependent=*/true);
  cudaLaunchKernelEx(&launch.config, select_topk_kernel<kSelectTopkThreads>, select);
}

template <typename T, int BITS, int GROUP>
void launch_kc_write(const KCWriteParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  if (items == 0 || p.num_reqs == 0) return;
  const dim3 warps(static_cast<unsigned>((items + kQuantizeWarps - 1) / kQuantizeWarps));
  const dim3 tokens_heads(p.num_tokens, p.num_kv_heads);
  bool_switch(p.k_params_fp8, [&](auto kp8) {  // phase A
    kc_page_kernel<T, kHeadSize, BITS, decltype(kp8)::value>
        <<<tokens_heads, kHeadSize, 0, stream>>>(p);
  });
  kc_value_residual_kernel<T, kHeadSize, BITS, GROUP>  // phase B
      <<<warps, kQuantizeWarps * 32, 0, stream>>>(p);
}

}  // namespace bitdecode
