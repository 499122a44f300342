// Operators of the emulator itself: how many kernels it has run, and the seed of its thread and block order.
#include "cuda_emu.h"

namespace {
int64_t launches() {
  const std::lock_guard<std::mutex> lock(cf_emu::emulator().mutex);
  return cf_emu::emulator().launches;
}

void set_seed(int64_t seed) {  // every later launch starts from this seed
  const std::lock_guard<std::mutex> lock(cf_emu::emulator().mutex);
  cf_emu::emulator().seed = static_cast<uint64_t>(seed);
}
}  // namespace

TORCH_LIBRARY(cuda_emu, m) {
  m.def("launches() -> int", &launches);
  m.def("set_seed(int seed) -> ()", &set_seed);
}
