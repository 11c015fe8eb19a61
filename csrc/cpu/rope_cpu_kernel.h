// The CPU kernel, written once and compiled once per instruction set.
//
// rope_cpu_{default,avx2,avx512,avx512bf16}.cpp include this file, and setup.py compiles
// each with CPU_CAPABILITY set and the matching -m flags; without both,
// at::vec::Vectorized silently falls back to scalar code. The kernel sits in
// the namespace named by CPU_CAPABILITY (DEFAULT, AVX2, AVX512, AVX512_BF16), as ATen's own
// vector code does, so the four copies cannot collide at link time.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../rope_problem.h"
#include "rope_cpu.h"

namespace rope::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// The per-head loops are forced inline into their token loops (docs/kernels.md), except in
// the sanitizer build (-O0): forced inlining would only lengthen its compile (at -O1, 81 s
// instead of 45 s for one instruction set's file), and inlining changes no memory access.
#if defined(ROPE_EXT_SANITIZE_BUILD)
#define ROPE_HEAD_INLINE inline
#else
#define ROPE_HEAD_INLINE C10_ALWAYS_INLINE
#endif

template <typename scalar_t>
constexpr bool kReduced =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// float64 x is computed in float64, every other dtype in float32.
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

#if defined(CPU_CAPABILITY_AVX2)
// bf16 <-> float32 on AVX2, which has an instruction for neither. ATen's portable
// conversion takes 5 vector operations to widen 16 bf16 and 18 to round 16 floats;
// with two cores the bf16 kernel was bound by them, not by memory (docs/kernels.md).
using BF16Register = __m256i;  // 16 bf16

// A bf16 is the upper half of its float32. Each 128-bit lane of a broadcast load is
// shuffled so its bf16 land in the upper halves (a mask byte with its high bit set
// writes zero): one operation per 8 elements.
ROPE_HEAD_INLINE std::pair<Vectorized<float>, Vectorized<float>> widen_bf16(
    const c10::BFloat16* p) {
  const __m256i to_upper =
      _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,  //
                       -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
  const auto* q = reinterpret_cast<const __m128i*>(p);
  return {_mm256_castsi256_ps(
              _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(q)), to_upper)),
          _mm256_castsi256_ps(
              _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(q + 1)), to_upper))};
}

// Rounds 16 floats (lo: elements 0-7, hi: 8-15) to bf16 with the integer function
// ATen's conversion computes, (u + 0x7fff + bit 16 of u) >> 16, but on 16-bit halves:
// the upper half u_hi plus a carry out of the lower half u_lo, where
// carry = u_lo + 0x7fff + (u_hi & 1) >= 2**16 = (u_lo + 0x7ffe + (u_hi & 1) + 1) / 2 >= 2**15,
// and avg_epu16 computes that 17-bit sum halved. 12 operations instead of 18. ATen turns
// every NaN into 0xffff, which this sum would not: a block holding a NaN returns false
// and takes ATen's conversion (one comparison finds one in either vector).
ROPE_HEAD_INLINE bool narrow_bf16(__m256 lo, __m256 hi, __m256i& rounded) {
  if (_mm256_movemask_ps(_mm256_cmp_ps(lo, hi, _CMP_UNORD_Q)) != 0) return false;
  // Per 128-bit lane: the upper halves of its 4 floats, then their lower halves.
  const __m256i split = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13,  //
                                         2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13);
  const __m256i a =
      _mm256_shuffle_epi8(_mm256_castps_si256(lo), split);  // u_hi 0-3, u_lo 0-3 | 4-7
  const __m256i b = _mm256_shuffle_epi8(_mm256_castps_si256(hi), split);  // 8-11 | 12-15
  const __m256i upper = _mm256_unpacklo_epi64(a, b);  // elements 0-3, 8-11 | 4-7, 12-15
  const __m256i lower = _mm256_unpackhi_epi64(a, b);
  const __m256i bias =
      _mm256_or_si256(_mm256_and_si256(upper, _mm256_set1_epi16(1)), _mm256_set1_epi16(0x7ffe));
  const __m256i carry = _mm256_srli_epi16(_mm256_avg_epu16(lower, bias), 15);
  // Without NaN, upper <= 0xff80 (-inf): adding the carry cannot wrap.
  rounded = _mm256_permute4x64_epi64(_mm256_add_epi16(upper, carry), 0xd8);  // 0-3, 4-7 | 8-15
  return true;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
