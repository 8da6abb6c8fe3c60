// Torch-facing entry points: check every argument, fill a params struct, dispatch on
// (dtype, bits, group size) to the launchers. No kernel code here.
#include <ATen/MemoryOverlap.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/all.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "bitdecode/launch.h"
#include "bitdecode/ops.h"

namespace bitdecode {
namespace {

constexpr int64_t kHead = 128;
constexpr int64_t kMaxGqaRows = 16;
// sequences (decode rows) are a launch grid's y or z dimension
constexpr int64_t kMaxGridSeqs = 65535;

PageGeometry page_geometry(int64_t bits, int64_t group_size, int64_t block_size) {
  TORCH_CHECK(bits == 4 || bits == 2, "bitdecode: bits must be 4 or 2, got ", bits);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "bitdecode: group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(block_size >= 16 && block_size <= 1024 && (block_size & (block_size - 1)) == 0,
              "bitdecode: block_size must be a power of two in [16, 1024], got ", block_size);
  PageGeometry g;
  g.block_size = static_cast<int>(block_size);
  g.block_shift = 0;
  while ((int64_t{1} << g.block_shift) < block_size) ++g.block_shift;
  g.row_bytes = static_cast<int>(kHead * bits / 8);
  g.param_bytes = static_cast<int>(8 * (kHead / group_size));
  g.tile_bytes = kTileTokens * (2 * g.row_bytes + g.param_bytes);
  g.v_rows_offset = kTileTokens * g.row_bytes;
  g.params_offset = 2 * kTileTokens * g.row_bytes;
  return g;
}

int64_t head_region_bytes(const PageGeometry& g) {
  return static_cast<int64_t>(g.block_size / kTileTokens) * g.tile_bytes;
}

// The channel-mode tile (reference_kc.KCPageLayout): K rows, V rows, V (scale, zero) per
// token and group, then the (scale, zc) of every channel of the tile's K group, fp16 or
// e4m3: k_param_bits 16 or 8. Elsewhere in this file k_param_bits 0 means a per-token page.
static_assert(kKCGroupTokens == kTileTokens, "a tile is one K group");
struct KCOffsets {
  int64_t v_param_bytes;    // per token
  int64_t k_params_offset;  // in a tile
  int64_t tile_bytes;
  int64_t region;           // bytes of one head region
};

KCOffsets kc_offsets(const PageGeometry& g, int k_param_bits) {
  KCOffsets o;
  o.v_param_bytes = g.param_bytes / 2;
  o.k_params_offset = g.params_offset + kTileTokens * o.v_param_bytes;
  o.tile_bytes = o.k_params_offset + 2 * kHead * k_param_bits / 8;
  o.region = g.block_size / kTileTokens * o.tile_bytes;
  return o;
}

// The geometry of a channel-mode page: per-token offsets, the channel mode's tile size.
PageGeometry kc_geometry(PageGeometry g, int k_param_bits) {
  g.tile_bytes = static_cast<int>(kc_offsets(g, k_param_bits).tile_bytes);
  return g;
}

int check_k_param_bits(int64_t k_param_bits) {
  TORCH_CHECK(k_param_bits == 16 || k_param_bits == 8, "bitdecode: k_param_bits must be 16 "
              "(fp16 K params) or 8 (e4m3), got ", k_param_bits);
  return static_cast<int>(k_param_bits);
}

void check_kc_block_size(int64_t block_size) {
  TORCH_CHECK(block_size <= kKCMaxBlockSize, "bitdecode: per-channel K mode supports block "
              "sizes up to ", kKCMaxBlockSize, ", got ", block_size);
}

// The kernels read and write with vector loads of up to 16 bytes (bulk copies of pages).
void check_aligned_16(const at::Tensor& x, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "bitdecode: ", name,
              " must start 16-byte aligned (a view at an odd offset is not)");
}

// A tensor the kernels write must not name one element twice (e.g. an expand()ed view):
// its rows would overwrite each other. has_internal_overlap answers TooHard for any view
// that is not dense (an as_strided one whose heads overlap passed), so the strides are
// tested: in ascending order each must step past all that the smaller ones reach.
// Sufficient, not necessary: an interleaved layout that does not overlap is refused too.
void check_no_overlap(const at::Tensor& x, const char* name) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  std::sort(dims.begin(), dims.end());
  bool apart = true;
  int64_t reach = 0;  // the largest offset the dims so far address
  for (const auto& [stride, size] : dims) {
    apart = apart && stride > reach;
    reach += stride * (size - 1);
  }
  TORCH_CHECK(x.numel() == 0 || apart, "bitdecode: ", name, " has elements that share "
              "memory (an expand()ed view, or strides under which rows or heads overlap); "
              "it is written, so each element needs its own memory");
}

using NamedTensor = std::pair<const at::Tensor*, const char*>;  // nullptr: absent

// A written argument must share no memory with another argument of the call: a read one
// would change under the kernel, a written one be written twice. Each of `written` is
// checked against the others and against every one of `read`. get_overlap_status
// answers TooHard where either is not dense (e.g. a slice of a fused qkv tensor): those
// pass.
void check_apart(const NamedTensor* written, size_t num_written, const NamedTensor* read,
                 size_t num_read) {
  auto check = [](const NamedTensor& x, const NamedTensor& y) {
    if (x.first == nullptr || y.first == nullptr) return;
    const at::MemOverlapStatus s = at::get_overlap_status(*x.first, *y.first);
    TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial,
                "bitdecode: ", x.second, " shares memory with ", y.second, "; it is written, "
                "so it needs memory of its own");
  };
  for (size_t w = 0; w < num_written; ++w) {
    for (size_t o = w + 1; o < num_written; ++o) check(written[w], written[o]);
    for (size_t r = 0; r < num_read; ++r) check(written[w], read[r]);
  }
}

