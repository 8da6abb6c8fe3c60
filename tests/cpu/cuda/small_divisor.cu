// Runs fragments.cuh's SmallDivisor on the host against integer division over its whole
// documented range, 0 <= n < 256 and 1 <= d <= 256, and past it (n up to 4096), printing
// "<range> <checked> <wrong>" per line for tests/cpu/test_small_divisor.py. Host code only.
#include <cstdio>

#include "bitdecode/fragments.cuh"

void check(const char* name, unsigned n_end) {
  long checked = 0, wrong = 0;
  for (unsigned d = 1; d <= 256; ++d) {
    const bitdecode::SmallDivisor by(d);
    for (unsigned n = 0; n < n_end; ++n, ++checked) wrong += by.quotient(n) != n / d;
  }
  std::printf("%s %ld %ld\n", name, checked, wrong);
}

int main() {
  check("documented", 256);
  check("beyond", 4096);  // not promised: shows that the bound is real
  return 0;
}
