// The CUDA kernel and its registration for torch.ops.rope.*.
//
// Token-parallel: a block takes one token at a time (grid-stride over tokens,
// so packed variable-length batches need no per-sequence launch shape and no
// host sync). Thread (tx, ty) owns pair chunk tx of every head ty, ty + by, ...
// of q then k: it reads its cos/sin values once per token and reuses them for
// every head it rotates. A chunk is one 16-byte load of each of its two runs
// (see chunk_offsets in rope_math.h) wherever alignment allows, else one pair.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../rope_ops.h"

namespace rope::cuda {
namespace {

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename scalar_t, typename T>
__device__ __forceinline__ void load_run(const scalar_t* p, T (&out)[N]) {
  Pack<scalar_t, N> pk = *reinterpret_cast<const Pack<scalar_t, N>*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<T>(pk.v[j]);
}

template <int N, typename scalar_t, typename T>
__device__ __forceinline__ void store_run(scalar_t* p, const T (&in)[N]) {
  Pack<scalar_t, N> pk;
#pragma unroll
  for (int j = 0; j < N; ++j) pk.v[j] = static_cast<scalar_t>(in[j]);
  *reinterpret_cast<Pack<scalar_t, N>*>(p) = pk;
}

// N elements of x per run: 16 bytes (8 bf16/fp16, 4 float, 2 double), or 1 on
// the scalar path, where the strides are then applied element by element.
template <typename scalar_t, typename table_t, int N>
__global__ void rope_kernel(const RopeProblem p) {
  using T = opmath_t<scalar_t>;
  const int64_t tokens = p.batch * p.seq;
  const int64_t chunks = p.half / N;
  const int64_t heads0 = p.x[0].heads;
  const int64_t heads = heads0 + (p.num_x > 1 ? p.x[1].heads : 0);
  const TableIndex& t = p.table;

  for (int64_t tok = blockIdx.x; tok < tokens; tok += gridDim.x) {
    const int64_t b = tok / p.seq, s = tok % p.seq;
    const int64_t pos = token_position(t, b, s);
    // Without a device sync the range cannot be checked before launch: a token
    // whose position lies outside the table reads nothing and comes out NaN.
    const bool in_table = (t.pos32 == nullptr && t.pos64 == nullptr) || (pos >= 0 && pos < t.rows);
    const table_t* cos = static_cast<const table_t*>(p.cos) + (in_table ? cos_offset(t, b, s, pos) : 0);
    const table_t* sin = static_cast<const table_t*>(p.sin) + (in_table ? sin_offset(t, b, s, pos) : 0);

    for (int64_t chunk = threadIdx.x; chunk < chunks; chunk += blockDim.x) {
      const int64_t i0 = chunk * N;
      T c[N], sn[N];
      const T sign = p.inverse ? T(-1) : T(1);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        c[j] = in_table ? static_cast<T>(cos[(i0 + j) * t.cos_si])
                        : std::numeric_limits<T>::quiet_NaN();
        sn[j] = in_table ? sign * static_cast<T>(sin[(i0 + j) * t.sin_si])
                         : std::numeric_limits<T>::quiet_NaN();
      }
      int64_t lo_off, hi_off;
      chunk_offsets(i0, N, p.half, p.interleaved, lo_off, hi_off);
      for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
        const HeadsDesc& d = h < heads0 ? p.x[0] : p.x[1];
        const int64_t hh = h < heads0 ? h : h - heads0;
        const scalar_t* x = static_cast<const scalar_t*>(d.in) + b * d.in_sb + s * d.in_ss + hh * d.in_sh;
        scalar_t* y = static_cast<scalar_t*>(d.out) + b * d.out_sb + s * d.out_ss + hh * d.out_sh;
        T lo[N], hi[N];
        if constexpr (N > 1) {
          load_run<N>(x + lo_off, lo);
          load_run<N>(x + hi_off, hi);
        } else {
          lo[0] = static_cast<T>(x[lo_off * d.in_sd]);
          hi[0] = static_cast<T>(x[hi_off * d.in_sd]);
        }
        rotate_chunk(lo, hi, c, sn, p.interleaved);
        if constexpr (N > 1) {
          store_run<N>(y + lo_off, lo);
          store_run<N>(y + hi_off, hi);
        } else {
          y[lo_off * d.out_sd] = static_cast<scalar_t>(lo[0]);
          y[hi_off * d.out_sd] = static_cast<scalar_t>(hi[0]);
        }
      }
    }

