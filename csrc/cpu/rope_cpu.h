// The CPU kernel's entry points, one per instruction set (see rope_cpu_kernel.h).
#pragma once

#include "../rope_problem.h"

namespace rope::cpu {
namespace DEFAULT { void rope_cpu_kernel(const RopeProblem& p); }
namespace AVX2 { void rope_cpu_kernel(const RopeProblem& p); }
namespace AVX512 { void rope_cpu_kernel(const RopeProblem& p); }

// The widest of the three that this processor runs and ATen allows
// (ATEN_CPU_CAPABILITY caps it, as it does for ATen's own kernels).
void rope_cpu(const RopeProblem& p);
}  // namespace rope::cpu