using BF16Register = __m512i;  // 32 bf16

// 32 bf16 widened to float32 (lo: elements 0-15, hi: 16-31): a 16-bit permutation puts
// each bf16 in the upper half of its 32-bit lane and zeroes the lower halves (mask),
// one operation per 16 elements where ATen's takes an extract, a zero-extension and a shift.
ROPE_HEAD_INLINE std::pair<Vectorized<float>, Vectorized<float>> widen_bf16(
    const c10::BFloat16* p) {
  const __m512i v = _mm512_loadu_si512(p);
  const __mmask32 upper_halves = 0xAAAAAAAA;
  const __m512i lo_index = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7,
                                            0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
  const __m512i hi_index = _mm512_add_epi16(lo_index, _mm512_set1_epi16(16));
  return {_mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(upper_halves, lo_index, v)),
          _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(upper_halves, hi_index, v))};
}

// The same rounding as AVX2's narrow_bf16 on 32 floats (lo: elements 0-15, hi: 16-31), for
// the AVX-512 variant and the AVX-512-BF16 variant's blocks with a zero result (Block::narrow):
// 10 operations where ATen's AVX-512 conversion takes 16.
ROPE_HEAD_INLINE bool narrow_bf16(__m512 lo, __m512 hi, __m512i& rounded) {
  if (_mm512_cmp_ps_mask(lo, hi, _CMP_UNORD_Q) != 0) return false;
  const __m512i split =
      _mm512_broadcast_i32x4(_mm_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13));
  const __m512i a = _mm512_shuffle_epi8(_mm512_castps_si512(lo), split);
  const __m512i b = _mm512_shuffle_epi8(_mm512_castps_si512(hi), split);
  // 64-bit word 2j: elements 4j..4j+3; word 2j+1: elements 16+4j..16+4j+3.
  const __m512i upper = _mm512_unpacklo_epi64(a, b);
  const __m512i lower = _mm512_unpackhi_epi64(a, b);
  // (upper & 1) | 0x7ffe in one operation (truth table 0xEA: A & B | C).
  const __m512i bias =
      _mm512_ternarylogic_epi32(upper, _mm512_set1_epi16(1), _mm512_set1_epi16(0x7ffe), 0xEA);
  const __m512i carry = _mm512_srli_epi16(_mm512_avg_epu16(lower, bias), 15);
  rounded = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7),
                                     _mm512_add_epi16(upper, carry));
  return true;
}
#endif

// n elements of T starting on a 64-byte boundary (a cache line, an AVX-512 vector), on
// the stack up to kInline elements. A vector load from a buffer at an arbitrary address
// may straddle two cache lines, and where the stack falls moves from process to process
// (with the environment's size): the fused forward's time in cache moved with it, by 15-30%.
template <typename T, unsigned kInline>
class LineAlignedBuffer {
 public:
  // Zero-filled: SmallVector(size) value-initializes every element.
  explicit LineAlignedBuffer(int64_t n) : storage_(n + kPad) {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    data_ = reinterpret_cast<T*>((address + 63) & ~uintptr_t{63});
  }
  LineAlignedBuffer(const LineAlignedBuffer&) = delete;  // data_ points into storage_
  LineAlignedBuffer& operator=(const LineAlignedBuffer&) = delete;
  T* data() { return data_; }
  T& operator[](int64_t i) { return data_[i]; }

 private:
  static constexpr int64_t kPad = 64 / sizeof(T);
  c10::SmallVector<T, kInline + kPad> storage_;
  T* data_;
};