void check_apart(std::initializer_list<NamedTensor> written,
                 std::initializer_list<NamedTensor> read) {
  check_apart(written.begin(), written.size(), read.begin(), read.size());
}

const at::Tensor* present(const std::optional<at::Tensor>& x) {
  return x.has_value() ? &*x : nullptr;
}

// The residual of the channel mode: block_size exact K rows, then as many V rows, per slot
// and KV head.
void check_residual(const at::Tensor& residual, int64_t num_kv_heads, int64_t block_size,
                    at::ScalarType dtype) {
  check_kc_block_size(block_size);
  TORCH_CHECK(residual.is_cuda() && residual.scalar_type() == dtype && residual.dim() == 5 &&
                  residual.size(1) == 2 && residual.size(2) == num_kv_heads &&
                  residual.size(3) == block_size && residual.size(4) == kHead &&
                  residual.is_contiguous(),
              "bitdecode: residual must be a contiguous CUDA tensor [num_slots, 2, ",
              num_kv_heads, ", ", block_size, ", 128] of the ",
              dtype == at::kHalf ? "float16" : "bfloat16", " model dtype");
  check_aligned_16(residual, "residual");
}

void check_cache(const at::Tensor& cache, const PageGeometry& g, int64_t num_kv_heads,
                 int k_param_bits = 0) {
  const bool channel_k = k_param_bits != 0;
  const int64_t region = channel_k ? kc_offsets(g, k_param_bits).region : head_region_bytes(g);
  TORCH_CHECK(cache.is_cuda() && cache.scalar_type() == at::kByte && cache.dim() == 3,
              "bitdecode: cache must be a CUDA uint8 tensor [num_blocks, num_kv_heads, "
              "head_region_bytes]");
  // (callers then divide the query heads by it)
  TORCH_CHECK(num_kv_heads >= 1, "bitdecode: there must be at least one KV head, got ",
              num_kv_heads);
  TORCH_CHECK(cache.size(1) == num_kv_heads, "bitdecode: cache has ", cache.size(1),
              " KV heads, inputs have ", num_kv_heads);
  TORCH_CHECK(cache.size(2) == region, "bitdecode: cache head region is ", cache.size(2),
              " bytes, the ", channel_k ? "channel-mode " : "", "page format needs ", region);
  TORCH_CHECK(cache.stride(2) == 1 && cache.stride(1) == cache.size(2),
              "bitdecode: cache head regions must be contiguous");
  TORCH_CHECK(cache.stride(0) % 16 == 0, "bitdecode: cache pages must be 16-byte aligned");
  TORCH_CHECK(cache.size(0) <= 1 || cache.stride(0) >= cache.size(1) * cache.size(2),
              "bitdecode: cache pages overlap (stride ", cache.stride(0), " bytes for pages of ",
              cache.size(1) * cache.size(2), ")");
  check_aligned_16(cache, "cache");
  TORCH_CHECK(num_kv_heads <= 65535, "bitdecode: at most 65535 KV heads (a launch grid "
              "dimension), got ", num_kv_heads);
  // the decode kernel names a tile of the cache page << log2(tiles per page) | tile
  TORCH_CHECK(cache.size(0) * (g.block_size / kTileTokens) <= INT32_MAX, "bitdecode: ",
              cache.size(0), " pages of ", g.block_size / kTileTokens,
              " tiles are too many to name a tile in 32 bits");
}

void check_tokens(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.size(2) == kHead, "bitdecode: ", name,
              " must be a CUDA tensor [tokens, heads, 128]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "bitdecode: ",
              name, " must be bfloat16 or float16");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) % 8 == 0 && x.stride(0) % 8 == 0, "bitdecode: ",
              name, " rows must be contiguous, with token and head strides that are "
              "multiples of 8 elements (16 bytes)");
  check_aligned_16(x, name);
}

// The write and read-back kernels take one (token, KV head) per warp, 4 warps a CTA, in
// a grid's x dimension (at most 2^31 - 1), and count tokens in int32.
void check_write_grid(int64_t tokens, int64_t num_kv_heads) {
  TORCH_CHECK(tokens <= INT32_MAX && (tokens * num_kv_heads + 3) / 4 <= INT32_MAX,
              "bitdecode: ", tokens, " tokens of ", num_kv_heads, " KV heads are too many "
              "for one call (one warp per token and head, in a grid of at most 2^31 - 1 "
              "CTAs of 4 warps)");
}

const float* signs_ptr(const std::optional<at::Tensor>& signs) {
  if (!signs.has_value()) return nullptr;
  TORCH_CHECK(signs->is_cuda() && signs->scalar_type() == at::kFloat && signs->numel() == kHead &&
                  signs->is_contiguous(),
              "bitdecode: rotation_signs must be a contiguous CUDA float32 tensor of 128");
  return signs->data_ptr<float>();
}

// Pointers and strides of one step's tokens and the cache, into QuantizeParams or
// KCWriteParams.
template <typename Params>
void set_write_inputs(Params& p, const at::Tensor& key, const at::Tensor& value,
                      const at::Tensor& slot_mapping, at::Tensor& cache) {
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_stride_token = key.stride(0), p.key_stride_head = key.stride(1);
  p.value_stride_token = value.stride(0), p.value_stride_head = value.stride(1);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.cache = cache.data_ptr<uint8_t>();
  p.cache_stride_block = cache.stride(0), p.cache_stride_head = cache.stride(1);
}

// FlashAttention-style static switches: the body sees T, kBits and kGroup as types /
// compile-time constants.
#define BITDECODE_GROUP_SWITCH(GROUP, ...)          \
  if ((GROUP) == 32) {                              \
    constexpr int kGroup = 32;                      \
    __VA_ARGS__                                     \
  } else if ((GROUP) == 64) {                       \
    constexpr int kGroup = 64;                      \
    __VA_ARGS__                                     \
  } else {                                          \
    constexpr int kGroup = 128;                     \
    __VA_ARGS__                                     \
  }
