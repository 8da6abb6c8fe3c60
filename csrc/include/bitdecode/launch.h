// Kernel launchers, one explicit instantiation per (dtype, bits, group) in
// csrc/instantiations/ so the heavy decode template compiles in parallel.
#pragma once

#include <cuda_runtime.h>

#include "bitdecode/params.h"

namespace bitdecode {

template <typename T, int BITS, int GROUP>
void launch_quantize(const QuantizeParams& p, cudaStream_t stream);

template <typename T, int BITS, int GROUP>
void launch_dequantize(const DequantizeParams& p, cudaStream_t stream);

// Per-channel K mode: channel-mode pages back to the model dtype (prefill's closed pages).
template <typename T, int BITS, int GROUP>
void launch_dequantize_kc(const DequantizeParams& p, cudaStream_t stream);

template <typename T, int BITS, int GROUP>
void launch_decode(const DecodeParams& p, cudaStream_t stream);

// Sparse decode (reuse layers): each row attends to its positions in p.sel_positions.
template <typename T, int BITS, int GROUP>
void launch_decode_sparse(const DecodeParams& p, cudaStream_t stream);

// Per-channel K mode: decode over channel-mode pages, the own page from p.residual.
template <typename T, int BITS, int GROUP>
void launch_decode_kc(const DecodeParams& p, cudaStream_t stream);

// Selection layer of sparse decode: the dense decode, which also writes the selection
// keys (decode.sel_keys), then the top-k over them into select.sel_positions / sel_count.
template <typename T, int BITS, int GROUP>
void launch_decode_select(const DecodeParams& decode, const SelectParams& select,
                          cudaStream_t stream);

// Per-channel K mode: one step's K/V into channel-mode pages and residuals.
template <typename T, int BITS, int GROUP>
void launch_kc_write(const KCWriteParams& p, cudaStream_t stream);

// Decode CTAs resident per SM for `gqa` query heads per KV head, of the per-token or the
// per-channel K kernel (fp16 or e4m3 K params; -1 on a CUDA error).
template <typename T, int BITS, int GROUP>
int decode_ctas_per_sm(int gqa, bool channel_k, bool k_params_fp8);

}  // namespace bitdecode
