// Runs fragments.cuh's unpack_pair_centred on the host over every code of every slot, in
// bf16 and fp16 at 4 and 2 bits, and prints one line per case: "<dtype> <bits> <checked>
// <wrong>", for tests/cpu/test_unpack_exact.py. Each register must hold exactly code -
// 2^(bits-1) of slot i (low half) and of slot i + vpw/2 (high half). Host code only.
#include <cstdint>
#include <cstdio>

#include "bitdecode/fragments.cuh"

template <typename T, int BITS>
void check(const char* name) {
  constexpr int kSlots = 32 / BITS, kHalf = kSlots / 2, kCodes = 1 << BITS;
  const float centre = bitdecode::kCodeCentre<BITS>;
  long checked = 0, wrong = 0;
  // every code in every slot (the other slots hold a pattern of their own), and a run of
  // pseudo-random words
  uint32_t state = 12345u;
  for (int n = 0; n < kCodes * kSlots + 4096; ++n) {
    uint32_t word;
    if (n < kCodes * kSlots) {
      const int slot = n / kCodes, code = n % kCodes;
      word = 0x9e3779b9u * static_cast<uint32_t>(n + 1);
      word &= ~((static_cast<uint32_t>(kCodes) - 1) << (BITS * slot));
      word |= static_cast<uint32_t>(code) << (BITS * slot);
    } else {
      state = state * 1664525u + 1013904223u;
      word = state;
    }
    for (int i = 0; i < kHalf; ++i) {
      const uint32_t r = bitdecode::unpack_pair_centred<T, BITS>(word, i);
      const float2 got = bitdecode::DtypeTraits<T>::unpack(r);
      const float lo = static_cast<float>((word >> (BITS * i)) & (kCodes - 1)) - centre;
      const float hi = static_cast<float>((word >> (BITS * (i + kHalf))) & (kCodes - 1)) - centre;
      ++checked;
      if (got.x != lo || got.y != hi) {
        if (wrong < 5)
          std::printf("# %s %d-bit word %08x pair %d: got %g %g, want %g %g\n", name, BITS,
                      word, i, got.x, got.y, lo, hi);
        ++wrong;
      }
    }
  }
  std::printf("%s %d %ld %ld\n", name, BITS, checked, wrong);
}

int main() {
  check<__nv_bfloat16, 4>("bf16");
  check<__nv_bfloat16, 2>("bf16");
  check<__half, 4>("fp16");
  check<__half, 2>("fp16");
  return 0;
}