#define BITDECODE_BITS_SWITCH(BITS, GROUP, ...)     \
  if ((BITS) == 4) {                                \
    constexpr int kBits = 4;                        \
    BITDECODE_GROUP_SWITCH(GROUP, __VA_ARGS__)      \
  } else {                                          \
    constexpr int kBits = 2;                        \
    BITDECODE_GROUP_SWITCH(GROUP, __VA_ARGS__)      \
  }
#define BITDECODE_DISPATCH(DTYPE, BITS, GROUP, ...) \
  if ((DTYPE) == at::kBFloat16) {                   \
    using T = __nv_bfloat16;                        \
    BITDECODE_BITS_SWITCH(BITS, GROUP, __VA_ARGS__) \
  } else {                                          \
    using T = __half;                               \
    BITDECODE_BITS_SWITCH(BITS, GROUP, __VA_ARGS__) \
  }

void check_same_device(const at::Tensor& x, const char* name, const at::Tensor& q,
                       const char* q_name = "q") {
  TORCH_CHECK(x.device() == q.device(), "bitdecode: ", name, " is on ", x.device(), " but ",
              q_name, " is on ", q.device());
}

// Each {tensor, name} of `named` on the device of `ref`.
void check_same_device(const at::Tensor& ref, const char* ref_name,
                       std::initializer_list<std::pair<const at::Tensor&, const char*>> named) {
  for (const auto& [x, name] : named) check_same_device(x, name, ref, ref_name);
}

// The block table of every op that reads pages: a row per sequence, columns contiguous.
void check_block_table(const at::Tensor& block_table, int64_t num_seqs) {
  TORCH_CHECK(block_table.is_cuda() && block_table.scalar_type() == at::kInt &&
                  block_table.dim() == 2 && block_table.stride(1) == 1,
              "bitdecode: block_table must be a CUDA int32 [num_seqs, max_blocks] tensor, "
              "contiguous in its last dimension");
  TORCH_CHECK(block_table.size(0) >= num_seqs, "bitdecode: block_table needs a row per "
              "sequence, has ", block_table.size(0), " for ", num_seqs);
}

// Checks what every decode-time op reads: the query tokens (one per sequence unless
// num_seqs >= 0 says how many sequences they belong to, at most max_query_len each), the
// sequences' pages, block table and lengths. Returns the number of sequences.
int64_t check_decode_inputs(const at::Tensor& q, const at::Tensor& cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens,
                            const PageGeometry& g, int k_param_bits = 0,
                            int64_t num_seqs = -1, int64_t max_query_len = 1) {
  check_tokens(q, "q");
  if (num_seqs < 0) num_seqs = q.size(0);  // one query token per sequence
  TORCH_CHECK(num_seqs <= kMaxGridSeqs, "bitdecode: at most ", kMaxGridSeqs,
              " sequences per decode call (the launch grid's z dimension), got ", num_seqs);
  TORCH_CHECK(cache.dim() == 3, "bitdecode: cache must be a CUDA uint8 tensor [num_blocks, "
              "num_kv_heads, head_region_bytes], got ", cache.dim(), " dimensions");
  const int64_t num_heads = q.size(1), num_kv_heads = cache.size(1);
  check_cache(cache, g, num_kv_heads, k_param_bits);
  TORCH_CHECK(num_heads >= 1, "bitdecode: q must have at least one head");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= kMaxGqaRows,
              "bitdecode: query heads per KV head must divide evenly and be at most ",
              kMaxGqaRows, ", got ", num_heads, "/", num_kv_heads);
  // a sequence's query tokens sit beside its query heads in the kernel's rows (bounded
  // alone first, so that the product cannot overflow)
  TORCH_CHECK(max_query_len >= 1 && max_query_len <= kMaxGqaRows &&
                  num_heads / num_kv_heads * max_query_len <= kMaxGqaRows,
              "bitdecode: query heads per KV head times max_query_len must be at most ",
              kMaxGqaRows, " (the kernel's query rows), got ", num_heads, "/", num_kv_heads,
              " heads and max_query_len ", max_query_len);
  check_block_table(block_table, num_seqs);
  // the kernels index seq_lens[seq] with no stride
  TORCH_CHECK(seq_lens.is_cuda() && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.dim() == 1 && seq_lens.stride(0) == 1 && seq_lens.size(0) >= num_seqs,
              "bitdecode: seq_lens must be a contiguous CUDA int32 vector with one entry per "
              "sequence");
  check_same_device(cache, "cache", q);
  check_same_device(block_table, "block_table", q);
  check_same_device(seq_lens, "seq_lens", q);
  return num_seqs;
}

// The pointers and strides of what check_decode_inputs checked, into DecodeParams.
void set_decode_inputs(DecodeParams& p, const at::Tensor& q, const at::Tensor& cache,
                       const at::Tensor& block_table, const at::Tensor& seq_lens) {
  p.q = q.data_ptr();
  p.q_stride_token = q.stride(0), p.q_stride_head = q.stride(1);
  p.cache = cache.data_ptr<uint8_t>();
  p.cache_stride_block = cache.stride(0), p.cache_stride_head = cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
}

// Several query tokens per sequence: checks query_start_loc ([num_seqs + 1], each
// sequence's first token in q) and returns num_seqs; -1 without it (one token each).
int64_t check_query_start(const std::optional<at::Tensor>& query_start_loc,
                          int64_t max_query_len, const at::Tensor& q) {
  if (!query_start_loc.has_value()) {
    TORCH_CHECK(max_query_len == 1, "bitdecode: max_query_len ", max_query_len,
                " needs query_start_loc (without it each sequence has one query token)");
    return -1;
  }
  const at::Tensor& qsl = *query_start_loc;
  TORCH_CHECK(qsl.is_cuda() && qsl.scalar_type() == at::kInt && qsl.dim() == 1 &&
                  qsl.stride(0) == 1 && qsl.size(0) >= 1,
              "bitdecode: query_start_loc must be a contiguous CUDA int32 vector "
              "[num_seqs + 1]");
  check_same_device(qsl, "query_start_loc", q);
  return qsl.size(0) - 1;
}