    // x[r:] of the functional op: copied (in place, it is already where it belongs).
    for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
      const HeadsDesc& d = h < heads0 ? p.x[0] : p.x[1];
      if (d.in == d.out) continue;
      const int64_t hh = h < heads0 ? h : h - heads0;
      const scalar_t* x = static_cast<const scalar_t*>(d.in) + b * d.in_sb + s * d.in_ss + hh * d.in_sh;
      scalar_t* y = static_cast<scalar_t*>(d.out) + b * d.out_sb + s * d.out_ss + hh * d.out_sh;
      for (int64_t e = 2 * p.half + threadIdx.x * N; e < d.head_dim; e += blockDim.x * N) {
        if constexpr (N > 1) {
          *reinterpret_cast<Pack<scalar_t, N>*>(y + e) = *reinterpret_cast<const Pack<scalar_t, N>*>(x + e);
        } else {
          y[e * d.out_sd] = x[e * d.in_sd];
        }
      }
    }
  }
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// 16-byte runs need unit-stride head_dim, every other stride and both run
// starts a multiple of the run, and 16-byte aligned base pointers.
template <typename scalar_t>
bool can_vectorize(const RopeProblem& p, int64_t n) {
  if (p.half % n != 0) return false;
  for (int k = 0; k < p.num_x; ++k) {
    const HeadsDesc& d = p.x[k];
    const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
    if (d.in_sd != 1 || d.out_sd != 1 || d.head_dim % n != 0) return false;
    if (!aligned(d.in, bytes) || !aligned(d.out, bytes)) return false;
    for (int64_t st : {d.in_sb, d.in_ss, d.in_sh, d.out_sb, d.out_ss, d.out_sh}) {
      if (st % n != 0) return false;
    }
  }
  return true;
}

template <typename scalar_t, typename table_t, int N>
void launch(const RopeProblem& p) {
  const int64_t tokens = p.batch * p.seq;
  const int64_t heads = p.x[0].heads + (p.num_x > 1 ? p.x[1].heads : 0);
  int64_t max_dim = p.x[0].head_dim;
  if (p.num_x > 1) max_dim = std::max(max_dim, p.x[1].head_dim);
  // Enough x-threads for the pairs (or the pass-through tail, if longer).
  const int64_t work_x = std::max<int64_t>({1, p.half / N, (max_dim - 2 * p.half + N - 1) / N});
  const int tx = static_cast<int>(std::min<int64_t>(work_x, 256));
  const int ty = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(heads, 256 / tx)));
  const int64_t grid = std::min<int64_t>(tokens, int64_t{1} << 30);
  rope_kernel<scalar_t, table_t, N><<<static_cast<unsigned>(grid), dim3(tx, ty), 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename table_t>
void launch_for_table(const RopeProblem& p) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (can_vectorize<scalar_t>(p, kVec)) {
    launch<scalar_t, table_t, kVec>(p);
  } else {
    launch<scalar_t, table_t, 1>(p);
  }
}

template <typename scalar_t>
void launch_for_x(const RopeProblem& p) {
  switch (p.table_dtype) {
    case at::kFloat:
      return launch_for_table<scalar_t, float>(p);
    case at::kDouble:
      return launch_for_table<scalar_t, double>(p);
    default:  // the table has x's dtype (the adapter admits nothing else)
      return launch_for_table<scalar_t, scalar_t>(p);
  }
}

void rope_cuda(const RopeProblem& p) {
  switch (p.x_dtype) {
    case at::kFloat:
      return launch_for_x<float>(p);
    case at::kDouble:
      return launch_for_x<double>(p);
    case at::kBFloat16:
      return launch_for_x<c10::BFloat16>(p);
    case at::kHalf:
      return launch_for_x<c10::Half>(p);
    default:
      TORCH_CHECK(false, "rope: unsupported x dtype ", p.x_dtype);
  }
}

// --- registration: the device guard here, the shared checks in rope_problem.cpp ---

at::Tensor apply_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  return apply(rope_cuda, x, cos, sin, positions, interleaved, inverse);
}

void apply_cuda_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  const c10::cuda::CUDAGuard guard(x.device());
  apply_(rope_cuda, x, cos, sin, positions, interleaved, inverse);
}

std::tuple<at::Tensor, at::Tensor> apply_qk_cuda(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 const std::optional<at::Tensor>& positions,
                                                 bool interleaved, bool inverse) {
  const c10::cuda::CUDAGuard guard(q.device());
  return apply_qk(rope_cuda, q, k, cos, sin, positions, interleaved, inverse);
}

void apply_qk_cuda_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                    bool interleaved, bool inverse) {
  const c10::cuda::CUDAGuard guard(q.device());
  apply_qk_(rope_cuda, q, k, cos, sin, positions, interleaved, inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(rope, CUDA, m) {
  m.impl("apply", &apply_cuda);
  m.impl("apply_", &apply_cuda_);
  m.impl("apply_qk", &apply_qk_cuda);
  m.impl("apply_qk_", &apply_qk_cuda_);
}

}  // namespace rope::cuda