// The vector loops work in blocks of two opmath vectors (2W elements of x):
// that is one Vectorized<bf16/fp16> widened to two float vectors, and the two
// halves that deinterleave2 needs for adjacent pairs.
template <typename scalar_t>
struct Block {
  using V = Vectorized<opmath_t<scalar_t>>;
  static constexpr int64_t W = V::size();
  static constexpr int64_t kSize = 2 * W;

  // load, narrow and store are forced inline, as put is below: left to itself, GCC called
  // narrow out of line from the AVX2 kernel's unrolled fixed-size loops (the bf16 rotation
  // of Llama-3-8B q/k at s = 4096, 2 threads: 3.26-3.40 ms, against 2.61-3.06 before the
  // fixed sizes and 2.14-2.65 with narrow inlined; docs/kernels.md).

  // Loads n <= kSize elements; lanes past n are zero.
  ROPE_HEAD_INLINE static void load(const scalar_t* p, int64_t n, V& lo, V& hi) {
    if constexpr (kReduced<scalar_t>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (n == kSize) {
          std::tie(lo, hi) = widen_bf16(p);
          return;
        }
      }
#endif
      static_assert(Vectorized<scalar_t>::size() == kSize);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n));
    } else {
      lo = V::loadu(p, std::min(n, W));
      hi = n > W ? V::loadu(p + W, n - W) : V(0);
    }
  }

  // Two float vectors rounded (to nearest even) into one of bf16/fp16.
  ROPE_HEAD_INLINE static Vectorized<scalar_t> narrow(const V& lo, const V& hi) {
#if defined(ROPE_NATIVE_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // One instruction where ATen's portable rounding takes a dozen: with two cores
      // the bf16 kernel is otherwise bound by this arithmetic, not by memory. But the
      // instruction flushes subnormal inputs (0 < |x| < 2**-126) to zero where ATen
      // rounds them, so it can differ from ATen only where it gives +-0: a block with a
      // zero among its 32 results (rare, but zero inputs and padding lanes give one)
      // takes the integer rounding below, and the result equals ATen's bit for bit
      // (tests/test_narrowing.py sweeps every float32). Testing the results costs one
      // instruction where classifying the inputs took two.
      const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
      const __mmask32 zero = _mm512_testn_epi16_mask(rounded, _mm512_set1_epi16(0x7fff));
      if (_kortestz_mask32_u8(zero, zero)) {
        return Vectorized<scalar_t>(rounded);
      }
    }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      BF16Register rounded;
      if (narrow_bf16(lo, hi, rounded)) return Vectorized<scalar_t>(rounded);
    }
#endif
    return at::vec::convert_from_float<scalar_t>(lo, hi);
  }

  ROPE_HEAD_INLINE static void store(scalar_t* p, int64_t n, const V& lo, const V& hi) {
    if constexpr (kReduced<scalar_t>) {
      narrow(lo, hi).store(p, static_cast<int>(n));
    } else {
      lo.store(p, static_cast<int>(std::min(n, W)));
      if (n > W) hi.store(p + W, static_cast<int>(n - W));
    }
  }

  // A store that bypasses the cache (when kStream), for outputs too large to stay
  // in it: a plain store must first read each line it writes, a third memory
  // stream beside x and y. Only whole blocks at vector-aligned addresses stream.
  // Forced inline: GCC 12 left it out of line in the fused kernel's fp16 instantiation,
  // and then warned of ATen's fp16 rounding (an intrinsic's placeholder, -Wuninitialized).
  template <bool kStream>
  ROPE_HEAD_INLINE static void put(scalar_t* p, int64_t n, const V& lo, const V& hi) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (kStream) {
      if (n == kSize && reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0) {
        if constexpr (kReduced<scalar_t>) {
          stream_one(p, narrow(lo, hi));
        } else {
          stream_one(p, lo);
          stream_one(p + W, hi);
        }
        return;
      }
    }