// Checks the arguments that the decode ops share and fills their params (the sparse
// fields zero). query_start_loc / max_query_len: several query tokens per sequence
// (decode only). also_read: the op's own inputs, which out and the partials must not
// share memory with either.
DecodeParams decode_params(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                           const at::Tensor& block_table, const at::Tensor& seq_lens,
                           at::Tensor& partial_out, at::Tensor& partial_lse,
                           const std::optional<at::Tensor>& rotation_signs,
                           double softmax_scale, const PageGeometry& g, int64_t num_splits,
                           int64_t min_tiles_per_split, int k_param_bits = 0,
                           const std::optional<at::Tensor>& query_start_loc = std::nullopt,
                           int64_t max_query_len = 1,
                           std::initializer_list<NamedTensor> also_read = {}) {
  int64_t num_seqs = check_query_start(query_start_loc, max_query_len, q);
  num_seqs = check_decode_inputs(q, cache, block_table, seq_lens, g, k_param_bits, num_seqs,
                                 max_query_len);
  check_tokens(out, "out");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(),
              "bitdecode: out must match q in shape and dtype");
  check_no_overlap(out, "out");
  // out may be q itself: a CTA reads all its query rows before it writes an output row,
  // and writes only those rows; split outputs come from the combine, which waits for the
  // whole decode grid. Shifted, out would overwrite rows that another CTA still reads.
  TORCH_CHECK(at::get_overlap_status(out, q) != at::MemOverlapStatus::Partial,
              "bitdecode: out partially overlaps q; it must be q itself or memory of its own");
  const int64_t num_heads = q.size(1), num_kv_heads = cache.size(1);
  TORCH_CHECK(num_heads <= 65535, "bitdecode: at most 65535 query heads (the combine's "
              "launch grid), got ", num_heads);
  // split * tiles per split stays within int32 in the kernel
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65535 && min_tiles_per_split >= 1 &&
                  min_tiles_per_split <= 32767,
              "bitdecode: num_splits must be in [1, 65535] and min_tiles_per_split in "
              "[1, 32767], got ", num_splits, " and ", min_tiles_per_split);
  // split partials: one per (split, sequence, query token slot, head)
  const int64_t rows = num_splits * num_seqs * max_query_len * num_heads;
  if (num_splits > 1) {
    TORCH_CHECK(partial_out.is_cuda() && partial_out.scalar_type() == at::kFloat &&
                    partial_out.is_contiguous() && partial_out.numel() >= rows * kHead,
                "bitdecode: partial_out must be contiguous CUDA float32 with room for "
                "[num_splits, num_seqs, max_query_len, num_heads, 128]");
    TORCH_CHECK(partial_lse.is_cuda() && partial_lse.scalar_type() == at::kFloat &&
                    partial_lse.is_contiguous() && partial_lse.numel() >= rows,
                "bitdecode: partial_lse must be contiguous CUDA float32 with room for "
                "[num_splits, num_seqs, max_query_len, num_heads]");
    check_aligned_16(partial_out, "partial_out");  // the combine reads it in float4s
    check_same_device(partial_out, "partial_out", q);
    check_same_device(partial_lse, "partial_lse", q);
  }
  check_same_device(out, "out", q);
  if (rotation_signs.has_value()) check_same_device(*rotation_signs, "rotation_signs", q);
  // out, the partials and what the decode reads (out against q: above, it may be q)
  const NamedTensor written[3] = {{&out, "out"},
                                  {num_splits > 1 ? &partial_out : nullptr, "partial_out"},
                                  {num_splits > 1 ? &partial_lse : nullptr, "partial_lse"}};
  NamedTensor read[8] = {{&cache, "cache"}, {&block_table, "block_table"},
                         {&seq_lens, "seq_lens"}, {present(query_start_loc), "query_start_loc"},
                         {present(rotation_signs), "rotation_signs"}};
  size_t num_read = 5;
  TORCH_INTERNAL_ASSERT(also_read.size() <= 3);
  for (const NamedTensor& x : also_read) read[num_read++] = x;
  check_apart(written, 3, read, num_read);
  for (const NamedTensor& partial : {written[1], written[2]}) check_apart({partial}, {{&q, "q"}});

  DecodeParams p{};
  set_decode_inputs(p, q, cache, block_table, seq_lens);
  p.out = out.data_ptr();
  p.out_stride_token = out.stride(0), p.out_stride_head = out.stride(1);
  p.partial_out = num_splits > 1 ? partial_out.data_ptr<float>() : nullptr;
  p.partial_lse = num_splits > 1 ? partial_lse.data_ptr<float>() : nullptr;
  p.rotation_signs = signs_ptr(rotation_signs);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.num_seqs = static_cast<int>(num_seqs);
  p.query_start = query_start_loc.has_value() ? query_start_loc->data_ptr<int32_t>() : nullptr;
  p.max_query_len = static_cast<int>(max_query_len);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.num_splits = static_cast<int>(num_splits);
  p.min_tiles_per_split = static_cast<int>(min_tiles_per_split);
  p.page = k_param_bits != 0 ? kc_geometry(g, k_param_bits) : g;
  p.k_params_fp8 = k_param_bits == 8;
  return p;
}

}  // namespace

