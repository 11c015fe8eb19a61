// The CPU kernel of the fused QK-RMSNorm + RoPE, forward and backward, compiled once
// per instruction set with the rotation kernel (rope_cpu_kernel.h), whose vector
// blocks, table rows and head rotations it reuses.
//
// Forward, per token and per tensor (q, then k): every head is read once into a buffer
// in the math type, its sum of squares taken (per head, or over all heads with
// across_heads), scaled by rstd * (weight + offset), and rotated from the buffer into
// the output: one read and one write of q and k.
//
// Backward, per token: u = R^T grad (the rotation's inverse), n = x * rstd,
// dn = u * scale, grad_x = rstd * (dn - n * mean(dn * n)), and u * n summed into the
// scale's gradient. The tokens are cut into fixed groups (NormRopeProblem::groups),
// each summed in token order into its own row of partial sums, and the rows are added
// in group order: the same bits for any thread count.
#pragma once

#include "rope_cpu_kernel.h"

namespace rope::cpu {
namespace CPU_CAPABILITY {

// n elements of x (x_stride apart) into y (y_stride apart), converted; one of the two types
// is the other's math type, and a narrowing rounds as the rotation's stores round.
template <typename from_t, typename to_t>
void convert_row(const from_t* x, int64_t x_stride, to_t* y, int64_t y_stride, int64_t n) {
  if (x_stride != 1 || y_stride != 1) {
    for (int64_t d = 0; d < n; ++d) y[d * y_stride] = static_cast<to_t>(x[d * x_stride]);
    return;
  }
  using In = Block<from_t>;
  using Out = Block<to_t>;
  static_assert(In::kSize == Out::kSize);
  for (int64_t d = 0; d < n; d += In::kSize) {
    const int64_t m = std::min(In::kSize, n - d);
    typename In::V lo, hi;
    In::load(x + d, m, lo, hi);
    Out::store(y + d, m, lo, hi);
  }
}

// y[i] = a[i] * s * w[i]
template <typename T>
void scale_row(T* y, const T* a, T s, const T* w, int64_t n) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(a + i) * vs * V::loadu(w + i)).store(y + i);
  for (; i < n; ++i) y[i] = a[i] * s * w[i];
}

// The rows of one tensor of one token into buf ([heads][head_dim], the math type).
template <typename scalar_t>
void load_heads(const scalar_t* x, int64_t stride_head, int64_t stride_dim, int64_t heads,
                int64_t head_dim, opmath_t<scalar_t>* buf) {
  for (int64_t h = 0; h < heads; ++h) {
    convert_row(x + h * stride_head, stride_dim, buf + h * head_dim, 1, head_dim);
  }
}

// The sums of squares of a unit-stride row of n elements, lane by lane (the horizontal sum
// of the result is the norm's statistic).
template <typename scalar_t>
ROPE_HEAD_INLINE Vectorized<opmath_t<scalar_t>> squares_lanes(const scalar_t* x, int64_t n) {
  using T = opmath_t<scalar_t>;
#if defined(ROPE_NATIVE_BF16)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // One instruction per 32 elements: bf16 products are exact in float32, summed in
    // float32 (subnormal squares, below 2**-126, count as zero: they cannot move an rms).
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 32) {
      const int64_t m = std::min<int64_t>(32, n - d);
      const __mmask32 lanes = m == 32 ? ~__mmask32{0} : (__mmask32{1} << m) - 1;
      const __m512i v = _mm512_maskz_loadu_epi16(lanes, x + d);
      acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(v), reinterpret_cast<__m512bh>(v));
    }
    return acc;
  }
#endif
  using In = Block<scalar_t>;
  using V = typename In::V;
  V acc(T(0));
  for (int64_t d = 0; d < n; d += In::kSize) {
    V lo, hi;
    In::load(x + d, std::min(In::kSize, n - d), lo, hi);  // lanes past n are zero
    acc = acc + lo * lo + hi * hi;
  }
  return acc;
}

// The sum of squares of n elements of x, stride apart (the norm's statistic).
template <typename scalar_t>
ROPE_HEAD_INLINE opmath_t<scalar_t> sum_squares(const scalar_t* x, int64_t stride, int64_t n) {
  using T = opmath_t<scalar_t>;
  if (stride != 1) {
    T sum = T(0);
    for (int64_t d = 0; d < n; ++d)
      sum += static_cast<T>(x[d * stride]) * static_cast<T>(x[d * stride]);
    return sum;
  }
  using V = Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return a + b; },
                                    squares_lanes(x, n));
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane j: the sum of v[j]'s 16 lanes, for 16 vectors at once (46 operations where 16
// horizontal sums take about 130). The lanes are added in the tree vec_reduce_all and
// _mm512_reduce_add_ps use (lane i + lane i+8, then i+4, i+2, i+1): the same bits as 16
// sum_squares.
ROPE_HEAD_INLINE __m512 sums_of_16(const __m512 (&v)[16]) {
  // 16 -> 8: chunks (128 bits) 0+2 and 1+3 of v[2j] and v[2j+1].
  __m512 a[8];
  for (int j = 0; j < 8; ++j) {
    a[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  }
  // 8 -> 4: chunk k of b[j] holds vector 4j + k's four partial sums.
  __m512 b[4];
  for (int j = 0; j < 4; ++j) {
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
  }
  // Within each chunk: lanes i + i^2, then i + i^1.
  const __m512 c0 =
      _mm512_add_ps(_mm512_shuffle_ps(b[0], b[1], 0x44), _mm512_shuffle_ps(b[0], b[1], 0xEE));
  const __m512 c1 =
      _mm512_add_ps(_mm512_shuffle_ps(b[2], b[3], 0x44), _mm512_shuffle_ps(b[2], b[3], 0xEE));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c0, c1, 0x88), _mm512_shuffle_ps(c0, c1, 0xDD));
  // Lane 4k + m of d holds vector 4m + k: vector j goes to lane j.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}
