// Picks the CPU kernel built for the widest instruction set this machine runs.
#include "rope_cpu.h"

#include <ATen/Version.h>

#include <string>

namespace rope::cpu {

namespace {
enum class Isa { kDefault, kAvx2, kAvx512 };

// at::get_cpu_capability() already combines what the processor supports with the
// ATEN_CPU_CAPABILITY override, so rope_ext follows the same choice as ATen.
Isa detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return Isa::kAvx512;
  if (cap == "AVX2") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}
}  // namespace

void rope_cpu(const RopeProblem& p) {
  static const Isa isa = detect_isa();
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx512:
      return AVX512::rope_cpu_kernel(p);
    case Isa::kAvx2:
      return AVX2::rope_cpu_kernel(p);
#endif
    default:
      return DEFAULT::rope_cpu_kernel(p);
  }
}

}  // namespace rope::cpu