#endif
    store(p, n, lo, hi);
  }

 private:
#if defined(CPU_CAPABILITY_AVX512)
  static void stream_one(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
  static void stream_one(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
  static void stream_one(void* p, __m512d v) { _mm512_stream_pd(static_cast<double*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
  static void stream_one(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
  static void stream_one(void* p, __m256 v) { _mm256_stream_ps(static_cast<float*>(p), v); }
  static void stream_one(void* p, __m256d v) { _mm256_stream_pd(static_cast<double*>(p), v); }
#endif
};

// Orders streamed stores before anything the caller does next.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Pairs (x[i], x[i + pairs]) of one head, head_dim at unit stride. c and s hold
// the token's table row padded with zeros to a multiple of kSize, so the table
// loads of a last partial block stay inside the buffer.
//
// in_t and out_t may differ (bf16 in, float out, or the reverse: the fused norm kernel
// rotates from and into a buffer in the math type); their math types are the same.
template <bool kStream, typename in_t, typename out_t>
ROPE_HEAD_INLINE void rotate_head_half_split(const in_t* x, out_t* y, const opmath_t<out_t>* c,
                                             const opmath_t<out_t>* s, int64_t pairs) {
  static_assert(std::is_same_v<opmath_t<in_t>, opmath_t<out_t>>);
  using In = Block<in_t>;
  using Out = Block<out_t>;
  using V = typename Out::V;
  for (int64_t i = 0; i < pairs; i += Out::kSize) {
    const int64_t n = std::min(Out::kSize, pairs - i);
    V a0, a1, b0, b1;
    In::load(x + i, n, a0, a1);
    In::load(x + pairs + i, n, b0, b1);
    rotate_pair(a0, b0, V::loadu(c + i), V::loadu(s + i));
    rotate_pair(a1, b1, V::loadu(c + i + Out::W), V::loadu(s + i + Out::W));
    Out::template put<kStream>(y + i, n, a0, a1);
    Out::template put<kStream>(y + pairs + i, n, b0, b1);
  }
}

// Pairs (x[2i], x[2i + 1]): a block of 2W elements holds W pairs, split into
// even and odd lanes, rotated, and merged back.
template <bool kStream, typename in_t, typename out_t>
ROPE_HEAD_INLINE void rotate_head_interleaved(const in_t* x, out_t* y, const opmath_t<out_t>* c,
                                              const opmath_t<out_t>* s, int64_t pairs) {
  static_assert(std::is_same_v<opmath_t<in_t>, opmath_t<out_t>>);
  using In = Block<in_t>;
  using Out = Block<out_t>;
  using V = typename Out::V;
  const int64_t r = 2 * pairs;
  for (int64_t e = 0; e < r; e += Out::kSize) {
    const int64_t n = std::min(Out::kSize, r - e);
    V lo, hi;
    In::load(x + e, n, lo, hi);
    auto [a, b] = at::vec::deinterleave2(lo, hi);
    rotate_pair(a, b, V::loadu(c + e / 2), V::loadu(s + e / 2));
    std::tie(lo, hi) = at::vec::interleave2(a, b);
    Out::template put<kStream>(y + e, n, lo, hi);
  }
}

// Any strides: the shared chunk math with one pair per chunk, as the CUDA
// kernel's scalar path runs it.
template <typename in_t, typename out_t>
void rotate_head_strided(const in_t* x, int64_t x_stride, out_t* y, int64_t y_stride,
                         const opmath_t<out_t>* c, const opmath_t<out_t>* s, int64_t pairs,
                         bool interleaved) {
  using T = opmath_t<out_t>;
  for (int64_t i = 0; i < pairs; ++i) {
    int64_t lo_off, hi_off;
    chunk_offsets(i, 1, pairs, interleaved, lo_off, hi_off);
    T lo[1] = {static_cast<T>(x[lo_off * x_stride])};
    T hi[1] = {static_cast<T>(x[hi_off * x_stride])};
    const T cc[1] = {c[i]}, ss[1] = {s[i]};
    rotate_chunk(lo, hi, cc, ss, interleaved);
    y[lo_off * y_stride] = static_cast<out_t>(lo[0]);
    y[hi_off * y_stride] = static_cast<out_t>(hi[0]);
  }
}

// x[r:] of the functional op: copied, since the output is a fresh tensor.
template <typename scalar_t>
void copy_tail(const scalar_t* x, int64_t x_stride, scalar_t* y, int64_t y_stride, int64_t from,
               int64_t to) {
  if (from >= to) return;  // full rotary: no call to memcpy for zero bytes, per head
  if (x_stride == 1 && y_stride == 1) {
    std::memcpy(y + from, x + from, (to - from) * sizeof(scalar_t));
    return;
  }
  for (int64_t d = from; d < to; ++d) y[d * y_stride] = x[d * x_stride];
}

// One token's table row in the math type, reused by every head of q and k.
// A float table (double for double x) at unit stride is read where it lies when
// no padding is needed; otherwise the row is converted into c_buf / s_buf once,
// with sin negated for the inverse instead of in the inner loop.
template <typename scalar_t, typename table_t>
std::pair<const opmath_t<scalar_t>*, const opmath_t<scalar_t>*> table_row(
    const RopeProblem& p, int64_t b, int64_t s, opmath_t<scalar_t>* c_buf,
    opmath_t<scalar_t>* s_buf) {
  using T = opmath_t<scalar_t>;
  const TableIndex& t = p.table;
  const int64_t pos = token_position(t, b, s);
  if (t.inv_freq != nullptr && pos >= t.rows) {
    // Past the table (checked < 2**31): the row cos_sin_table would hold, rounded to
    // the table's dtype as the table's own rows are.
    const T sign = p.inverse ? T(-1) : T(1);
    for (int64_t i = 0; i < p.pairs; ++i) {
      double c, sn;
      computed_row_value(t, pos, i, c, sn);
      c_buf[i] = static_cast<T>(static_cast<table_t>(c));
      s_buf[i] = sign * static_cast<T>(static_cast<table_t>(sn));
    }
    return {c_buf, s_buf};
  }
  const table_t* cp = static_cast<const table_t*>(p.cos) + cos_offset(t, b, s, pos);
  const table_t* sp = static_cast<const table_t*>(p.sin) + sin_offset(t, b, s, pos);
  if constexpr (std::is_same_v<table_t, T>) {
    if (!p.inverse && t.cos_stride_pair == 1 && t.sin_stride_pair == 1 &&
        p.pairs % Block<scalar_t>::kSize == 0) {
      return {cp, sp};
    }
  }
  const T sign = p.inverse ? T(-1) : T(1);
  for (int64_t i = 0; i < p.pairs; ++i) {
    c_buf[i] = static_cast<T>(cp[i * t.cos_stride_pair]);
    s_buf[i] = sign * static_cast<T>(sp[i * t.sin_stride_pair]);
  }
  return {c_buf, s_buf};
}

// A size known at compile time, passed where the kernels take an int64_t size: once the
// per-head functions are inlined, their loops over it unroll into whole vector blocks, with
// no partial-block tests, masks or loop counters. At run-time sizes those took more
// instructions than the arithmetic (docs/kernels.md, "Fixed head sizes").
template <int64_t N>
using Size = std::integral_constant<int64_t, N>;

// The heads of one token's row of q or k at unit strides; pairs an int64_t or a Size.
template <bool kStream, typename scalar_t, typename Pairs>
ROPE_HEAD_INLINE void rotate_row_unit(const HeadsDesc& h, bool interleaved, const scalar_t* xin,
                                      scalar_t* xout, const opmath_t<scalar_t>* c,
                                      const opmath_t<scalar_t>* sn, Pairs pairs) {
  const bool copy = h.in != h.out && h.head_dim > 2 * pairs;
  for (int64_t head = 0; head < h.heads; ++head) {
    const scalar_t* xi = xin + head * h.in_stride_head;
    scalar_t* yo = xout + head * h.out_stride_head;
    if (interleaved) {
      rotate_head_interleaved<kStream>(xi, yo, c, sn, pairs);
    } else {
      rotate_head_half_split<kStream>(xi, yo, c, sn, pairs);
    }
    if (copy) copy_tail(xi, 1, yo, 1, 2 * pairs, h.head_dim);
  }
}

// Calls f(pairs) with pairs a compile-time constant (Size) where it is one of the sizes
// models use (head_dim 64, 128, 256 fully rotated; 64 and 128 also half-rotated), else as it
// is. kSizes = false (float64, float64 tables: checking, not speed) compiles the plain call only.
template <bool kSizes, typename F>
ROPE_HEAD_INLINE void with_pairs(int64_t pairs, F&& f) {
  if constexpr (kSizes) {
    switch (pairs) {
      case 32:
        return f(Size<32>{});
      case 64:
        return f(Size<64>{});
      case 128:
        return f(Size<128>{});
    }
  }
  f(pairs);
}

// 2 * n, a compile-time constant where n is one.
inline int64_t twice(int64_t n) { return 2 * n; }
template <int64_t N>
Size<2 * N> twice(Size<N>) {
  return {};
}

// Calls f(pairs, head_dim): both compile-time constants where the head is fully rotated and
// its size is one of with_pairs', else as they are.
template <bool kSizes, typename F>
ROPE_HEAD_INLINE void with_head_sizes(int64_t pairs, int64_t head_dim, F&& f) {
  if (head_dim != 2 * pairs) return f(pairs, head_dim);
  with_pairs<kSizes>(pairs, [&](auto fixed_pairs) { f(fixed_pairs, twice(fixed_pairs)); });
}

// The length of a table row buffer (c_buf, s_buf): pairs rounded up to whole vector blocks,
// as a head's loop loads the table a block at a time.
template <typename scalar_t>
int64_t padded_pairs(int64_t pairs) {
  constexpr int64_t kSize = Block<scalar_t>::kSize;
  return (pairs + kSize - 1) / kSize * kSize;
}

// Whether a kernel instantiation compiles the fixed head sizes of with_pairs.
template <typename scalar_t, typename table_t>
constexpr bool kFixedSizes = !std::is_same_v<scalar_t, double> && !std::is_same_v<table_t, double>;

// Tokens [begin, end): every head of q (and k) of each token, with its table row.
template <bool kStream, typename scalar_t, typename table_t>
void rope_cpu_tokens(const RopeProblem& p, int64_t begin, int64_t end, opmath_t<scalar_t>* c_buf,
                     opmath_t<scalar_t>* s_buf) {
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / p.seq, s = tok % p.seq;
    const auto [c, sn] = table_row<scalar_t, table_t>(p, b, s, c_buf, s_buf);
    for (int k = 0; k < p.num_x; ++k) {
      const HeadsDesc& h = p.x[k];
      const scalar_t* xin =
          static_cast<const scalar_t*>(h.in) + b * h.in_stride_batch + s * h.in_stride_seq;
      scalar_t* xout =
          static_cast<scalar_t*>(h.out) + b * h.out_stride_batch + s * h.out_stride_seq;
      if (h.in_stride_dim == 1 && h.out_stride_dim == 1) {
        with_pairs<kFixedSizes<scalar_t, table_t>>(p.pairs, [&](auto pairs) {
          rotate_row_unit<kStream>(h, p.interleaved, xin, xout, c, sn, pairs);
        });
        continue;
      }
      const bool in_place = h.in == h.out;
      for (int64_t head = 0; head < h.heads; ++head) {
        const scalar_t* xi = xin + head * h.in_stride_head;
        scalar_t* yo = xout + head * h.out_stride_head;
        rotate_head_strided(xi, h.in_stride_dim, yo, h.out_stride_dim, c, sn, p.pairs,
                            p.interleaved);
        if (!in_place)
          copy_tail(xi, h.in_stride_dim, yo, h.out_stride_dim, 2 * p.pairs, h.head_dim);
      }
    }
  }
  if constexpr (kStream) stream_fence();
}

// Outputs at least this large are written around the cache: they would not stay
// in it anyway, and the functional op's output is fresh memory nobody has read.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

template <typename scalar_t, typename table_t>
void rope_cpu_typed(const RopeProblem& p) {
  using T = opmath_t<scalar_t>;
  const int64_t tokens = p.batch * p.seq;
  int64_t work_per_token = 1;
  bool in_place = false;
  for (int k = 0; k < p.num_x; ++k) {
    work_per_token += p.x[k].heads * p.x[k].head_dim;
    in_place = in_place || p.x[k].in == p.x[k].out;
  }
  const bool stream =
      !in_place && tokens * work_per_token * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  // Enough elements per task that the thread hand-off is paid for.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / work_per_token);
  const int64_t padded = padded_pairs<scalar_t>(p.pairs);

  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    // On the stack for every head size models use (a heap allocation costs a decode step).
    LineAlignedBuffer<T, 256> c_buf(padded), s_buf(padded);
    if (stream) {
      rope_cpu_tokens<true, scalar_t, table_t>(p, begin, end, c_buf.data(), s_buf.data());
    } else {
      rope_cpu_tokens<false, scalar_t, table_t>(p, begin, end, c_buf.data(), s_buf.data());
    }
  });
}

// The adapter admits a float32, float64 or x-dtype table, so only those are built.
template <typename scalar_t>
void rope_cpu_for_x(const RopeProblem& p) {
  switch (p.table_dtype) {
    case c10::ScalarType::Float:
      return rope_cpu_typed<scalar_t, float>(p);
    case c10::ScalarType::Double:
      return rope_cpu_typed<scalar_t, double>(p);
    default:
      if constexpr (kReduced<scalar_t>) {
        TORCH_CHECK(p.table_dtype == c10::CppTypeToScalarType<scalar_t>::value,
                    "rope: unsupported table dtype ", p.table_dtype);
        return rope_cpu_typed<scalar_t, scalar_t>(p);
      }
      TORCH_CHECK(false, "rope: unsupported table dtype ", p.table_dtype);
  }
}

// Rounds n float32 values to bf16 or fp16 exactly as this kernel's stores do, for the
// test that compares the rounding with ATen's over every float32 bit pattern.
template <typename scalar_t>
void narrow_as_stored(const float* in, scalar_t* out, int64_t n) {
  using B = Block<scalar_t>;
  using V = typename B::V;
  for (int64_t i = 0; i < n; i += B::kSize) {
    const int64_t m = std::min(B::kSize, n - i);
    const V lo = V::loadu(in + i, static_cast<int>(std::min(m, B::W)));
    const V hi = m > B::W ? V::loadu(in + i + B::W, static_cast<int>(m - B::W)) : V(0);
    B::store(out + i, m, lo, hi);
  }
}

void narrow_float(const float* in, void* out, c10::ScalarType dtype, int64_t n) {
  if (dtype == c10::ScalarType::BFloat16) {
    narrow_as_stored(in, static_cast<c10::BFloat16*>(out), n);
  } else {
    narrow_as_stored(in, static_cast<c10::Half*>(out), n);
  }
}

void rope_cpu_kernel(const RopeProblem& p) {
  switch (p.x_dtype) {
    case c10::ScalarType::Float:
      return rope_cpu_for_x<float>(p);
    case c10::ScalarType::Double:
      return rope_cpu_for_x<double>(p);
    case c10::ScalarType::BFloat16:
      return rope_cpu_for_x<c10::BFloat16>(p);
    case c10::ScalarType::Half:
      return rope_cpu_for_x<c10::Half>(p);
    default:
      TORCH_CHECK(false, "rope: unsupported x dtype ", p.x_dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace rope::cpu