#endif

// squares[head] = sum_squares of each head of one token's row (h.heads heads of head_dim,
// h.in_stride_head apart, elements stride_dim apart). On AVX-512 at unit stride sixteen
// heads at a time share one transposing sum (sums_of_16, the same bits): the fused forward
// in cache (bf16 Qwen3-8B shapes, s = 256, one thread) 0.166-0.175 -> 0.159-0.162 ms; the
// heads past the last 16 one at a time.
template <typename scalar_t, typename Dim>
ROPE_HEAD_INLINE void heads_sum_squares(const HeadsDesc& h, const scalar_t* in, int64_t stride_dim,
                                        Dim head_dim, opmath_t<scalar_t>* squares) {
  int64_t head = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<opmath_t<scalar_t>, float>) {
    for (; stride_dim == 1 && head + 16 <= h.heads; head += 16) {
      __m512 lanes[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        lanes[j] = squares_lanes(in + (head + j) * h.in_stride_head, head_dim);
      }
      _mm512_storeu_ps(squares + head, sums_of_16(lanes));
    }
  }
#endif
  for (; head < h.heads; ++head) {
    squares[head] = sum_squares(in + head * h.in_stride_head, stride_dim, head_dim);
  }
}

// r[h] = inverse_rms(squares[h], count, eps) for h < n, a vector at a time (a division and
// a square root per head would otherwise stall the loop over a token's heads).
template <typename T>
void inverse_rms_all(const T* squares, int64_t n, int64_t count, double eps, T* r) {
  using V = Vectorized<T>;
  const V e(static_cast<T>(eps)), one(T(1));
  int64_t h = 0;
  for (; h + V::size() <= n; h += V::size()) {
    // As inverse_rms: a division by count (a product by 1/count may round differently).
    const V mean = V::loadu(squares + h) / V(static_cast<T>(count));
    (one / (mean + e).sqrt()).store(r + h);
  }
  for (; h < n; ++h) r[h] = inverse_rms(squares[h], count, eps);
}

// One head of x (unit stride; x's dtype or the math type), times r * w, rotated into y
// (unit stride); x[r:] stored scaled but unrotated. The scaling rides on the rotation's
// loads, and the stores bypass the cache when kStream (as the rotation's do). With
// kByR = false, r is not applied: the caller has folded it into c and s (fold_rstd), so the
// head must be fully rotated (head_dim = 2 * pairs: no tail to scale by r).
template <bool kStream, bool kByR = true, typename src_t, typename scalar_t>
ROPE_HEAD_INLINE void scale_rotate_head(bool interleaved, const src_t* x, scalar_t* y,
                                        int64_t pairs, int64_t head_dim,
                                        const opmath_t<scalar_t>* c, const opmath_t<scalar_t>* s,
                                        opmath_t<scalar_t> r, const opmath_t<scalar_t>* w) {
  using T = opmath_t<scalar_t>;
  using In = Block<src_t>;
  using Weights = Block<T>;
  using Out = Block<scalar_t>;
  using V = typename Out::V;
  const V vr(r);
  // Elements [e, e + n) of x, scaled.
  const auto scaled = [&](int64_t e, int64_t n, V& lo, V& hi) {
    V w_lo, w_hi;
    In::load(x + e, n, lo, hi);
    Weights::load(w + e, n, w_lo, w_hi);
    if constexpr (kByR) {
      lo = lo * vr * w_lo;
      hi = hi * vr * w_hi;
    } else {
      lo = lo * w_lo;
      hi = hi * w_hi;
    }
  };
  const int64_t rot = 2 * pairs;
  if (interleaved) {
    for (int64_t e = 0; e < rot; e += Out::kSize) {
      const int64_t n = std::min(Out::kSize, rot - e);
      V lo, hi;
      scaled(e, n, lo, hi);
      auto [a, b] = at::vec::deinterleave2(lo, hi);
      rotate_pair(a, b, V::loadu(c + e / 2), V::loadu(s + e / 2));
      std::tie(lo, hi) = at::vec::interleave2(a, b);
      Out::template put<kStream>(y + e, n, lo, hi);
    }
  } else {
    for (int64_t i = 0; i < pairs; i += Out::kSize) {
      const int64_t n = std::min(Out::kSize, pairs - i);
      V a0, a1, b0, b1;
      scaled(i, n, a0, a1);
      scaled(pairs + i, n, b0, b1);
      rotate_pair(a0, b0, V::loadu(c + i), V::loadu(s + i));
      rotate_pair(a1, b1, V::loadu(c + i + Out::W), V::loadu(s + i + Out::W));
      Out::template put<kStream>(y + i, n, a0, a1);
      Out::template put<kStream>(y + pairs + i, n, b0, b1);
    }
  }
  for (int64_t e = rot; e < head_dim; e += Out::kSize) {
    const int64_t n = std::min(Out::kSize, head_dim - e);
    V lo, hi;
    scaled(e, n, lo, hi);
    Out::template put<kStream>(y + e, n, lo, hi);
  }
}

