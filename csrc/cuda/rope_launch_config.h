// The CUDA launch thresholds in force, and the host executor of the CUDA kernel.
// Compiled into every build (with or without CUDA): the host executor needs no GPU.
#pragma once

#include <string>

#include "../rope_problem.h"
#include "rope_cuda_kernel.cuh"

namespace rope::cuda {

// The thresholds every launch plans with: the defaults of LaunchConfig, overridden
// by ROPE_EXT_CUDA_LAUNCH ("key=value,..."), or by the last set_launch_config.
LaunchConfig launch_config();

// Replaces the overrides with `spec` (same syntax; "" restores the defaults) and
// returns the previous spec. An unknown key or a bad value raises ValueError.
std::string set_launch_config(const std::string& spec);

// Runs the CUDA kernel's body on the host for every (block, thread) of the grid
// the plan chose, checking every access: a 16-byte access must be 16-byte aligned,
// and each output element must be stored exactly once. Violations raise.
void rope_cuda_host(const RopeProblem& p);

// The same for the fused QK-RMSNorm + RoPE (norm_rope_cuda_kernel.cuh), forward or backward.
void norm_rope_cuda_host(const NormRopeProblem& p);

// The plan of the last host-executed launch, as "key=value,..." (tests read it).
std::string last_host_plan();

}  // namespace rope::cuda
