// The CPU kernel's entry points, one per instruction set (see rope_cpu_kernel.h).
#pragma once

#include <string>

#include "../rope_problem.h"

namespace rope::cpu {
// Each instruction-set variant's entry points (one namespace per CPU_CAPABILITY):
// the kernel, and its float32 -> bf16/fp16 rounding (for tests/test_narrowing.py).
#define ROPE_CPU_VARIANT(isa)                                                      \
  namespace isa {                                                                  \
  void rope_cpu_kernel(const RopeProblem& p);                                      \
  void norm_rope_cpu_kernel(const NormRopeProblem& p);                             \
  void narrow_float(const float* in, void* out, c10::ScalarType dtype, int64_t n); \
  }
ROPE_CPU_VARIANT(DEFAULT)
ROPE_CPU_VARIANT(AVX2)
ROPE_CPU_VARIANT(AVX512)
// AVX-512 plus the BF16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later).
ROPE_CPU_VARIANT(AVX512_BF16)
#undef ROPE_CPU_VARIANT

// Runs the kernel in force: by default the widest of the four that this processor
// runs and ATen allows (ATEN_CPU_CAPABILITY caps it, as it does for ATen's own kernels).
void rope_cpu(const RopeProblem& p);

// The fused QK-RMSNorm + RoPE (forward or backward) with the same choice of kernel.
void norm_rope_cpu(const NormRopeProblem& p);

// Selects the kernel rope_cpu runs: "auto" (the widest), "default", "avx2", "avx512",
// "avx512_bf16" (each capped to what the machine runs), or "cuda-host" (the CUDA
// kernel's host executor). Returns the previous choice; an unknown name raises.
// ROPE_EXT_CPU_KERNEL sets the initial choice.
std::string set_cpu_kernel(const std::string& name);

// Rounds n float32 values to `dtype` (bf16 or fp16) as the selected kernel's stores do.
void narrow_float(const float* in, void* out, c10::ScalarType dtype, int64_t n);
}  // namespace rope::cpu