// c * r and s * r, n elements each, into cr and sr: with a norm across heads a token has one
// rstd, which the table then carries, so each element of x is multiplied by its weight only
// (a multiplication fewer per element than x * r * w).
template <typename T>
ROPE_HEAD_INLINE void fold_rstd(const T* c, const T* s, T r, int64_t n, T* cr, T* sr) {
  using V = Vectorized<T>;
  const V vr(r);
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    (V::loadu(c + i, m) * vr).store(cr + i, m);
    (V::loadu(s + i, m) * vr).store(sr + i, m);
  }
}

// A token's half-split table with a per-head norm's weights folded in (the same weights
// serve every head of the tensor): f = [c * w_lo, s * w_hi, s * w_lo, c * w_hi], pairs each,
// so that a head's rotation of the normalized x takes no multiplication by w.
template <typename T>
ROPE_HEAD_INLINE void fold_weights(const T* c, const T* s, const T* w, int64_t pairs, T* f) {
  using V = Vectorized<T>;
  for (int64_t i = 0; i < pairs; i += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), pairs - i);
    const V cv = V::loadu(c + i, n), sv = V::loadu(s + i, n);
    const V w_lo = V::loadu(w + i, n), w_hi = V::loadu(w + pairs + i, n);
    (cv * w_lo).store(f + i, n);
    (sv * w_hi).store(f + pairs + i, n);
    (sv * w_lo).store(f + 2 * pairs + i, n);
    (cv * w_hi).store(f + 3 * pairs + i, n);
  }
}

// A head of the per-head, half-split, unit-stride forward: y = R(x * r * w), with R and w
// in the folded table f (fold_weights); the pass-through tail times r * w.
template <bool kStream, typename scalar_t>
ROPE_HEAD_INLINE void norm_rotate_head_folded(const scalar_t* x, scalar_t* y, int64_t pairs,
                                              int64_t head_dim, const opmath_t<scalar_t>* f,
                                              opmath_t<scalar_t> r, const opmath_t<scalar_t>* w) {
  using T = opmath_t<scalar_t>;
  using In = Block<scalar_t>;
  using Table = Block<T>;
  using Out = Block<scalar_t>;
  using V = typename Out::V;
  const V vr(r);
  for (int64_t i = 0; i < pairs; i += Out::kSize) {
    const int64_t n = std::min(Out::kSize, pairs - i);
    V a0, a1, b0, b1, cwl0, cwl1, swh0, swh1, swl0, swl1, cwh0, cwh1;
    In::load(x + i, n, a0, a1);
    In::load(x + pairs + i, n, b0, b1);
    Table::load(f + i, n, cwl0, cwl1);
    Table::load(f + pairs + i, n, swh0, swh1);
    Table::load(f + 2 * pairs + i, n, swl0, swl1);
    Table::load(f + 3 * pairs + i, n, cwh0, cwh1);
    a0 = a0 * vr;
    a1 = a1 * vr;
    b0 = b0 * vr;
    b1 = b1 * vr;
    Out::template put<kStream>(y + i, n, a0 * cwl0 - b0 * swh0, a1 * cwl1 - b1 * swh1);
    Out::template put<kStream>(y + pairs + i, n, a0 * swl0 + b0 * cwh0, a1 * swl1 + b1 * cwh1);
  }
  for (int64_t e = 2 * pairs; e < head_dim; e += Out::kSize) {
    const int64_t n = std::min(Out::kSize, head_dim - e);
    V lo, hi, w_lo, w_hi;
    In::load(x + e, n, lo, hi);
    Table::load(w + e, n, w_lo, w_hi);
    Out::template put<kStream>(y + e, n, lo * vr * w_lo, hi * vr * w_hi);
  }
}

// One head of the forward: x (any stride) normalized by r, scaled by w, rotated into y.
// At unit strides straight from x; otherwise through `scratch` (head_dim, math type).
template <bool kStream, typename scalar_t>
void norm_rotate_head(const RopeProblem& p, const scalar_t* x, int64_t x_stride, scalar_t* y,
                      int64_t y_stride, int64_t head_dim, const opmath_t<scalar_t>* c,
                      const opmath_t<scalar_t>* s, opmath_t<scalar_t> r,
                      const opmath_t<scalar_t>* w, opmath_t<scalar_t>* scratch) {
  if (x_stride == 1 && y_stride == 1)
    return scale_rotate_head<kStream>(p.interleaved, x, y, p.pairs, head_dim, c, s, r, w);
  convert_row(x, x_stride, scratch, 1, head_dim);
  if (y_stride == 1) {
    return scale_rotate_head<false>(p.interleaved, scratch, y, p.pairs, head_dim, c, s, r, w);
  }
  scale_row(scratch, scratch, r, w, head_dim);
  rotate_head_strided(scratch, 1, y, y_stride, c, s, p.pairs, p.interleaved);
  convert_row(scratch + 2 * p.pairs, 1, y + 2 * p.pairs * y_stride, y_stride,
              head_dim - 2 * p.pairs);
}

