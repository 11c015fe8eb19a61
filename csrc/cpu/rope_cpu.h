// The CPU kernel's entry points, one per instruction set (see rope_cpu_kernel.h).
#pragma once

#include <string>

#include "../rope_problem.h"

namespace rope::cpu {
namespace DEFAULT { void rope_cpu_kernel(const RopeProblem& p); }
namespace AVX2 { void rope_cpu_kernel(const RopeProblem& p); }
namespace AVX512 { void rope_cpu_kernel(const RopeProblem& p); }
// AVX-512 plus the BF16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later).
namespace AVX512_BF16 { void rope_cpu_kernel(const RopeProblem& p); }

// Runs the kernel in force: by default the widest of the four that this processor
// runs and ATen allows (ATEN_CPU_CAPABILITY caps it, as it does for ATen's own kernels).
void rope_cpu(const RopeProblem& p);

// Selects the kernel rope_cpu runs: "auto" (the widest), "default", "avx2", "avx512",
// "avx512_bf16" (each capped to what the machine runs), or "cuda-host" (the CUDA
// kernel's host executor). Returns the previous choice; an unknown name raises.
// ROPE_EXT_CPU_KERNEL sets the initial choice.
std::string set_cpu_kernel(const std::string& name);
}  // namespace rope::cpu
