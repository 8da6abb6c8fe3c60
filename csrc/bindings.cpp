// Declares the bitdecode torch ops; the implementations live in ops.cpp.
#include <Python.h>
#include <torch/library.h>

#include "bitdecode/ops.h"

TORCH_LIBRARY(bitdecode, m) {
  m.def(
      "quantize_to_pages(Tensor key, Tensor value, Tensor slot_mapping, Tensor(a!) cache, "
      "Tensor? rotation_signs, int bits, int group_size, int block_size) -> ()");
  m.def(
      "dequantize_pages(Tensor cache, Tensor block_table, Tensor seq_lens, Tensor out_start, "
      "Tensor(a!) key_out, Tensor(b!) value_out, int bits, int group_size, int block_size, "
      "int max_tokens) -> ()");
  m.def(
      "dequantize_pages_kc(Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor out_start, Tensor(a!) key_out, Tensor(b!) value_out, int bits, int group_size, "
      "int block_size, int max_tokens, int k_param_bits=16) -> ()");
  m.def(
      "decode(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor(b!) partial_out, Tensor(c!) partial_lse, Tensor? rotation_signs, "
      "float softmax_scale, int bits, int group_size, int block_size, int num_splits, "
      "int min_tiles_per_split, Tensor? query_start_loc=None, int max_query_len=1) -> ()");
  m.def(
      "decode_sparse(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_table, "
      "Tensor seq_lens, Tensor sel_positions, Tensor sel_count, Tensor(b!) partial_out, "
      "Tensor(c!) partial_lse, Tensor? rotation_signs, float softmax_scale, int bits, "
      "int group_size, int block_size, int num_splits, int min_tiles_per_split, "
      "bool shared_selection, int selection_unit=1, Tensor? sel_cache_tiles=None) -> ()");
  m.def(
      "decode_kc(Tensor(a!) out, Tensor q, Tensor cache, Tensor residual, Tensor block_table, "
      "Tensor seq_lens, Tensor row_slot, Tensor(b!) partial_out, Tensor(c!) partial_lse, "
      "float softmax_scale, int bits, int group_size, int block_size, int num_splits, "
      "int min_tiles_per_split, int k_param_bits=16) -> ()");
  m.def(
      "decode_select(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_table, "
      "Tensor seq_lens, Tensor(b!) partial_out, Tensor(c!) partial_lse, "
      "Tensor? rotation_signs, float softmax_scale, int bits, int group_size, int block_size, "
      "int num_splits, int min_tiles_per_split, Tensor(d!) sel_positions, "
      "Tensor(e!) sel_count, Tensor(f!) keys, Tensor key_offsets, int min_seq_len, "
      "bool shared_selection, int selection_unit=1, Tensor(g!)? sel_cache_tiles=None) -> ()");
  m.def(
      "write_tokens_kc(Tensor key, Tensor value, Tensor slot_mapping, Tensor query_start_loc, "
      "Tensor seq_lens, Tensor row_slot, Tensor(a!) cache, Tensor(b!) residual, int bits, "
      "int group_size, int block_size, int k_param_bits=16) -> ()");
  m.def(
      "decode_ctas_per_sm(Tensor query_like, int bits, int group_size, int gqa, "
      "bool channel_k=False, int k_param_bits=16) -> int");
}

TORCH_LIBRARY_IMPL(bitdecode, CUDA, m) {
  m.impl("quantize_to_pages", &bitdecode::quantize_to_pages);
  m.impl("dequantize_pages", &bitdecode::dequantize_pages);
  m.impl("dequantize_pages_kc", &bitdecode::dequantize_pages_kc);
  m.impl("decode", &bitdecode::decode);
  m.impl("decode_sparse", &bitdecode::decode_sparse);
  m.impl("decode_kc", &bitdecode::decode_kc);
  m.impl("decode_select", &bitdecode::decode_select);
  m.impl("write_tokens_kc", &bitdecode::write_tokens_kc);
  m.impl("decode_ctas_per_sm", &bitdecode::decode_ctas_per_sm);
}

// `import vllm_bitdecode._C` loads this library, which registers the ops above; the
// module itself is empty (ops are reached through torch.ops.bitdecode).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