// One head of y rotated (by the table row c, s) into buf, the math type; y[r:] copied.
template <typename scalar_t>
void rotate_into_buffer(const RopeProblem& p, const scalar_t* y, int64_t stride_dim,
                        int64_t head_dim, const opmath_t<scalar_t>* c, const opmath_t<scalar_t>* s,
                        opmath_t<scalar_t>* buf) {
  if (stride_dim == 1 && p.interleaved) {
    rotate_head_interleaved<false>(y, buf, c, s, p.pairs);
  } else if (stride_dim == 1) {
    rotate_head_half_split<false>(y, buf, c, s, p.pairs);
  } else {
    rotate_head_strided(y, stride_dim, buf, 1, c, s, p.pairs, p.interleaved);
  }
  convert_row(y + 2 * p.pairs * stride_dim, stride_dim, buf + 2 * p.pairs, 1,
              head_dim - 2 * p.pairs);
}

// A hint to bring n elements of x (stride apart) into the cache, a 64-byte line at a time
// (a strided row: each element's line).
template <typename scalar_t>
ROPE_HEAD_INLINE void prefetch_row(const scalar_t* x, int64_t stride, int64_t n) {
  const int64_t step = stride == 1 ? std::max<int64_t>(1, 64 / sizeof(scalar_t)) : 1;
  for (int64_t d = 0; d < n; d += step) __builtin_prefetch(x + d * stride);
}

// Elements of the largest tensor row (heads * head_dim) of q and k.
inline int64_t largest_row(const RopeProblem& p) {
  int64_t most = 0;
  for (int i = 0; i < p.num_x; ++i) most = std::max(most, p.x[i].heads * p.x[i].head_dim);
  return most;
}

// Outputs at least this large are written around the cache (as the rotation's are).
constexpr int64_t kNormStreamBytes = int64_t{16} << 20;

// The inverse rms of each head of one token's row of q or k (rs[head]; with across_heads
// one value, repeated), kept in the op's rstd output when it has one.
template <typename scalar_t, typename Dim>
ROPE_HEAD_INLINE void token_inverse_rms(const NormRopeProblem& np, const HeadsDesc& h,
                                        const scalar_t* in, int64_t stride_dim, Dim head_dim,
                                        int64_t tok, opmath_t<scalar_t>* squares,
                                        opmath_t<scalar_t>* rs, opmath_t<scalar_t>* rstd_out) {
  using T = opmath_t<scalar_t>;
  heads_sum_squares(h, in, stride_dim, head_dim, squares);
  if (np.across_heads) {
    T squares_total = T(0);
    for (int64_t head = 0; head < h.heads; ++head) squares_total += squares[head];
    const T r = inverse_rms(squares_total, h.heads * head_dim, np.eps);
    std::fill(rs, rs + h.heads, r);
    if (rstd_out != nullptr) rstd_out[tok] = r;
  } else {
    inverse_rms_all(squares, h.heads, head_dim, np.eps, rs);
    if (rstd_out != nullptr) std::copy(rs, rs + h.heads, rstd_out + tok * h.heads);
  }
}

// One token's row of q or k on the common path (a norm per head, half-split pairs, unit
// strides). `pairs` and `head_dim` are int64_t or, for the head sizes models use, compile-
// time constants (Size, see with_pairs): then every loop below unrolls into whole vector
// blocks, with no partial-block tests, masks or loop counters.
template <bool kStream, typename scalar_t, typename Pairs, typename Dim>
ROPE_HEAD_INLINE void norm_rope_row_folded(
    const NormRopeProblem& np, const HeadsDesc& h, const scalar_t* in, scalar_t* out,
    const scalar_t* next_in, int64_t tok, const opmath_t<scalar_t>* c, const opmath_t<scalar_t>* sn,
    const opmath_t<scalar_t>* w, Pairs pairs, Dim head_dim, opmath_t<scalar_t>* squares,
    opmath_t<scalar_t>* rs, opmath_t<scalar_t>* rstd_out, opmath_t<scalar_t>* folded) {
  token_inverse_rms(np, h, in, Size<1>{}, head_dim, tok, squares, rs, rstd_out);
  fold_weights(c, sn, w, pairs, folded);
  for (int64_t head = 0; head < h.heads; ++head) {
    prefetch_row(next_in + head * h.in_stride_head, Size<1>{}, head_dim);
    norm_rotate_head_folded<kStream>(in + head * h.in_stride_head, out + head * h.out_stride_head,
                                     pairs, head_dim, folded, rs[head], w);
  }
}

