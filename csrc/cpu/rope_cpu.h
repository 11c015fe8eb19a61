// The CPU kernel's entry points, one per instruction set (see rope_cpu_kernel.h).
#pragma once

#include "../rope_problem.h"

namespace rope::cpu {
namespace DEFAULT { void rope_cpu_kernel(const RopeProblem& p); }
namespace AVX2 { void rope_cpu_kernel(const RopeProblem& p); }
namespace AVX512 { void rope_cpu_kernel(const RopeProblem& p); }
// AVX-512 plus the BF16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later).
namespace AVX512_BF16 { void rope_cpu_kernel(const RopeProblem& p); }

// The widest of the three that this processor runs and ATen allows
// (ATEN_CPU_CAPABILITY caps it, as it does for ATen's own kernels).
void rope_cpu(const RopeProblem& p);
}  // namespace rope::cpu
