// The CUDA kernel: a thin __global__ wrapper around the body in rope_cuda_kernel.cuh
// (which the host executor also runs, so CI executes this logic without a GPU),
// the launcher, and the registration for torch.ops.rope.*.
//
// Which grid serves which shape (the reasons at the top of rope_cuda_kernel.cuh):
//  - prefill and training: one item per token with all heads of q and k, several tokens
//    per block, each thread's cos/sin chunk read once and reused across the heads;
//  - decode (too few tokens to fill the SMs): token x head-group items;
//  - always at most one wave of blocks, striding over the items (persistent grid);
//    16-byte accesses where aligned, 32-bit offsets where they fit.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#include "../rope_adapter.h"
#include "norm_rope_cuda_kernel.cuh"
#include "rope_cuda_kernel.cuh"
#include "rope_launch_config.h"

namespace rope::cuda {
namespace {

// Plain loads and stores; Pack's alignment makes N > 1 one 16-byte (or narrower) access.
struct DeviceAccess {
  template <typename T, int N>
  __device__ __forceinline__ static Pack<T, N> load(const T* p) {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  }
  // Brings the line holding p into L2 (a hint: no register receives data).
  template <typename T>
  __device__ __forceinline__ static void prefetch(const T* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
  }
  // A 16-byte pack goes out as one 16-byte store. As a plain struct copy, nvcc kept most of
  // the rotation kernel's stores whole but split every store of the fused norm kernels into
  // pieces of the element's size (eight 2-byte stores for a bf16 run; the loads stayed
  // 16-byte), and those of the rotation's float64 kernels with 64-bit offsets in two;
  // make cuda-build checks the compiled code for it (.ci/check_cuda_build.py).
  template <typename T, int N>
  __device__ __forceinline__ static void store(T* p, const Pack<T, N>& v) {
    if constexpr (sizeof(Pack<T, N>) == sizeof(uint4)) {
      uint4 bits;
      __builtin_memcpy(&bits, &v, sizeof(bits));
      // A plain (weak) store: __stwb's st.global.wb became STG.E.128.STRONG.SM.
      asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(bits.x), "r"(bits.y),
          "r"(bits.z), "r"(bits.w)
          : "memory");
    } else {
      *reinterpret_cast<Pack<T, N>*>(p) = v;
    }
  }
};

template <typename scalar_t, typename table_t, int N, typename Index>
__global__ void rope_kernel(const RopeProblem p, const LaunchPlan plan) {
  rope_thread<scalar_t, table_t, N, Index, DeviceAccess>(p, plan, static_cast<Index>(blockIdx.x),
                                                         static_cast<Index>(threadIdx.x),
                                                         static_cast<Index>(threadIdx.y));
}

// The same body held to 64 registers, so 4 blocks of 256 threads are resident per SM.
template <typename scalar_t, typename table_t, int N, typename Index>
__global__ void __launch_bounds__(kOccupancyThreads, 4)
    rope_kernel_occupancy(const RopeProblem p, const LaunchPlan plan) {
  rope_thread<scalar_t, table_t, N, Index, DeviceAccess>(p, plan, static_cast<Index>(blockIdx.x),
                                                         static_cast<Index>(threadIdx.x),
                                                         static_cast<Index>(threadIdx.y));
}

struct DeviceRunner {
  cudaStream_t stream;
  template <typename scalar_t, typename table_t, int N, typename Index, int MinBlocks>
  void run(const RopeProblem& p, const LaunchPlan& plan) {
    const dim3 block(plan.block_x, plan.block_y);
    const auto grid = static_cast<unsigned>(plan.grid);
    if constexpr (MinBlocks == 4) {
      rope_kernel_occupancy<scalar_t, table_t, N, Index><<<grid, block, 0, stream>>>(p, plan);
    } else {
      rope_kernel<scalar_t, table_t, N, Index><<<grid, block, 0, stream>>>(p, plan);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Multiprocessors of each device, asked once per device (a query per launch costs
// microseconds, which is a decode step's whole budget).
int sm_count(int device) {
  static std::mutex mutex;
  static std::vector<int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

void rope_cuda(const RopeProblem& p) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  DeviceRunner runner{c10::cuda::getCurrentCUDAStream()};
  plan_and_run(p, launch_config(), sm_count(device), runner);
}

// --- the fused QK-RMSNorm + RoPE (norm_rope_cuda_kernel.cuh) ---

// The lanes of this thread's warp that exist (a block of fewer than 32 threads, or
// a last partial warp, has fewer): the mask of the item loop's shuffles.
__device__ __forceinline__ unsigned warp_lanes_mask() {
  const unsigned threads = blockDim.x * blockDim.y;
  const unsigned linear = threadIdx.y * blockDim.x + threadIdx.x;
  const unsigned first = linear / 32 * 32;
  const unsigned lanes = threads - first < 32 ? threads - first : 32;
  return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
}

// The item loop of one direction (kBackward = np.backward): the forward and the backward
// are separate kernels, as one kernel holding both bodies is given the registers of the
// larger (the backward's), which capped the forward's resident blocks.
template <bool kBackward, typename scalar_t, typename table_t, int N>
__device__ __forceinline__ void norm_rope_items(const NormRopeProblem& np, const NormPlan& plan) {
  using T = opmath_t<scalar_t>;
  const unsigned mask = warp_lanes_mask();
  const int64_t stride = plan.grid * plan.block_y;
  // The loop bound depends on the block only, so every lane of a warp takes part in
  // every shuffle; lanes past the last item add zeros.
  for (int64_t base = blockIdx.x * static_cast<int64_t>(plan.block_y); base < plan.items;
       base += stride) {
    const int64_t item = base + threadIdx.y;
    const bool active = item < plan.items;
    const NormItem it(np, active ? item : 0);
    KeptRuns<T, N> kept;
    T sum = T(0);
    // The next item's hint first: its bytes then travel while this item waits on its own.
    if (plan.prefetch && item + stride < plan.items) {
      prefetch_item<scalar_t, N, DeviceAccess>(np, plan, item + stride, threadIdx.x);
    }
    if (active) {
      if constexpr (kBackward) {
        sum = norm_backward_sum<scalar_t, table_t, N, DeviceAccess>(np, plan, it, threadIdx.x);
      } else {
        sum = norm_forward_sum<scalar_t, table_t, N, DeviceAccess>(np, plan, it, threadIdx.x, kept);
      }
    }
    for (int o = plan.block_x / 2; o > 0; o /= 2) sum += __shfl_xor_sync(mask, sum, o);
    if (!active) continue;
    if constexpr (kBackward) {
      norm_backward_store<scalar_t, table_t, N, DeviceAccess>(np, plan, it, threadIdx.x, sum);
    } else {
      norm_forward_store<scalar_t, table_t, N, DeviceAccess>(np, plan, it, threadIdx.x, sum, kept);
    }
  }
}

template <bool kBackward, typename scalar_t, typename table_t, int N>
__global__ void norm_rope_kernel(const NormRopeProblem np, const NormPlan plan) {
  norm_rope_items<kBackward, scalar_t, table_t, N>(np, plan);
}

// The forward held to 64 registers (4 blocks of 256 threads per SM instead of 2; ptxas
// spills some state to local memory): chosen by the launch setting norm_min_blocks=4, for
// the GPU's sweep to weigh occupancy against the spills.
template <typename scalar_t, typename table_t, int N>
__global__ void __launch_bounds__(kOccupancyThreads, 4)
    norm_rope_forward_kernel_occupancy(const NormRopeProblem np, const NormPlan plan) {
  norm_rope_items<false, scalar_t, table_t, N>(np, plan);
}

template <typename scalar_t, typename table_t>
__global__ void scale_grad_partial_kernel(const NormRopeProblem np) {
  scale_grad_partial<scalar_t, table_t, DeviceAccess>(
      np, static_cast<int64_t>(blockIdx.x) * kFlatBlock + threadIdx.x);
}

template <typename T>
__global__ void scale_grad_sum_kernel(const NormRopeProblem np) {
  scale_grad_sum<T, DeviceAccess>(np, static_cast<int64_t>(blockIdx.x) * kFlatBlock + threadIdx.x);
}

struct NormDeviceRunner {
  cudaStream_t stream;
  template <typename scalar_t, typename table_t, int N, int MinBlocks>
  void run(const NormRopeProblem& np, const NormPlan& plan) {
    const dim3 block(plan.block_x, plan.block_y);
    const auto grid = static_cast<unsigned>(plan.grid);
    if (!np.backward) {
      if constexpr (MinBlocks == 4) {
        norm_rope_forward_kernel_occupancy<scalar_t, table_t, N>
            <<<grid, block, 0, stream>>>(np, plan);
      } else {
        norm_rope_kernel<false, scalar_t, table_t, N><<<grid, block, 0, stream>>>(np, plan);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    norm_rope_kernel<true, scalar_t, table_t, N><<<grid, block, 0, stream>>>(np, plan);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scale_grad_partial_kernel<scalar_t, table_t>
        <<<static_cast<unsigned>(plan.partial_grid), kFlatBlock, 0, stream>>>(np);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scale_grad_sum_kernel<opmath_t<scalar_t>>
        <<<static_cast<unsigned>(plan.sum_grid), kFlatBlock, 0, stream>>>(np);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void norm_rope_cuda(const NormRopeProblem& np) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  NormDeviceRunner runner{c10::cuda::getCurrentCUDAStream()};
  plan_and_run_norm(np, launch_config(), sm_count(device), runner);
}

// --- registration: the device guard here, the shared checks in rope_adapter.cpp ---

at::Tensor apply_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                      const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  const c10::cuda::CUDAGuard guard(x.device());
  return apply(rope_cuda, x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
}

void apply_cuda_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                 const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  const c10::cuda::CUDAGuard guard(x.device());
  apply_(rope_cuda, x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
}

std::tuple<at::Tensor, at::Tensor> apply_qk_cuda(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 const std::optional<at::Tensor>& positions,
                                                 bool interleaved, bool inverse,
                                                 const std::optional<at::Tensor>& inv_freq,
                                                 double attention_factor) {
  const c10::cuda::CUDAGuard guard(q.device());
  return apply_qk(rope_cuda, q, k, cos, sin, positions, interleaved, inverse, inv_freq,
                  attention_factor);
}

void apply_qk_cuda_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                    bool interleaved, bool inverse, const std::optional<at::Tensor>& inv_freq,
                    double attention_factor) {
  const c10::cuda::CUDAGuard guard(q.device());
  apply_qk_(rope_cuda, q, k, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, bool across_heads, double weight_offset,
    bool interleaved) {
  const c10::cuda::CUDAGuard guard(q.device());
  return rms_norm_rope_qk(norm_rope_cuda, q, k, cos, sin, positions, q_weight, k_weight, eps,
                          across_heads, weight_offset, interleaved);
}

void rms_norm_rope_qk_cuda_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                            const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                            const at::Tensor& q_weight, const at::Tensor& k_weight, double eps,
                            bool across_heads, double weight_offset, bool interleaved) {
  const c10::cuda::CUDAGuard guard(q.device());
  rms_norm_rope_qk_(norm_rope_cuda, q, k, cos, sin, positions, q_weight, k_weight, eps,
                    across_heads, weight_offset, interleaved);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& positions,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_rstd,
    const at::Tensor& k_rstd, bool across_heads, double weight_offset, bool interleaved) {
  const c10::cuda::CUDAGuard guard(q.device());
  return rms_norm_rope_qk_backward(norm_rope_cuda, grad_q, grad_k, q, k, cos, sin, positions,
                                   q_weight, k_weight, q_rstd, k_rstd, across_heads, weight_offset,
                                   interleaved);
}

}  // namespace

TORCH_LIBRARY_IMPL(rope, CUDA, m) {
  m.impl("apply", &apply_cuda);
  m.impl("apply_", &apply_cuda_);
  m.impl("apply_qk", &apply_qk_cuda);
  m.impl("apply_qk_", &apply_qk_cuda_);
  m.impl("rms_norm_rope_qk", &rms_norm_rope_qk_cuda);
  m.impl("rms_norm_rope_qk_", &rms_norm_rope_qk_cuda_);
  m.impl("rms_norm_rope_qk_backward", &rms_norm_rope_qk_backward_cuda);
}

}  // namespace rope::cuda