// Tokens [begin, end) of the forward: per token and tensor, the sums of squares (one
// read), then each head normalized, scaled and rotated into the output (a second read
// of the same bytes, from L1, and one write).
template <bool kStream, typename scalar_t, typename table_t>
void norm_rope_forward_tokens(const NormRopeProblem& np, int64_t begin, int64_t end,
                              opmath_t<scalar_t>* c_buf, opmath_t<scalar_t>* s_buf,
                              opmath_t<scalar_t>* squares, opmath_t<scalar_t>* rs,
                              opmath_t<scalar_t>* scratch, opmath_t<scalar_t>* folded) {
  using T = opmath_t<scalar_t>;
  const RopeProblem& p = np.rope;
  const int64_t padded = padded_pairs<scalar_t>(p.pairs);
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t b = tok / p.seq, s = tok % p.seq;
    const auto [c, sn] = table_row<scalar_t, table_t>(p, b, s, c_buf, s_buf);
    for (int i = 0; i < p.num_x; ++i) {
      const HeadsDesc& h = p.x[i];
      const NormDesc& nd = np.norm[i];
      const T* scale = static_cast<const T*>(nd.scale);
      const int64_t D = h.head_dim;
      const scalar_t* in =
          static_cast<const scalar_t*>(h.in) + b * h.in_stride_batch + s * h.in_stride_seq;
      scalar_t* out = static_cast<scalar_t*>(h.out) + b * h.out_stride_batch + s * h.out_stride_seq;
      T* rstd_out = static_cast<T*>(nd.rstd);
      // The next token's rows are fetched while this one's are rotated: the sums of squares
      // would otherwise wait on memory with the arithmetic units idle, and the rotation then
      // run with the memory idle (13-15% of the time of bf16 Qwen3-8B shapes at s=4096).
      const int64_t next = tok + 1 < end ? tok + 1 : tok;
      const scalar_t* next_in = static_cast<const scalar_t*>(h.in) +
                                next / p.seq * h.in_stride_batch + next % p.seq * h.in_stride_seq;
      if (!np.across_heads && !p.interleaved && h.in_stride_dim == 1 && h.out_stride_dim == 1) {
        with_head_sizes<kFixedSizes<scalar_t, table_t>>(p.pairs, D, [&](auto pairs, auto head_dim) {
          norm_rope_row_folded<kStream>(np, h, in, out, next_in, tok, c, sn, scale, pairs, head_dim,
                                        squares, rs, rstd_out, folded);
        });
        continue;
      }
      if (h.in_stride_dim == 1 && h.out_stride_dim == 1 && D == 2 * p.pairs) {
        // A norm across heads (OLMo 2) or interleaved pairs, at unit strides and a fully
        // rotated head: the weights differ per head (or the pairs interleave), so they are
        // applied on the loads; across heads the token's one rstd rides on its table instead
        // (fold_rstd). A partially rotated head takes norm_rotate_head below: its run-time
        // loop inlined here too made the fixed sizes' row 3-4% slower (docs/kernels.md).
        with_pairs<kFixedSizes<scalar_t, table_t>>(p.pairs, [&](auto pairs) {
          const auto head_dim = twice(pairs);
          token_inverse_rms(np, h, in, Size<1>{}, head_dim, tok, squares, rs, rstd_out);
          if (np.across_heads) {
            T* cr = folded;
            T* sr = folded + padded;
            fold_rstd(c, sn, rs[0], padded, cr, sr);
            for (int64_t head = 0; head < h.heads; ++head) {
              prefetch_row(next_in + head * h.in_stride_head, Size<1>{}, head_dim);
              scale_rotate_head<kStream, false>(p.interleaved, in + head * h.in_stride_head,
                                                out + head * h.out_stride_head, pairs, head_dim, cr,
                                                sr, T(1), scale + head * D);
            }
            return;
          }
          for (int64_t head = 0; head < h.heads; ++head) {
            prefetch_row(next_in + head * h.in_stride_head, Size<1>{}, head_dim);
            scale_rotate_head<kStream>(p.interleaved, in + head * h.in_stride_head,
                                       out + head * h.out_stride_head, pairs, head_dim, c, sn,
                                       rs[head], scale);
          }
        });
        continue;
      }
      // Other strides (through the scratch row), or a partially rotated head.
      token_inverse_rms(np, h, in, h.in_stride_dim, D, tok, squares, rs, rstd_out);
      for (int64_t head = 0; head < h.heads; ++head) {
        prefetch_row(next_in + head * h.in_stride_head, h.in_stride_dim, D);
        norm_rotate_head<kStream>(p, in + head * h.in_stride_head, h.in_stride_dim,
                                  out + head * h.out_stride_head, h.out_stride_dim, D, c, sn,
                                  rs[head], scale + (np.across_heads ? head * D : 0), scratch);
      }
    }
  }
  if constexpr (kStream) stream_fence();
}

template <typename scalar_t, typename table_t>
void norm_rope_forward(const NormRopeProblem& np) {
  using T = opmath_t<scalar_t>;
  const RopeProblem& p = np.rope;
  const int64_t tokens = p.batch * p.seq;
  const int64_t row = largest_row(p);
  bool in_place = false;
  for (int i = 0; i < p.num_x; ++i) in_place = in_place || p.x[i].in == p.x[i].out;
  const bool stream =
      !in_place && tokens * 2 * row * static_cast<int64_t>(sizeof(scalar_t)) >= kNormStreamBytes;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (2 * row + 1));
  const int64_t padded = padded_pairs<scalar_t>(p.pairs);
  const int64_t heads = std::max(p.x[0].heads, p.x[p.num_x - 1].heads);
  const int64_t head_dim = std::max(p.x[0].head_dim, p.x[p.num_x - 1].head_dim);
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    LineAlignedBuffer<T, 256> c_buf(padded), s_buf(padded), scratch(head_dim);
    LineAlignedBuffer<T, 64> squares(heads), rs(heads);
    // The folded table: per-head weights' 4 * pairs, or across heads c * r and s * r (padded).
    LineAlignedBuffer<T, 512> folded(std::max(4 * p.pairs, 2 * padded));
    if (stream) {
      norm_rope_forward_tokens<true, scalar_t, table_t>(np, begin, end, c_buf.data(), s_buf.data(),
                                                        squares.data(), rs.data(), scratch.data(),
                                                        folded.data());
    } else {
      norm_rope_forward_tokens<false, scalar_t, table_t>(np, begin, end, c_buf.data(), s_buf.data(),
                                                         squares.data(), rs.data(), scratch.data(),
                                                         folded.data());
    }
  });
}

