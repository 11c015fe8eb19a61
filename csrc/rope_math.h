// The index and rotation math of RoPE, shared by the CPU and the CUDA kernel.
//
// Everything here is plain C++ on raw integers and numbers so that nvcc and the
// host compiler see the same code; the CPU tests therefore exercise the exact
// arithmetic the GPU runs. The rotation is also instantiated with
// at::vec::Vectorized<float> on the CPU, which overloads the same operators.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define ROPE_HD __host__ __device__ __forceinline__
#define ROPE_UNROLL _Pragma("unroll")
#else
#define ROPE_UNROLL
// Always inlined: the CPU kernel is compiled once per instruction set, and an
// out-of-line copy built with AVX-512 must never be the one the linker keeps.
#define ROPE_HD inline __attribute__((always_inline))
#endif

namespace rope {

// Where the table row of token (b, s) starts, for cos and for sin.
//
// One formula covers every table form of the contract:
//   positions given, table [P, r/2]:  offset = pos * stride_row  (stride_batch = stride_seq = 0)
//   no positions, table [P >= seq, r/2]:  offset = s * stride_seq  (row s = position s)
//   no positions, table [batch | 1, seq, r/2]:  offset = b * stride_batch + s * stride_seq
//                                          (stride_batch = 0 broadcasts one batch row)
// All strides are in elements and 64-bit, so tables and tensors past 2**31
// elements index correctly.
struct TableIndex {
  const int32_t* pos32 = nullptr;  // at most one of pos32 / pos64 is set
  const int64_t* pos64 = nullptr;
  int64_t pos_stride_batch = 0,
          pos_stride_seq = 0;  // positions [batch, seq] strides; pos_stride_batch = 0 for [seq]
  int64_t cos_stride_batch = 0, cos_stride_seq = 0, cos_stride_row = 0, cos_stride_pair = 1;
  int64_t sin_stride_batch = 0, sin_stride_seq = 0, sin_stride_row = 0, sin_stride_pair = 1;
  int64_t rows = 0;  // table rows P (positions must lie in [0, P))
  // Set (with positions): a position in [P, 2**31) gets the row cos_sin_table would
  // hold, A cos(pos theta_i) and A sin(pos theta_i) in float64, computed in the kernel.
  const double* inv_freq = nullptr;
  double attention = 1.0;
};

// Positions past the table are computed only below this bound (API: any position < 2**31).
constexpr int64_t kMaxComputedPosition = int64_t{1} << 31;

// The table value for position pos and pair i, as cos_sin_table makes it: the angle and
// its cos/sin in float64, times A, rounded once to the table's dtype by the caller.
ROPE_HD void computed_row_value(const TableIndex& t, int64_t pos, int64_t i, double& c, double& s) {
  const double angle = static_cast<double>(pos) * t.inv_freq[i];
  c = t.attention * cos(angle);
  s = t.attention * sin(angle);
}

ROPE_HD int64_t token_position(const TableIndex& t, int64_t b, int64_t s) {
  const int64_t off = b * t.pos_stride_batch + s * t.pos_stride_seq;
  if (t.pos64 != nullptr) return t.pos64[off];
  if (t.pos32 != nullptr) return static_cast<int64_t>(t.pos32[off]);
  return 0;
}

ROPE_HD int64_t cos_offset(const TableIndex& t, int64_t b, int64_t s, int64_t pos) {
  return b * t.cos_stride_batch + s * t.cos_stride_seq + pos * t.cos_stride_row;
}

ROPE_HD int64_t sin_offset(const TableIndex& t, int64_t b, int64_t s, int64_t pos) {
  return b * t.sin_stride_batch + s * t.sin_stride_seq + pos * t.sin_stride_row;
}

// Where the n pairs [i0, i0 + n) of a head live: two runs of n slots each,
// `lo` at offset lo_off and `hi` at hi_off (in units of head_dim elements).
//   half-split  (HF Llama, GPT-NeoX): lo = x[i0 .. i0+n),   hi = x[pairs+i0 .. pairs+i0+n);
//                                     pair j is (lo[j], hi[j]).
//   interleaved (RoFormer, GPT-J):    lo = x[2i0 .. 2i0+n), hi = x[2i0+n .. 2i0+2n);
//                                     pair j is slots (2j, 2j+1) of lo ++ hi.
// The CUDA kernel moves each run with one 16-byte load; n = 1 is the scalar case.
ROPE_HD void chunk_offsets(int64_t i0, int64_t n, int64_t pairs, bool interleaved, int64_t& lo_off,
                           int64_t& hi_off) {
  lo_off = interleaved ? 2 * i0 : i0;
  hi_off = interleaved ? 2 * i0 + n : pairs + i0;
}

// (a, b) <- (a cos - b sin, a sin + b cos): the complex product (a + ib) e^{i phi}.
// The inverse (and the backward) is the same call with sin negated, which the
// kernels do once per table row, not per element.
template <typename T>
ROPE_HD void rotate_pair(T& a, T& b, const T& c, const T& s) {
  const T ra = a * c - b * s;
  const T rb = a * s + b * c;
  a = ra;
  b = rb;
}

// Rotates the n pairs held in lo and hi (laid out as chunk_offsets says) by
// the angles whose cos and sin are c[j] and s[j].
template <int N, typename T>
ROPE_HD void rotate_chunk(T (&lo)[N], T (&hi)[N], const T (&c)[N], const T (&s)[N],
                          bool interleaved) {
  if (!interleaved) {
    ROPE_UNROLL
    for (int j = 0; j < N; ++j) rotate_pair(lo[j], hi[j], c[j], s[j]);
    return;
  }
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) {
    // Slots 2j and 2j+1 of lo ++ hi; both fall in the same run since N is 1 or even.
    T& a = 2 * j < N ? lo[2 * j] : hi[2 * j - N];
    T& b = 2 * j + 1 < N ? lo[2 * j + 1] : hi[2 * j + 1 - N];
    rotate_pair(a, b, c[j], s[j]);
  }
}

// 1 / sqrt(mean + eps) for the RMSNorm of the fused QK-norm + RoPE, from the sum of
// squares of `count` elements. A correctly rounded sqrt and division on both sides
// (nvcc's defaults without --use_fast_math), so the host executor matches the GPU.
ROPE_HD float inverse_rms(float sum_squares, int64_t count, double eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(count) + static_cast<float>(eps));
}
ROPE_HD double inverse_rms(double sum_squares, int64_t count, double eps) {
  return 1.0 / sqrt(sum_squares / static_cast<double>(count) + eps);
}

}  // namespace rope