void quantize_to_pages(const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& slot_mapping, at::Tensor& cache,
                       const std::optional<at::Tensor>& rotation_signs, int64_t bits,
                       int64_t group_size, int64_t block_size) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  check_tokens(key, "key");
  check_tokens(value, "value");
  TORCH_CHECK(key.sizes() == value.sizes() && key.scalar_type() == value.scalar_type(),
              "bitdecode: key and value must have the same shape and dtype");
  // the kernel reads slot_mapping[token] with no stride
  TORCH_CHECK(slot_mapping.is_cuda() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.dim() == 1 && slot_mapping.stride(0) == 1 &&
                  slot_mapping.size(0) <= key.size(0),
              "bitdecode: slot_mapping must be a contiguous CUDA int64 vector, one entry per "
              "actual token (key and value may carry padding rows after them)");
  check_cache(cache, g, key.size(1));
  check_apart({{&cache, "cache"}}, {{&key, "key"}, {&value, "value"},
                                    {&slot_mapping, "slot_mapping"},
                                    {present(rotation_signs), "rotation_signs"}});
  check_same_device(key, "key", {{value, "value"}, {slot_mapping, "slot_mapping"},
                                 {cache, "cache"}});
  if (rotation_signs.has_value()) check_same_device(*rotation_signs, "rotation_signs", key, "key");
  check_write_grid(slot_mapping.size(0), key.size(1));
  const c10::cuda::CUDAGuard guard(key.device());

  QuantizeParams p;
  set_write_inputs(p, key, value, slot_mapping, cache);
  p.rotation_signs = signs_ptr(rotation_signs);
  p.num_tokens = static_cast<int>(slot_mapping.size(0));  // key may be padded
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.page = g;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(key.scalar_type(), bits, group_size,
                     launch_quantize<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// Checks the arguments that dequantize_pages and dequantize_pages_kc share and fills
// their params.
DequantizeParams dequantize_params(const at::Tensor& cache, const at::Tensor& block_table,
                                   const at::Tensor& seq_lens, const at::Tensor& out_start,
                                   at::Tensor& key_out, at::Tensor& value_out,
                                   const PageGeometry& g, int64_t max_tokens,
                                   int k_param_bits) {
  const int64_t block_size = g.block_size;
  check_tokens(key_out, "key_out");
  check_tokens(value_out, "value_out");
  TORCH_CHECK(key_out.is_contiguous() && value_out.is_contiguous() &&
                  key_out.sizes() == value_out.sizes() &&
                  key_out.scalar_type() == value_out.scalar_type(),
              "bitdecode: key_out and value_out must be contiguous and of one shape and dtype");
  check_cache(cache, g, key_out.size(1), k_param_bits);
  // the kernel reads seq_lens[seq] and out_start[seq] with no stride
  TORCH_CHECK(seq_lens.is_cuda() && seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.stride(0) == 1,
              "bitdecode: seq_lens must be a contiguous CUDA int32 vector [num_seqs]");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(num_seqs <= kMaxGridSeqs, "bitdecode: at most ", kMaxGridSeqs,
              " sequences per call (the launch grid's y dimension), got ", num_seqs);
  check_block_table(block_table, num_seqs);
  TORCH_CHECK(out_start.is_cuda() && out_start.scalar_type() == at::kInt &&
                  out_start.dim() == 1 && out_start.stride(0) == 1 &&
                  out_start.size(0) >= num_seqs + 1,
              "bitdecode: out_start must be a contiguous CUDA int32 vector [num_seqs + 1]");
  TORCH_CHECK(max_tokens >= 0 && max_tokens <= block_table.size(1) * block_size &&
                  max_tokens <= INT32_MAX,
              "bitdecode: max_tokens must be in [0, what the block table can address: ",
              std::min<int64_t>(block_table.size(1) * block_size, INT32_MAX), "], got ",
              max_tokens);
  check_same_device(cache, "cache", {{block_table, "block_table"}, {seq_lens, "seq_lens"},
                                     {out_start, "out_start"}, {key_out, "key_out"},
                                     {value_out, "value_out"}});
  check_apart({{&key_out, "key_out"}, {&value_out, "value_out"}},
              {{&cache, "cache"}, {&block_table, "block_table"}, {&seq_lens, "seq_lens"},
               {&out_start, "out_start"}});
  check_write_grid(max_tokens, key_out.size(1));
  DequantizeParams p{};
  p.cache = cache.data_ptr<uint8_t>();
  p.cache_stride_block = cache.stride(0), p.cache_stride_head = cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out_start = out_start.data_ptr<int32_t>();
  p.key_out = key_out.data_ptr();
  p.value_out = value_out.data_ptr();
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_kv_heads = static_cast<int>(key_out.size(1));
  p.max_tokens = static_cast<int>(max_tokens);
  p.page = k_param_bits != 0 ? kc_geometry(g, k_param_bits) : g;
  p.k_params_offset =
      k_param_bits != 0 ? static_cast<int>(kc_offsets(g, k_param_bits).k_params_offset) : 0;
  p.k_params_fp8 = k_param_bits == 8;
  return p;
}

}  // namespace