// A head of the fixed-size backward (norm_rope_backward_row_fixed): u = R^T grad (sin is
// negated in the table), as rotate_head_half_split computes it, and n = x * r.
template <typename scalar_t, int64_t kPairs, int64_t kVecs>
ROPE_HEAD_INLINE void backward_head_un(const scalar_t* g, const scalar_t* xh,
                                       const opmath_t<scalar_t>* c, const opmath_t<scalar_t>* sn,
                                       opmath_t<scalar_t> r,
                                       typename Block<scalar_t>::V (&u)[kVecs],
                                       typename Block<scalar_t>::V (&n)[kVecs]) {
  using In = Block<scalar_t>;
  using V = typename In::V;
  constexpr int64_t W = In::W, kSize = In::kSize;
#pragma GCC unroll 8
  for (int64_t i = 0; i < kPairs; i += kSize) {
    V a0, a1, b0, b1;
    In::load(g + i, kSize, a0, a1);
    In::load(g + kPairs + i, kSize, b0, b1);
    rotate_pair(a0, b0, V::loadu(c + i), V::loadu(sn + i));
    rotate_pair(a1, b1, V::loadu(c + i + W), V::loadu(sn + i + W));
    u[i / W] = a0;
    u[i / W + 1] = a1;
    u[(kPairs + i) / W] = b0;
    u[(kPairs + i) / W + 1] = b1;
  }
  const V vr(r);
#pragma GCC unroll 16
  for (int64_t j = 0; j < kVecs; j += 2) {
    In::load(xh + j * W, kSize, n[j], n[j + 1]);
    n[j] = n[j] * vr;
    n[j + 1] = n[j + 1] * vr;
  }
}

// The scale's gradient (acc) += u * n; returns the head's sum of dn * n, dn = u * w.
template <typename scalar_t, int64_t kVecs>
ROPE_HEAD_INLINE opmath_t<scalar_t> backward_head_sums(
    const typename Block<scalar_t>::V (&u)[kVecs], const typename Block<scalar_t>::V (&n)[kVecs],
    const opmath_t<scalar_t>* w, opmath_t<scalar_t>* acc) {
  using T = opmath_t<scalar_t>;
  using V = typename Block<scalar_t>::V;
  constexpr int64_t W = Block<scalar_t>::W;
  V dots(T(0));
#pragma GCC unroll 16
  for (int64_t j = 0; j < kVecs; ++j) {
    const V dn = u[j] * V::loadu(w + j * W);
    (V::loadu(acc + j * W) + u[j] * n[j]).store(acc + j * W);
    dots = dots + dn * n[j];
  }
  return at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return a + b; }, dots);
}

// grad_x = r * (u * w - n * mean), stored.
template <typename scalar_t, int64_t kVecs>
ROPE_HEAD_INLINE void backward_head_store(const typename Block<scalar_t>::V (&u)[kVecs],
                                          const typename Block<scalar_t>::V (&n)[kVecs],
                                          const opmath_t<scalar_t>* w, opmath_t<scalar_t> r,
                                          opmath_t<scalar_t> mean, scalar_t* y) {
  using In = Block<scalar_t>;
  using V = typename In::V;
  constexpr int64_t W = In::W;
  const V vr(r), vmean(mean);
#pragma GCC unroll 8
  for (int64_t j = 0; j < kVecs; j += 2) {
    const V g0 = vr * (u[j] * V::loadu(w + j * W) - n[j] * vmean);
    const V g1 = vr * (u[j + 1] * V::loadu(w + (j + 1) * W) - n[j + 1] * vmean);
    In::store(y + j * W, In::kSize, g0, g1);
  }
}

// The backward of one token's row of q or k on the common path (half-split pairs, unit
// strides, head_dim = 2 * kPairs, one of the fixed sizes): head by head, with the head's
// u = R^T grad and n = x * rstd held in vectors, where the general path below goes through
// row buffers (two of 16 KB for bf16 Qwen3 q: together all of L1) and loops of run-time
// length. A norm per head finishes each head at once; a norm across heads (kAcross, OLMo 2)
// needs every head's sum of dn * n first, so its heads are formed twice (the second time
// from the rows, now in L1) rather than stored. The same operations in the same order as
// the general path (the last bit may differ where the compiler contracts other products
// into fused multiply-adds). rstd: the row's (one per head, or one); scale, acc: the
// weights and the group's partial sums of the scale's gradient ([head_dim], or
// [heads * head_dim] across heads).
template <bool kAcross, typename scalar_t, int64_t kPairs>
ROPE_HEAD_INLINE void norm_rope_backward_row_fixed(
    const HeadsDesc& h, const NormDesc& nd, const scalar_t* grad, const scalar_t* x, scalar_t* out,
    const scalar_t* next_grad, const scalar_t* next_x, const opmath_t<scalar_t>* c,
    const opmath_t<scalar_t>* sn, const opmath_t<scalar_t>* scale, const opmath_t<scalar_t>* rstd,
    opmath_t<scalar_t>* acc) {
  using T = opmath_t<scalar_t>;
  using V = typename Block<scalar_t>::V;
  constexpr int64_t kD = 2 * kPairs, kVecs = kD / Block<scalar_t>::W;
  static_assert(kPairs % Block<scalar_t>::kSize == 0, "whole blocks");
  T dot_all = T(0);
  for (int64_t head = 0; head < h.heads; ++head) {
    prefetch_row(next_grad + head * h.in_stride_head, Size<1>{}, Size<kD>{});
    prefetch_row(next_x + head * nd.x_stride_head, Size<1>{}, Size<kD>{});
    const T r = kAcross ? rstd[0] : rstd[head];
    const int64_t w0 = kAcross ? head * kD : 0;
    V u[kVecs], n[kVecs];
    backward_head_un<scalar_t, kPairs>(grad + head * h.in_stride_head, x + head * nd.x_stride_head,
                                       c, sn, r, u, n);
    const T dots = backward_head_sums<scalar_t>(u, n, scale + w0, acc + w0);
    if constexpr (kAcross) {
      dot_all += dots;
    } else {
      backward_head_store<scalar_t>(u, n, scale, r, dots / static_cast<T>(kD),
                                    out + head * h.out_stride_head);
    }
  }
  if constexpr (kAcross) {
    const T mean = dot_all / static_cast<T>(h.heads * kD);
    for (int64_t head = 0; head < h.heads; ++head) {
      V u[kVecs], n[kVecs];
      backward_head_un<scalar_t, kPairs>(grad + head * h.in_stride_head,
                                         x + head * nd.x_stride_head, c, sn, rstd[0], u, n);
      backward_head_store<scalar_t>(u, n, scale + head * kD, rstd[0], mean,
                                    out + head * h.out_stride_head);
    }
  }
}

