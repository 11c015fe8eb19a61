// Picks the CPU kernel built for the widest instruction set this machine runs.
#include "rope_cpu.h"

#include <ATen/Version.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace rope::cpu {

namespace {
enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

// at::get_cpu_capability() already combines what the processor supports with the
// ATEN_CPU_CAPABILITY override, so rope_ext follows the same choice as ATen.
// ROPE_EXT_CPU_KERNEL (default, avx2, avx512, avx512_bf16) narrows it further, so the
// tests can run each kernel on a machine that would pick a wider one.
Isa detect_isa() {
  Isa widest = Isa::kDefault;
#if defined(__x86_64__) || defined(_M_X64)
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") {
    widest = __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  } else if (cap == "AVX2") {
    widest = Isa::kAvx2;
  }
#endif
  const char* env = std::getenv("ROPE_EXT_CPU_KERNEL");
  if (env == nullptr) return widest;
  const std::string want(env);
  Isa asked = widest;
  if (want == "default") asked = Isa::kDefault;
  if (want == "avx2") asked = Isa::kAvx2;
  if (want == "avx512") asked = Isa::kAvx512;
  return std::min(asked, widest);
}
}  // namespace

void rope_cpu(const RopeProblem& p) {
  static const Isa isa = detect_isa();
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx512Bf16:
      return AVX512_BF16::rope_cpu_kernel(p);
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