void dequantize_pages(const at::Tensor& cache, const at::Tensor& block_table,
                      const at::Tensor& seq_lens, const at::Tensor& out_start,
                      at::Tensor& key_out, at::Tensor& value_out, int64_t bits,
                      int64_t group_size, int64_t block_size, int64_t max_tokens) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  const DequantizeParams p = dequantize_params(cache, block_table, seq_lens, out_start, key_out,
                                               value_out, g, max_tokens, 0);
  const c10::cuda::CUDAGuard guard(cache.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(key_out.scalar_type(), bits, group_size,
                     launch_dequantize<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_pages_kc(const at::Tensor& cache, const at::Tensor& block_table,
                         const at::Tensor& seq_lens, const at::Tensor& out_start,
                         at::Tensor& key_out, at::Tensor& value_out, int64_t bits,
                         int64_t group_size, int64_t block_size, int64_t max_tokens,
                         int64_t k_param_bits) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  check_kc_block_size(block_size);
  const DequantizeParams p = dequantize_params(cache, block_table, seq_lens, out_start, key_out,
                                               value_out, g, max_tokens,
                                               check_k_param_bits(k_param_bits));
  const c10::cuda::CUDAGuard guard(cache.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(key_out.scalar_type(), bits, group_size,
                     launch_dequantize_kc<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
            const at::Tensor& block_table, const at::Tensor& seq_lens, at::Tensor& partial_out,
            at::Tensor& partial_lse, const std::optional<at::Tensor>& rotation_signs,
            double softmax_scale, int64_t bits, int64_t group_size, int64_t block_size,
            int64_t num_splits, int64_t min_tiles_per_split,
            const std::optional<at::Tensor>& query_start_loc, int64_t max_query_len) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  const DecodeParams p =
      decode_params(out, q, cache, block_table, seq_lens, partial_out, partial_lse,
                    rotation_signs, softmax_scale, g, num_splits, min_tiles_per_split, 0,
                    query_start_loc, max_query_len);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(q.scalar_type(), bits, group_size,
                     launch_decode<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// Checks the selection buffers that decode_sparse reads and decode_select writes and the
// selection unit (1: tokens, 16: 16-token pages), and points p at them (p's sequences and
// KV heads already set by decode_params). Returns the lists' KV heads: 1 if shared.
int64_t set_selection(DecodeParams& p, const at::Tensor& sel_positions,
                      const at::Tensor& sel_count, bool shared_selection,
                      int64_t selection_unit, const at::Tensor& q) {
  const int64_t num_seqs = p.num_seqs, sel_heads = shared_selection ? 1 : p.num_kv_heads;
  TORCH_CHECK(selection_unit == 1 || selection_unit == 16,
              "bitdecode: selection_unit must be 1 (tokens) or 16 (16-token pages), got ",
              selection_unit);
  TORCH_CHECK(sel_positions.is_cuda() && sel_positions.scalar_type() == at::kInt &&
                  sel_positions.dim() == 3 && sel_positions.stride(2) == 1,
              "bitdecode: sel_positions must be a CUDA int32 tensor [num_seqs, num_kv_heads "
              "(1 if shared_selection), budget], contiguous in its last dimension, got ",
              sel_positions.scalar_type(), " ", sel_positions.sizes());
  TORCH_CHECK(sel_positions.size(0) >= num_seqs, "bitdecode: sel_positions has ",
              sel_positions.size(0), " rows for ", num_seqs, " sequences");
  TORCH_CHECK(sel_positions.size(1) == sel_heads, "bitdecode: sel_positions has ",
              sel_positions.size(1), " heads, expected ", sel_heads,
              shared_selection ? " (shared_selection: one set for all KV heads)"
                               : " (one set per KV head)");
  // the kernels count a row's selected tokens in int32, rounded up to whole 16-token tiles
  const int64_t max_budget = (INT32_MAX - 15) / selection_unit;
  TORCH_CHECK(sel_positions.size(2) >= 1 && sel_positions.size(2) <= max_budget,
              "bitdecode: sel_positions must hold a budget of 1 to ", max_budget, " ",
              selection_unit == 1 ? "positions" : "pages", ", got ", sel_positions.size(2));
  TORCH_CHECK(sel_count.is_cuda() && sel_count.scalar_type() == at::kInt &&
                  sel_count.dim() == 1 && sel_count.size(0) >= num_seqs &&
                  sel_count.stride(0) == 1,
              "bitdecode: sel_count must be a contiguous CUDA int32 vector with one entry per "
              "sequence (a count <= budget, -1 for a dense row, 0 for a padding row)");
  check_same_device(sel_positions, "sel_positions", q);
  check_same_device(sel_count, "sel_count", q);
  p.sel_positions = sel_positions.data_ptr<int32_t>();
  p.sel_stride_seq = sel_positions.stride(0), p.sel_stride_head = sel_positions.stride(1);
  p.sel_count = sel_count.data_ptr<int32_t>();
  p.sel_budget = static_cast<int>(sel_positions.size(2));
  p.sel_shared = shared_selection;
  p.sel_unit_shift = selection_unit == 16 ? 4 : 0;
  return sel_heads;
}

// Checks the optional cache-tile lists (DecodeParams::sel_cache_tiles): page lists only,
// shaped and strided as sel_positions. Returns their data, nullptr when absent.
int32_t* check_cache_tiles(const std::optional<at::Tensor>& sel_cache_tiles,
                           const at::Tensor& sel_positions, int64_t selection_unit,
                           const at::Tensor& q) {
  if (!sel_cache_tiles.has_value()) return nullptr;
  const at::Tensor& t = *sel_cache_tiles;
  TORCH_CHECK(selection_unit == 16,
              "bitdecode: sel_cache_tiles are the places of 16-token pages in the cache; "
              "pass them with selection_unit 16 only, got selection_unit ", selection_unit);
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kInt && t.sizes() == sel_positions.sizes() &&
                  t.strides() == sel_positions.strides(),
              "bitdecode: sel_cache_tiles must be a CUDA int32 tensor of sel_positions' shape ",
              sel_positions.sizes(), " and strides ", sel_positions.strides(), ", got ",
              t.scalar_type(), " ", t.sizes(), " strides ", t.strides());
  check_same_device(t, "sel_cache_tiles", q);
  return t.data_ptr<int32_t>();
}

}  // namespace

void decode_sparse(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                   const at::Tensor& sel_positions, const at::Tensor& sel_count,
                   at::Tensor& partial_out, at::Tensor& partial_lse,
                   const std::optional<at::Tensor>& rotation_signs, double softmax_scale,
                   int64_t bits, int64_t group_size, int64_t block_size, int64_t num_splits,
                   int64_t min_tiles_per_split, bool shared_selection,
                   int64_t selection_unit,
                   const std::optional<at::Tensor>& sel_cache_tiles) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  DecodeParams p =
      decode_params(out, q, cache, block_table, seq_lens, partial_out, partial_lse,
                    rotation_signs, softmax_scale, g, num_splits, min_tiles_per_split, 0,
                    std::nullopt, 1,
                    {{&sel_positions, "sel_positions"}, {&sel_count, "sel_count"},
                     {present(sel_cache_tiles), "sel_cache_tiles"}});
  // Counts live on the device, so they are not checked here (that would synchronize and
  // could not be captured in a CUDA graph): the kernel reads a count above the budget as
  // the budget and a negative count other than -1 as 0.
  set_selection(p, sel_positions, sel_count, shared_selection, selection_unit, q);
  // Entries are not checked against the cache here either (on the device): decode_select
  // writes them from the same block table, and the caller passes that table.
  p.sel_cache_tiles = check_cache_tiles(sel_cache_tiles, sel_positions, selection_unit, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(q.scalar_type(), bits, group_size,
                     launch_decode_sparse<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decode_kc(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
               const at::Tensor& residual, const at::Tensor& block_table,
               const at::Tensor& seq_lens, const at::Tensor& row_slot, at::Tensor& partial_out,
               at::Tensor& partial_lse, double softmax_scale, int64_t bits, int64_t group_size,
               int64_t block_size, int64_t num_splits, int64_t min_tiles_per_split,
               int64_t k_param_bits) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  check_kc_block_size(block_size);
  DecodeParams p = decode_params(out, q, cache, block_table, seq_lens, partial_out,
                                 partial_lse, std::nullopt, softmax_scale, g, num_splits,
                                 min_tiles_per_split, check_k_param_bits(k_param_bits),
                                 std::nullopt, 1,
                                 {{&residual, "residual"}, {&row_slot, "row_slot"}});
  const int64_t num_seqs = q.size(0);
  check_residual(residual, cache.size(1), block_size, q.scalar_type());
  TORCH_CHECK(row_slot.is_cuda() && row_slot.scalar_type() == at::kInt && row_slot.dim() == 1 &&
                  row_slot.is_contiguous() && row_slot.size(0) >= num_seqs,
              "bitdecode: row_slot must be a contiguous CUDA int32 vector with one residual "
              "slot per sequence");
  check_same_device(residual, "residual", q);
  check_same_device(row_slot, "row_slot", q);
  // Slots live on the device and are not checked here (that would synchronize): each must
  // be below residual.size(0), as the worker's slot table guarantees.
  p.residual = residual.data_ptr();
  p.row_slot = row_slot.data_ptr<int32_t>();
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(q.scalar_type(), bits, group_size,
                     launch_decode_kc<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decode_select(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                   at::Tensor& partial_out, at::Tensor& partial_lse,
                   const std::optional<at::Tensor>& rotation_signs, double softmax_scale,
                   int64_t bits, int64_t group_size, int64_t block_size, int64_t num_splits,
                   int64_t min_tiles_per_split, at::Tensor& sel_positions,
                   at::Tensor& sel_count, at::Tensor& keys, const at::Tensor& key_offsets,
                   int64_t min_seq_len, bool shared_selection, int64_t selection_unit,
                   const std::optional<at::Tensor>& sel_cache_tiles) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  DecodeParams p =
      decode_params(out, q, cache, block_table, seq_lens, partial_out, partial_lse,
                    rotation_signs, softmax_scale, g, num_splits, min_tiles_per_split);
  const int64_t num_seqs = q.size(0);
  const int64_t sel_heads =
      set_selection(p, sel_positions, sel_count, shared_selection, selection_unit, q);
  check_no_overlap(sel_positions, "sel_positions");  // the top-k writes each row's list
  int32_t* cache_tiles = check_cache_tiles(sel_cache_tiles, sel_positions, selection_unit, q);
  if (cache_tiles != nullptr) check_no_overlap(*sel_cache_tiles, "sel_cache_tiles");
  TORCH_CHECK(keys.is_cuda() && keys.scalar_type() == at::kInt && keys.is_contiguous() &&
                  keys.numel() % sel_heads == 0,
              "bitdecode: keys must be a contiguous CUDA int32 workspace of ", sel_heads,
              " x capacity entries");
  TORCH_CHECK(key_offsets.is_cuda() && key_offsets.scalar_type() == at::kLong &&
                  key_offsets.dim() == 1 && key_offsets.stride(0) == 1 &&
                  key_offsets.size(0) >= num_seqs,
              "bitdecode: key_offsets must be a contiguous CUDA int64 vector with one entry "
              "per sequence");
  TORCH_CHECK(min_seq_len >= 0 && min_seq_len <= INT32_MAX,
              "bitdecode: min_seq_len must be in [0, 2^31 - 1], got ", min_seq_len);
  check_same_device(keys, "keys", q);
  check_same_device(key_offsets, "key_offsets", q);
  // the decode writes keys (and out, the partials), the top-k reads the keys and writes
  // the lists and counts
  check_apart({{&keys, "keys"}, {&sel_positions, "sel_positions"}, {&sel_count, "sel_count"},
               {present(sel_cache_tiles), "sel_cache_tiles"}},
              {{&q, "q"}, {&cache, "cache"}, {&block_table, "block_table"},
               {&seq_lens, "seq_lens"}, {&key_offsets, "key_offsets"},
               {present(rotation_signs), "rotation_signs"}, {&out, "out"},
               {p.partial_out ? &partial_out : nullptr, "partial_out"},
               {p.partial_lse ? &partial_lse : nullptr, "partial_lse"}});

  auto* key_data = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  const int64_t capacity = keys.numel() / sel_heads;
  p.sel_keys = key_data;
  p.key_offsets = key_offsets.data_ptr<int64_t>();
  p.key_capacity = capacity;
  p.sel_min_seq_len = static_cast<int>(min_seq_len);

  SelectParams sp{};
  sp.seq_lens = seq_lens.data_ptr<int32_t>();
  sp.key_offsets = p.key_offsets;
  sp.keys = key_data;
  sp.key_capacity = capacity;
  sp.sel_positions = sel_positions.data_ptr<int32_t>();  // written here, read by the reuse layers
  sp.sel_stride_seq = p.sel_stride_seq, sp.sel_stride_head = p.sel_stride_head;
  sp.sel_count = sel_count.data_ptr<int32_t>();
  sp.sel_budget = p.sel_budget;
  sp.unit_shift = p.sel_unit_shift;
  sp.num_seqs = static_cast<int>(num_seqs);
  sp.min_seq_len = p.sel_min_seq_len;
  sp.shared = shared_selection;
  sp.sel_cache_tiles = cache_tiles;  // nullptr: positions only
  sp.block_table = p.block_table;
  sp.block_table_stride = p.block_table_stride;
  sp.tile_shift = p.page.block_shift - 4;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(q.scalar_type(), bits, group_size,
                     launch_decode_select<T, kBits, kGroup>(p, sp, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_tokens_kc(const at::Tensor& key, const at::Tensor& value,
                     const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& row_slot, at::Tensor& cache,
                     at::Tensor& residual, int64_t bits, int64_t group_size,
                     int64_t block_size, int64_t k_param_bits) {
  const PageGeometry g = page_geometry(bits, group_size, block_size);
  const int kpb = check_k_param_bits(k_param_bits);
  check_tokens(key, "key");
  check_tokens(value, "value");
  TORCH_CHECK(key.sizes() == value.sizes() && key.scalar_type() == value.scalar_type(),
              "bitdecode: key and value must have the same shape and dtype");
  const int64_t num_kv_heads = key.size(1);
  TORCH_CHECK(slot_mapping.is_cuda() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.dim() == 1 && slot_mapping.stride(0) == 1 &&
                  slot_mapping.size(0) <= key.size(0),
              "bitdecode: slot_mapping must be a contiguous CUDA int64 vector, one entry per "
              "actual token");
  TORCH_CHECK(query_start_loc.is_cuda() && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.dim() == 1 && query_start_loc.is_contiguous() &&
                  query_start_loc.size(0) >= 1,
              "bitdecode: query_start_loc must be a contiguous CUDA int32 [num_reqs + 1]");
  const int64_t num_reqs = query_start_loc.size(0) - 1;
  for (const auto& [x, name] : {std::pair<const at::Tensor&, const char*>{seq_lens, "seq_lens"},
                                 {row_slot, "row_slot"}}) {
    TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kInt && x.dim() == 1 &&
                    x.is_contiguous() && x.size(0) >= num_reqs,
                "bitdecode: ", name, " must be a contiguous CUDA int32 vector with one entry "
                "per request");
  }
  check_residual(residual, num_kv_heads, block_size, key.scalar_type());
  check_cache(cache, g, num_kv_heads, kpb);
  check_apart({{&cache, "cache"}, {&residual, "residual"}},
              {{&key, "key"}, {&value, "value"}, {&slot_mapping, "slot_mapping"},
               {&query_start_loc, "query_start_loc"}, {&seq_lens, "seq_lens"},
               {&row_slot, "row_slot"}});
  check_write_grid(slot_mapping.size(0), num_kv_heads);
  check_same_device(key, "key", {{value, "value"}, {slot_mapping, "slot_mapping"},
                                 {query_start_loc, "query_start_loc"}, {seq_lens, "seq_lens"},
                                 {row_slot, "row_slot"}, {cache, "cache"},
                                 {residual, "residual"}});
  const KCOffsets kc = kc_offsets(g, kpb);
  const c10::cuda::CUDAGuard guard(key.device());

  KCWriteParams p{};
  set_write_inputs(p, key, value, slot_mapping, cache);
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.row_slot = row_slot.data_ptr<int32_t>();
  p.residual = residual.data_ptr();
  p.num_tokens = static_cast<int>(slot_mapping.size(0));
  p.num_reqs = static_cast<int>(num_reqs);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.block_size = static_cast<int>(block_size);
  p.row_bytes = g.row_bytes;
  p.v_rows_offset = g.v_rows_offset;
  p.v_params_offset = g.params_offset;
  p.v_param_bytes = static_cast<int>(kc.v_param_bytes);
  p.k_params_offset = static_cast<int>(kc.k_params_offset);
  p.tile_bytes = static_cast<int>(kc.tile_bytes);
  p.k_params_fp8 = kpb == 8;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BITDECODE_DISPATCH(key.scalar_type(), bits, group_size,
                     launch_kc_write<T, kBits, kGroup>(p, stream);)
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t decode_ctas_per_sm(const at::Tensor& query_like, int64_t bits, int64_t group_size,
                           int64_t gqa, bool channel_k, int64_t k_param_bits) {
  const at::ScalarType dtype = query_like.scalar_type();
  TORCH_CHECK(query_like.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf),
              "bitdecode: decode runs on CUDA bfloat16 or float16 queries, got ", dtype,
              " on ", query_like.device());
  TORCH_CHECK(gqa >= 1 && gqa <= kMaxGqaRows, "bitdecode: query heads per KV head must be in "
              "[1, ", kMaxGqaRows, "], got ", gqa);
  page_geometry(bits, group_size, 16);  // checks bits and group_size
  const bool k_params_fp8 = channel_k && check_k_param_bits(k_param_bits) == 8;
  const c10::cuda::CUDAGuard guard(query_like.device());
  int ctas = -1;
  BITDECODE_DISPATCH(dtype, bits, group_size,
                     ctas = decode_ctas_per_sm<T, kBits, kGroup>(static_cast<int>(gqa),
                                                                 channel_k, k_params_fp8);)
  TORCH_CHECK(ctas > 0, "bitdecode: could not query the decode kernel's occupancy");
  return ctas;
}

}  // namespace bitdecode