template <typename scalar_t, typename table_t>
void norm_rope_backward(const NormRopeProblem& np) {
  using T = opmath_t<scalar_t>;
  const RopeProblem& p = np.rope;  // inverse is set: table_row negates sin
  const int64_t tokens = p.batch * p.seq;
  const int64_t row = largest_row(p);
  const int64_t padded = padded_pairs<scalar_t>(p.pairs);
  at::parallel_for(0, np.groups, 1, [&](int64_t group_begin, int64_t group_end) {
    LineAlignedBuffer<T, 256> c_buf(padded), s_buf(padded);
    LineAlignedBuffer<T, 1024> ubuf(row), xbuf(row);
    LineAlignedBuffer<T, 64> head_dots(std::max(p.x[0].heads, p.x[p.num_x - 1].heads));
    for (int64_t g = group_begin; g < group_end; ++g) {
      int64_t scale_size[2];
      T* partial[2];
      for (int i = 0; i < p.num_x; ++i) {
        scale_size[i] = np.across_heads ? p.x[i].heads * p.x[i].head_dim : p.x[i].head_dim;
        partial[i] = static_cast<T*>(np.norm[i].scale_grad_partial) + g * scale_size[i];
        std::fill(partial[i], partial[i] + scale_size[i], T(0));
      }
      const int64_t tok_end = std::min(tokens, (g + 1) * np.tokens_per_group);
      for (int64_t tok = g * np.tokens_per_group; tok < tok_end; ++tok) {
        const int64_t b = tok / p.seq, s = tok % p.seq;
        const auto [c, sn] = table_row<scalar_t, table_t>(p, b, s, c_buf.data(), s_buf.data());
        for (int i = 0; i < p.num_x; ++i) {
          const HeadsDesc& h = p.x[i];  // in: the output's gradient, out: x's gradient
          const NormDesc& nd = np.norm[i];
          const T* scale = static_cast<const T*>(nd.scale);
          const T* rstd = static_cast<const T*>(nd.rstd);
          const int64_t D = h.head_dim;
          const scalar_t* grad =
              static_cast<const scalar_t*>(h.in) + b * h.in_stride_batch + s * h.in_stride_seq;
          const int64_t next = tok + 1 < tok_end ? tok + 1 : tok;
          const int64_t nb = next / p.seq, ns = next % p.seq;
          const scalar_t* next_grad =
              static_cast<const scalar_t*>(h.in) + nb * h.in_stride_batch + ns * h.in_stride_seq;
          const scalar_t* next_x =
              static_cast<const scalar_t*>(nd.x) + nb * nd.x_stride_batch + ns * nd.x_stride_seq;
          bool fixed = false;  // the row went the fixed-size way
          if (!p.interleaved && D == 2 * p.pairs && h.in_stride_dim == 1 && h.out_stride_dim == 1 &&
              nd.x_stride_dim == 1) {
            with_pairs<kFixedSizes<scalar_t, table_t>>(p.pairs, [&](auto pairs) {
              if constexpr (!std::is_same_v<decltype(pairs), int64_t>) {
                constexpr int64_t kPairs = decltype(pairs)::value;
                const scalar_t* x = static_cast<const scalar_t*>(nd.x) + b * nd.x_stride_batch +
                                    s * nd.x_stride_seq;
                scalar_t* out =
                    static_cast<scalar_t*>(h.out) + b * h.out_stride_batch + s * h.out_stride_seq;
                if (np.across_heads) {
                  norm_rope_backward_row_fixed<true, scalar_t, kPairs>(
                      h, nd, grad, x, out, next_grad, next_x, c, sn, scale, rstd + tok, partial[i]);
                } else {
                  norm_rope_backward_row_fixed<false, scalar_t, kPairs>(
                      h, nd, grad, x, out, next_grad, next_x, c, sn, scale, rstd + tok * h.heads,
                      partial[i]);
                }
                fixed = true;
              }
            });
          }
          if (fixed) continue;
          for (int64_t head = 0; head < h.heads; ++head) {  // u = R^T grad
            rotate_into_buffer(p, grad + head * h.in_stride_head, h.in_stride_dim, D, c, sn,
                               ubuf.data() + head * D);
          }
          load_heads(
              static_cast<const scalar_t*>(nd.x) + b * nd.x_stride_batch + s * nd.x_stride_seq,
              nd.x_stride_head, nd.x_stride_dim, h.heads, D, xbuf.data());
          // One pass per head: with n = x * rstd and dn = u * scale, the scale's gradient
          // += u * n and the head's sum of dn * n. n and dn are not stored: the last pass
          // forms them again, as stores, not arithmetic, bound this kernel.
          using V = Vectorized<T>;
          for (int64_t head = 0; head < h.heads; ++head) {
            const V r(np.across_heads ? rstd[tok] : rstd[tok * h.heads + head]);
            const int64_t w0 = np.across_heads ? head * D : 0;
            T* acc = partial[i] + w0;
            const T* w = scale + w0;
            T* uh = ubuf.data() + head * D;
            T* xh = xbuf.data() + head * D;
            V dots(T(0));
            for (int64_t d = 0; d < D; d += V::size()) {
              const int64_t m = std::min<int64_t>(V::size(), D - d);
              const V u = V::loadu(uh + d, m), n = V::loadu(xh + d, m) * r;
              const V dn = u * V::loadu(w + d, m);
              (V::loadu(acc + d, m) + u * n).store(acc + d, m);
              dots = dots + dn * n;  // lanes past m are zero
            }
            head_dots[head] =
                at::vec::vec_reduce_all<T>([](const V& x, const V& y) { return x + y; }, dots);
          }
          scalar_t* out =
              static_cast<scalar_t*>(h.out) + b * h.out_stride_batch + s * h.out_stride_seq;
          // grad_x = rstd * (dn - n * mean(dn * n)) over the normalized group, while the
          // next token's rows of the gradient and of x are fetched, as in the forward
          // (20-25% of the backward's time, bf16 Qwen3-8B shapes at s=4096).
          T dot_all = T(0);
          for (int64_t head = 0; head < h.heads; ++head) dot_all += head_dots[head];
          for (int64_t head = 0; head < h.heads; ++head) {
            prefetch_row(next_grad + head * h.in_stride_head, h.in_stride_dim, D);
            prefetch_row(next_x + head * nd.x_stride_head, nd.x_stride_dim, D);
            const T r = np.across_heads ? rstd[tok] : rstd[tok * h.heads + head];
            const T mean = np.across_heads ? dot_all / static_cast<T>(h.heads * D)
                                           : head_dots[head] / static_cast<T>(D);
            const V vr(r), vmean(mean);
            T* uh = ubuf.data() + head * D;
            const T* xh = xbuf.data() + head * D;
            const T* w = scale + (np.across_heads ? head * D : 0);
            scalar_t* out_head = out + head * h.out_stride_head;
            using Math = Block<T>;
            using Out = Block<scalar_t>;
            // grad_x = rstd * (u * scale - (x * rstd) * mean): at unit stride straight into
            // the output, else through ubuf.
            for (int64_t d = 0; d < D; d += Out::kSize) {
              const int64_t m = std::min(Out::kSize, D - d);
              V u0, u1, x0, x1, w0, w1;
              Math::load(uh + d, m, u0, u1);
              Math::load(xh + d, m, x0, x1);
              Math::load(w + d, m, w0, w1);
              const V g0 = vr * (u0 * w0 - (x0 * vr) * vmean);
              const V g1 = vr * (u1 * w1 - (x1 * vr) * vmean);
              if (h.out_stride_dim == 1) {
                Out::store(out_head + d, m, g0, g1);
              } else {
                Math::store(uh + d, m, g0, g1);
              }
            }
            if (h.out_stride_dim != 1) convert_row(uh, 1, out_head, h.out_stride_dim, D);
          }
        }
      }
    }
  });
  // The groups' partial sums, added in group order.
  for (int i = 0; i < p.num_x; ++i) {
    const int64_t size = np.across_heads ? p.x[i].heads * p.x[i].head_dim : p.x[i].head_dim;
    const T* partial = static_cast<const T*>(np.norm[i].scale_grad_partial);
    T* out = static_cast<T*>(np.norm[i].scale_grad);
    at::parallel_for(0, size, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        T sum = T(0);
        for (int64_t g = 0; g < np.groups; ++g) sum += partial[g * size + j];
        out[j] = sum;
      }
    });
  }
}

