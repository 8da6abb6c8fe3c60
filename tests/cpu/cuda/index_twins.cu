// Prints the index maps of fragments.cuh that have Python twins (page_format.py's
// *_channel_of_slot, reference_kc.k_param_index), one line each, for
// tests/cpu/test_index_twins.py. Host code only: runs without a GPU.
#include <cstdio>

#include "bitdecode/fragments.cuh"

template <int BITS>
void print_row_order() {
  using Order = bitdecode::RowOrder<128, BITS>;
  for (int kv = 0; kv < 2; ++kv) {
    std::printf("%s%d", kv ? "v" : "k", BITS);
    for (int w = 0; w < Order::kRowWords; ++w)
      for (int s = 0; s < Order::kValuesPerWord; ++s)
        std::printf(" %d", kv ? Order::v_channel(w, s) : Order::k_channel(w, s));
    std::printf("\n");
  }
}

int main() {
  print_row_order<4>();
  print_row_order<2>();
  std::printf("kc_param_index");
  for (int c = 0; c < 128; ++c) std::printf(" %d", bitdecode::kc_param_index(c));
  std::printf("\n");
  return 0;
}