template <typename scalar_t, typename table_t>
void norm_rope_typed(const NormRopeProblem& np) {
  if (np.backward) return norm_rope_backward<scalar_t, table_t>(np);
  norm_rope_forward<scalar_t, table_t>(np);
}

template <typename scalar_t>
void norm_rope_for_x(const NormRopeProblem& np) {
  switch (np.rope.table_dtype) {
    case c10::ScalarType::Float:
      return norm_rope_typed<scalar_t, float>(np);
    case c10::ScalarType::Double:
      return norm_rope_typed<scalar_t, double>(np);
    default:
      if constexpr (kReduced<scalar_t>) return norm_rope_typed<scalar_t, scalar_t>(np);
      TORCH_CHECK(false, "rope: unsupported table dtype ", np.rope.table_dtype);
  }
}

void norm_rope_cpu_kernel(const NormRopeProblem& np) {
  switch (np.rope.x_dtype) {
    case c10::ScalarType::Float:
      return norm_rope_for_x<float>(np);
    case c10::ScalarType::Double:
      return norm_rope_for_x<double>(np);
    case c10::ScalarType::BFloat16:
      return norm_rope_for_x<c10::BFloat16>(np);
    case c10::ScalarType::Half:
      return norm_rope_for_x<c10::Half>(np);
    default:
      TORCH_CHECK(false, "rope: unsupported x dtype ", np.rope.x_dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace rope::cpu
