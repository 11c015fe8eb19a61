// The CUDA kernels of the fused QK-RMSNorm + RoPE, compiled by nvcc for the GPU
// (norm_rope kernels in rope_cuda.cu) and by the host compiler for the host executor
// (rope_cuda_host.cpp), like the rotation kernel of rope_cuda_kernel.cuh.
//
// Work item = one normalized group: (token, head of q or k), or (token, q or k) when
// the norm spans all heads. A group of `block_x` lanes (a power of two <= 32, so a
// group never straddles a warp) takes an item; each lane takes 16-byte runs of it:
// pair chunks (the lo and hi runs that rotate together, as in the rotation kernel)
// and pass-through runs of x[r:]. An item runs in two phases:
//   1. each lane sums its part (forward: x**2; backward: dn * n);
//   2. the lanes' sums are combined in a fixed butterfly (a warp shuffle on the GPU,
//      the same additions in the same order on the host), and each lane takes its runs
//      again (forward, one unit per lane: from registers, KeptRuns; else re-read from
//      L1: DRAM sees one read) and writes its results.
// The host executor runs phase 1 for every lane of an item, the butterfly, then
// phase 2, which is what the shuffle makes the GPU do.
// The scale's gradient (backward) is two more launches of one thread per output:
// partial sums over fixed groups of tokens, then their sum in group order: the same
// bits on every run, no atomics.
#pragma once

#include "rope_cuda_kernel.cuh"

namespace rope::cuda {

struct NormPlan {
  int64_t grid = 1;         // blocks of the item launch (a persistent grid)
  int block_x = 1;          // lanes per item
  int block_y = 1;          // items per block
  int vec = 1;              // elements per run (16 bytes' worth, or 1)
  int table_vec = 1;        // elements of cos/sin per access
  bool scale_runs = false;  // the scale read 16 bytes per access (else one element)
  int min_blocks = 0;       // 4: the forward's vector kernel built for 4 blocks per SM; 0: not
  bool prefetch = false;    // each lane hints its next item's runs into L2 (prefetch_item)
  int64_t items = 0;
  int64_t units = 0;  // runs per head: pair chunks, then pass-through runs
  // The scale-gradient launches (backward): one thread per partial sum, then per sum.
  int64_t partial_grid = 1, sum_grid = 1;
};

constexpr int kFlatBlock = 256;  // threads per block of the scale-gradient launches

ROPE_HD int64_t norm_total_heads(const NormRopeProblem& np) {
  return np.across_heads ? np.rope.num_x : total_heads(np.rope);
}

ROPE_HD int64_t scale_size(const NormRopeProblem& np, int i) {
  const HeadsDesc& d = np.rope.x[i];
  return np.across_heads ? d.heads * d.head_dim : d.head_dim;
}

// The backward also reads the forward's x in runs: same rules as the rotation's x.
inline bool norm_vectorizes(const NormRopeProblem& np, int64_t n, int64_t elem_size) {
  if (!x_vectorizes(np.rope, n, elem_size)) return false;
  if (!np.backward) return true;
  for (int i = 0; i < np.rope.num_x; ++i) {
    const NormDesc& d = np.norm[i];
    if (d.x_stride_dim != 1 || !aligned_to(d.x, n * elem_size)) return false;
    for (int64_t st : {d.x_stride_batch, d.x_stride_seq, d.x_stride_head}) {
      if (st % n != 0) return false;
    }
  }
  return true;
}

inline NormPlan plan_norm_launch(const NormRopeProblem& np, const LaunchConfig& cfg, int sm_count,
                                 int64_t elem_size, int64_t table_elem_size) {
  const RopeProblem& p = np.rope;
  NormPlan plan;
  const int64_t vec = 16 / elem_size;
  plan.vec =
      (cfg.vectorize != 0 && norm_vectorizes(np, vec, elem_size)) ? static_cast<int>(vec) : 1;
  plan.table_vec = table_run(p, plan.vec, table_elem_size);
  // A run's scale elements sit at a multiple of vec from the scale's start, vec elements
  // being 16 bytes or more of the scale's type: 16-byte loads where the scale is aligned.
  plan.scale_runs = plan.vec > 1;
  for (int i = 0; i < p.num_x; ++i) {
    plan.scale_runs = plan.scale_runs && aligned_to(np.norm[i].scale, 16);
  }
  const int64_t head_dim = p.x[0].head_dim;  // the adapter requires q's == k's
  plan.units = p.pairs / plan.vec + (head_dim - 2 * p.pairs) / plan.vec;
  // A head's runs, or 32 lanes for a norm over all heads (many runs per item).
  const int64_t want_lanes = np.across_heads ? 32 : pow2_at_least(plan.units);
  const int64_t threads = cfg.block_threads < 1 ? 1 : cfg.block_threads;
  const int64_t lanes = want_lanes < 32 ? want_lanes : 32;
  plan.block_x = static_cast<int>(lanes < threads ? lanes : threads);
  // A group is a power of two of lanes and must fill whole warps' worth of rows.
  while (plan.block_x > 1 && (threads / plan.block_x) * plan.block_x != threads) plan.block_x /= 2;
  plan.block_y = static_cast<int>(threads / plan.block_x < 1 ? 1 : threads / plan.block_x);
  plan.items = p.batch * p.seq * norm_total_heads(np);
  const int64_t sms = cfg.sm_count > 0 ? cfg.sm_count : (sm_count > 0 ? sm_count : 1);
  const int64_t blocks = ceil_div(plan.items, plan.block_y);
  const int64_t cap = sms * (cfg.max_blocks_per_sm < 1 ? 1 : cfg.max_blocks_per_sm);
  plan.grid = blocks < cap ? blocks : cap;
  if (plan.grid < 1) plan.grid = 1;
  // The 64-register build exists for the forward's vector path only.
  plan.min_blocks = cfg.norm_min_blocks == 4 && !np.backward && plan.vec > 1 &&
                            plan.block_x * plan.block_y <= kOccupancyThreads
                        ? 4
                        : 0;
  plan.prefetch = cfg.norm_prefetch == 1;
  if (np.backward) {
    int64_t partials = 0, sums = 0;
    for (int i = 0; i < p.num_x; ++i) {
      partials += np.groups * scale_size(np, i);
      sums += scale_size(np, i);
    }
    plan.partial_grid = ceil_div(partials, kFlatBlock) < 1 ? 1 : ceil_div(partials, kFlatBlock);
    plan.sum_grid = ceil_div(sums, kFlatBlock) < 1 ? 1 : ceil_div(sums, kFlatBlock);
  }
  return plan;
}

// a / b for a >= 0, b > 0: in 32 bits where both fit (every real problem), as a 64-bit
// division is a long software routine on the GPU; the same quotient either way.
ROPE_HD int64_t quotient(int64_t a, int64_t b) {
  constexpr int64_t k32 = std::numeric_limits<int32_t>::max();
  if (a <= k32 && b <= k32) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

// The item's token, tensor (0: q, 1: k) and heads: found once per item (the kernel loop
// and the host executor pass it to both phases).
struct NormItem {
  int64_t b, s, token;
  int i;
  int64_t head_begin, head_end;

  ROPE_HD NormItem(const NormRopeProblem& np, int64_t item) {
    const RopeProblem& p = np.rope;
    const int64_t per_token = norm_total_heads(np);
    token = quotient(item, per_token);
    const int64_t h = item - token * per_token;
    b = quotient(token, p.seq);
    s = token - b * p.seq;
    if (np.across_heads) {
      i = static_cast<int>(h);
      head_begin = 0;
      head_end = p.x[i].heads;
    } else {
      i = h < p.x[0].heads ? 0 : 1;
      head_begin = i == 0 ? h : h - p.x[0].heads;
      head_end = head_begin + 1;
    }
  }
};

// cos/sin of the N pairs from i0 for token (b, s), math type, sin negated for the
// inverse; NaN for a position outside the table (the GPU cannot raise).
template <typename table_t, int N, typename T, typename Access>
ROPE_HD void table_chunk(const RopeProblem& p, bool table_runs, int64_t b, int64_t s, int64_t i0,
                         T (&c)[N], T (&sn)[N]) {
  const TableIndex& t = p.table;
  const bool has_positions = t.pos32 != nullptr || t.pos64 != nullptr;
  const int64_t pos = has_positions ? token_position(t, b, s) : 0;
  if (has_positions && (pos < 0 || pos >= t.rows)) {
    ROPE_UNROLL
    for (int j = 0; j < N; ++j) c[j] = sn[j] = std::numeric_limits<T>::quiet_NaN();
    return;
  }
  const T sign = p.inverse ? T(-1) : T(1);
  const table_t* cos_row = static_cast<const table_t*>(p.cos) + cos_offset(t, b, s, pos);
  const table_t* sin_row = static_cast<const table_t*>(p.sin) + sin_offset(t, b, s, pos);
  load_table_chunk<table_t, N, T, Access>(t, cos_row, sin_row, i0, table_runs, sign, c, sn);
}

// Run `unit` of a head: a pair chunk (lo at lo_off, hi at hi_off, N elements each) or,
// past the pair chunks, a pass-through run at lo_off (hi_off < 0).
ROPE_HD void unit_offsets(int64_t unit, int64_t pairs, int N, bool interleaved, int64_t& lo_off,
                          int64_t& hi_off) {
  const int64_t chunks = pairs / N;
  if (unit < chunks) {
    chunk_offsets(unit * N, N, pairs, interleaved, lo_off, hi_off);
  } else {
    lo_off = 2 * pairs + (unit - chunks) * N;
    hi_off = -1;
  }
}

template <typename scalar_t, int N, typename T, typename Access>
ROPE_HD void load_run(const scalar_t* x, int64_t stride, T (&v)[N]) {
  const Pack<scalar_t, N> pk = Access::template load<scalar_t, N>(x);
  (void)stride;
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) v[j] = static_cast<T>(pk.v[j]);
}

// N > 1 only at unit stride (norm_vectorizes); N == 1 may have any stride.
template <typename scalar_t, int N, typename T, typename Access>
ROPE_HD void store_run(scalar_t* y, const T (&v)[N]) {
  Pack<scalar_t, N> pk;
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) pk.v[j] = static_cast<scalar_t>(v[j]);
  Access::template store<scalar_t, N>(y, pk);
}

// The scale (weight + offset) of elements [off, off + N) of head `head`: 16 bytes per
// access where the plan allows (plan.scale_runs), else one element per access.
template <int N, typename T, typename Access>
ROPE_HD void scale_run(const NormRopeProblem& np, const NormPlan& plan, int i, int64_t head,
                       int64_t off, T (&w)[N]) {
  const T* scale = static_cast<const T*>(np.norm[i].scale) +
                   (np.across_heads ? head * np.rope.x[i].head_dim : 0) + off;
  constexpr int kRun = 16 / static_cast<int>(sizeof(T));
  if constexpr (N % kRun == 0) {
    if (plan.scale_runs) {
      ROPE_UNROLL
      for (int j = 0; j < N; j += kRun) {
        const Pack<T, kRun> pk = Access::template load<T, kRun>(scale + j);
        ROPE_UNROLL
        for (int m = 0; m < kRun; ++m) w[j + m] = pk.v[m];
      }
      return;
    }
  }
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) w[j] = Access::template load<T, 1>(scale + j).v[0];
}

// A hint that brings into L2 the runs phase 1 of `item` will read on this lane (x; in the
// backward, the output's gradient and the saved x): the kernel loop gives it the lane's
// next item before the current one's loads, so that item's loads wait on L2, not on DRAM,
// and memory has the next item's bytes in flight while this one computes. No register
// receives data. Launch setting norm_prefetch=1 (docs/kernels.md).
template <typename scalar_t, int N, typename Access>
ROPE_HD void prefetch_item(const NormRopeProblem& np, const NormPlan& plan, int64_t item,
                           int64_t lane) {
  const NormItem it(np, item);
  const HeadsDesc& d = np.rope.x[it.i];
  const NormDesc& nd = np.norm[it.i];
  for (int64_t head = it.head_begin; head < it.head_end; ++head) {
    const scalar_t* x = static_cast<const scalar_t*>(d.in) + it.b * d.in_stride_batch +
                        it.s * d.in_stride_seq + head * d.in_stride_head;
    const scalar_t* saved = np.backward
                                ? static_cast<const scalar_t*>(nd.x) + it.b * nd.x_stride_batch +
                                      it.s * nd.x_stride_seq + head * nd.x_stride_head
                                : nullptr;
    for (int64_t unit = lane; unit < plan.units; unit += plan.block_x) {
      int64_t lo_off, hi_off;
      unit_offsets(unit, np.rope.pairs, N, np.rope.interleaved, lo_off, hi_off);
      for (const int64_t off : {lo_off, hi_off}) {
        if (off < 0) continue;
        Access::prefetch(x + off * d.in_stride_dim);
        if (saved != nullptr) Access::prefetch(saved + off * nd.x_stride_dim);
      }
    }
  }
}

// Elements normalized together: a head, or all heads of the tensor.
ROPE_HD int64_t group_count(const NormRopeProblem& np, const NormItem& it) {
  return (it.head_end - it.head_begin) * np.rope.x[it.i].head_dim;
}

// ---- forward ----

// The runs of x that phase 1 of the forward read last, in the math type. Where a lane has
// one unit of one head (kept_runs), phase 2 takes them from here: x is read from memory
// once, and not again from L1 (on the GPU, registers).
template <typename T, int N>
struct KeptRuns {
  T lo[N], hi[N];
};

ROPE_HD bool kept_runs(const NormPlan& plan, const NormItem& it) {
  return plan.units <= plan.block_x && it.head_end - it.head_begin == 1;
}

// A run of x for phase 2: the kept one, or read again.
template <typename scalar_t, int N, typename T, typename Access>
ROPE_HD void kept_or_load(bool from_kept, const T (&kept)[N], const scalar_t* x, int64_t stride,
                          T (&v)[N]) {
  if (!from_kept) return load_run<scalar_t, N, T, Access>(x, stride, v);
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) v[j] = kept[j];
}

// Phase 1: this lane's sum of x**2.
template <typename scalar_t, typename table_t, int N, typename Access>
ROPE_HD opmath_t<scalar_t> norm_forward_sum(const NormRopeProblem& np, const NormPlan& plan,
                                            const NormItem& it, int64_t lane,
                                            KeptRuns<opmath_t<scalar_t>, N>& kept) {
  using T = opmath_t<scalar_t>;
  const HeadsDesc& d = np.rope.x[it.i];
  T sum = T(0);
  for (int64_t head = it.head_begin; head < it.head_end; ++head) {
    const scalar_t* x = static_cast<const scalar_t*>(d.in) + it.b * d.in_stride_batch +
                        it.s * d.in_stride_seq + head * d.in_stride_head;
    for (int64_t unit = lane; unit < plan.units; unit += plan.block_x) {
      int64_t lo_off, hi_off;
      unit_offsets(unit, np.rope.pairs, N, np.rope.interleaved, lo_off, hi_off);
      // Both runs are loaded before either is summed: with the hi load behind the first
      // sum, the GPU waited for one load's data before it issued the other. A pass-through
      // run (no hi) loads its lo run twice rather than branch (as phase 2 and the backward).
      const int64_t hi_or_lo = hi_off >= 0 ? hi_off : lo_off;
      load_run<scalar_t, N, T, Access>(x + lo_off * d.in_stride_dim, d.in_stride_dim, kept.lo);
      load_run<scalar_t, N, T, Access>(x + hi_or_lo * d.in_stride_dim, d.in_stride_dim, kept.hi);
      ROPE_UNROLL
      for (int j = 0; j < N; ++j) sum += kept.lo[j] * kept.lo[j];
      if (hi_off >= 0) {
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) sum += kept.hi[j] * kept.hi[j];
      }
    }
  }
  return sum;
}

// Phase 2: normalize, scale, rotate, store; lane 0 keeps rstd.
template <typename scalar_t, typename table_t, int N, typename Access>
ROPE_HD void norm_forward_store(const NormRopeProblem& np, const NormPlan& plan, const NormItem& it,
                                int64_t lane, opmath_t<scalar_t> total,
                                const KeptRuns<opmath_t<scalar_t>, N>& kept) {
  using T = opmath_t<scalar_t>;
  const RopeProblem& p = np.rope;
  const HeadsDesc& d = p.x[it.i];
  const T r = inverse_rms(total, group_count(np, it), np.eps);
  if (lane == 0 && np.norm[it.i].rstd != nullptr) {
    const int64_t at = np.across_heads ? it.token : it.token * d.heads + it.head_begin;
    Access::template store<T, 1>(static_cast<T*>(np.norm[it.i].rstd) + at, Pack<T, 1>{{r}});
  }
  const bool from_kept = kept_runs(plan, it);
  for (int64_t head = it.head_begin; head < it.head_end; ++head) {
    const scalar_t* x = static_cast<const scalar_t*>(d.in) + it.b * d.in_stride_batch +
                        it.s * d.in_stride_seq + head * d.in_stride_head;
    scalar_t* y = static_cast<scalar_t*>(d.out) + it.b * d.out_stride_batch +
                  it.s * d.out_stride_seq + head * d.out_stride_head;
    for (int64_t unit = lane; unit < plan.units; unit += plan.block_x) {
      int64_t lo_off, hi_off;
      unit_offsets(unit, p.pairs, N, p.interleaved, lo_off, hi_off);
      // Every load is issued before any is used: one wait for L1, not three in a row. A
      // pass-through run (no hi) reads its lo runs in the hi runs' place, and no table.
      const int64_t hi_or_lo = hi_off >= 0 ? hi_off : lo_off;
      T lo[N], hi[N], w_lo[N], w_hi[N], c[N], sn[N];
      kept_or_load<scalar_t, N, T, Access>(from_kept, kept.lo, x + lo_off * d.in_stride_dim,
                                           d.in_stride_dim, lo);
      kept_or_load<scalar_t, N, T, Access>(from_kept, kept.hi, x + hi_or_lo * d.in_stride_dim,
                                           d.in_stride_dim, hi);
      scale_run<N, T, Access>(np, plan, it.i, head, lo_off, w_lo);
      scale_run<N, T, Access>(np, plan, it.i, head, hi_or_lo, w_hi);
      if (hi_off >= 0) {
        table_chunk<table_t, N, T, Access>(p, plan.table_vec > 1, it.b, it.s, unit * N, c, sn);
      }
      ROPE_UNROLL
      for (int j = 0; j < N; ++j) lo[j] = lo[j] * r * w_lo[j];
      if (hi_off >= 0) {
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) hi[j] = hi[j] * r * w_hi[j];
        rotate_chunk(lo, hi, c, sn, p.interleaved);
        store_run<scalar_t, N, T, Access>(y + hi_off * d.out_stride_dim, hi);
      }
      store_run<scalar_t, N, T, Access>(y + lo_off * d.out_stride_dim, lo);
    }
  }
}

// ---- backward: x[i].in is the output's gradient, x[i].out x's gradient ----

// u = R^T grad, n = x * rstd, dn = u * scale for one run (pair chunk or pass-through).
template <typename scalar_t, typename table_t, int N, typename Access>
ROPE_HD void backward_run(const NormRopeProblem& np, const NormPlan& plan, const NormItem& it,
                          int64_t head, int64_t unit, opmath_t<scalar_t> r,
                          opmath_t<scalar_t> (&dn_lo)[N], opmath_t<scalar_t> (&n_lo)[N],
                          opmath_t<scalar_t> (&dn_hi)[N], opmath_t<scalar_t> (&n_hi)[N],
                          int64_t& lo_off, int64_t& hi_off) {
  using T = opmath_t<scalar_t>;
  const RopeProblem& p = np.rope;
  const HeadsDesc& d = p.x[it.i];
  const NormDesc& nd = np.norm[it.i];
  const scalar_t* g = static_cast<const scalar_t*>(d.in) + it.b * d.in_stride_batch +
                      it.s * d.in_stride_seq + head * d.in_stride_head;
  const scalar_t* x = static_cast<const scalar_t*>(nd.x) + it.b * nd.x_stride_batch +
                      it.s * nd.x_stride_seq + head * nd.x_stride_head;
  unit_offsets(unit, p.pairs, N, p.interleaved, lo_off, hi_off);
  T w[N];
  // The four runs of the gradient and of x are loaded before any is used, so the GPU waits
  // for memory once per run, not once for the gradient and again for x. A pass-through run
  // (no hi) loads its lo runs twice rather than branch: with the hi loads behind a branch,
  // nvcc converted the lo runs before issuing them, which waits for the lo loads' data.
  const int64_t hi_or_lo = hi_off >= 0 ? hi_off : lo_off;
  load_run<scalar_t, N, T, Access>(g + lo_off * d.in_stride_dim, d.in_stride_dim, dn_lo);
  load_run<scalar_t, N, T, Access>(x + lo_off * nd.x_stride_dim, nd.x_stride_dim, n_lo);
  load_run<scalar_t, N, T, Access>(g + hi_or_lo * d.in_stride_dim, d.in_stride_dim, dn_hi);
  load_run<scalar_t, N, T, Access>(x + hi_or_lo * nd.x_stride_dim, nd.x_stride_dim, n_hi);
  if (hi_off >= 0) {
    T c[N], sn[N];
    table_chunk<table_t, N, T, Access>(p, plan.table_vec > 1, it.b, it.s, unit * N, c, sn);
    rotate_chunk(dn_lo, dn_hi, c, sn, p.interleaved);  // u (inverse: sin negated)
    scale_run<N, T, Access>(np, plan, it.i, head, hi_off, w);
    ROPE_UNROLL
    for (int j = 0; j < N; ++j) {
      n_hi[j] = n_hi[j] * r;
      dn_hi[j] = dn_hi[j] * w[j];
    }
  }
  scale_run<N, T, Access>(np, plan, it.i, head, lo_off, w);
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) {
    n_lo[j] = n_lo[j] * r;
    dn_lo[j] = dn_lo[j] * w[j];
  }
}

template <typename T>
ROPE_HD T item_rstd(const NormRopeProblem& np, const NormItem& it) {
  const T* rstd = static_cast<const T*>(np.norm[it.i].rstd);
  return np.across_heads ? rstd[it.token] : rstd[it.token * np.rope.x[it.i].heads + it.head_begin];
}

// Phase 1: this lane's sum of dn * n.
template <typename scalar_t, typename table_t, int N, typename Access>
ROPE_HD opmath_t<scalar_t> norm_backward_sum(const NormRopeProblem& np, const NormPlan& plan,
                                             const NormItem& it, int64_t lane) {
  using T = opmath_t<scalar_t>;
  const T r = item_rstd<T>(np, it);
  T sum = T(0);
  for (int64_t head = it.head_begin; head < it.head_end; ++head) {
    for (int64_t unit = lane; unit < plan.units; unit += plan.block_x) {
      T dn_lo[N], n_lo[N], dn_hi[N], n_hi[N];
      int64_t lo_off, hi_off;
      backward_run<scalar_t, table_t, N, Access>(np, plan, it, head, unit, r, dn_lo, n_lo, dn_hi,
                                                 n_hi, lo_off, hi_off);
      ROPE_UNROLL
      for (int j = 0; j < N; ++j) sum += dn_lo[j] * n_lo[j];
      if (hi_off >= 0) {
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) sum += dn_hi[j] * n_hi[j];
      }
    }
  }
  return sum;
}

// Phase 2: grad_x = rstd * (dn - n * mean(dn * n)).
template <typename scalar_t, typename table_t, int N, typename Access>
ROPE_HD void norm_backward_store(const NormRopeProblem& np, const NormPlan& plan,
                                 const NormItem& it, int64_t lane, opmath_t<scalar_t> total) {
  using T = opmath_t<scalar_t>;
  const HeadsDesc& d = np.rope.x[it.i];
  const T r = item_rstd<T>(np, it);
  const T mean = total / static_cast<T>(group_count(np, it));
  for (int64_t head = it.head_begin; head < it.head_end; ++head) {
    scalar_t* y = static_cast<scalar_t*>(d.out) + it.b * d.out_stride_batch +
                  it.s * d.out_stride_seq + head * d.out_stride_head;
    for (int64_t unit = lane; unit < plan.units; unit += plan.block_x) {
      T dn_lo[N], n_lo[N], dn_hi[N], n_hi[N];
      int64_t lo_off, hi_off;
      backward_run<scalar_t, table_t, N, Access>(np, plan, it, head, unit, r, dn_lo, n_lo, dn_hi,
                                                 n_hi, lo_off, hi_off);
      ROPE_UNROLL
      for (int j = 0; j < N; ++j) dn_lo[j] = r * (dn_lo[j] - n_lo[j] * mean);
      store_run<scalar_t, N, T, Access>(y + lo_off * d.out_stride_dim, dn_lo);
      if (hi_off >= 0) {
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) dn_hi[j] = r * (dn_hi[j] - n_hi[j] * mean);
        store_run<scalar_t, N, T, Access>(y + hi_off * d.out_stride_dim, dn_hi);
      }
    }
  }
}

// The scale's gradient, launch 1: thread `index` sums u * n of one scale element over
// one group of tokens (and every head, for a per-head scale), in token order.
template <typename scalar_t, typename table_t, typename Access>
ROPE_HD void scale_grad_partial(const NormRopeProblem& np, int64_t index) {
  using T = opmath_t<scalar_t>;
  const RopeProblem& p = np.rope;
  int i = 0;
  int64_t rest = index;
  if (rest >= np.groups * scale_size(np, 0)) {
    rest -= np.groups * scale_size(np, 0);
    i = 1;
    if (p.num_x < 2 || rest >= np.groups * scale_size(np, 1)) return;
  }
  const int64_t size = scale_size(np, i);
  const int64_t group = rest / size, j = rest - group * size;
  const HeadsDesc& d = p.x[i];
  const NormDesc& nd = np.norm[i];
  const int64_t D = d.head_dim;
  const int64_t e = j % D;  // the element within its head
  const int64_t head_begin = np.across_heads ? j / D : 0;
  const int64_t head_end = np.across_heads ? head_begin + 1 : d.heads;
  // e's pair and its partner: (lo, hi) slots of pair `pair`.
  int64_t pair = 0, lo = e, hi = e;
  if (e < 2 * p.pairs) {
    pair = p.interleaved ? e / 2 : (e < p.pairs ? e : e - p.pairs);
    chunk_offsets(pair, 1, p.pairs, p.interleaved, lo, hi);
  }
  const int64_t tokens = p.batch * p.seq;
  const int64_t tok_end =
      (group + 1) * np.tokens_per_group < tokens ? (group + 1) * np.tokens_per_group : tokens;
  const T* rstd = static_cast<const T*>(nd.rstd);
  T sum = T(0);
  for (int64_t tok = group * np.tokens_per_group; tok < tok_end; ++tok) {
    const int64_t b = tok / p.seq, s = tok - (tok / p.seq) * p.seq;
    T c[1] = {T(1)}, sn[1] = {T(0)};
    if (e < 2 * p.pairs) table_chunk<table_t, 1, T, Access>(p, false, b, s, pair, c, sn);
    for (int64_t head = head_begin; head < head_end; ++head) {
      const scalar_t* g = static_cast<const scalar_t*>(d.in) + b * d.in_stride_batch +
                          s * d.in_stride_seq + head * d.in_stride_head;
      const scalar_t* x = static_cast<const scalar_t*>(nd.x) + b * nd.x_stride_batch +
                          s * nd.x_stride_seq + head * nd.x_stride_head;
      T u_lo[1], u_hi[1], xv[1];
      load_run<scalar_t, 1, T, Access>(g + lo * d.in_stride_dim, d.in_stride_dim, u_lo);
      T u = u_lo[0];
      if (e < 2 * p.pairs) {
        load_run<scalar_t, 1, T, Access>(g + hi * d.in_stride_dim, d.in_stride_dim, u_hi);
        rotate_pair(u_lo[0], u_hi[0], c[0], sn[0]);
        u = e == lo ? u_lo[0] : u_hi[0];
      }
      load_run<scalar_t, 1, T, Access>(x + e * nd.x_stride_dim, nd.x_stride_dim, xv);
      const T r = np.across_heads ? rstd[tok] : rstd[tok * d.heads + head];
      sum += u * (xv[0] * r);
    }
  }
  Access::template store<T, 1>(static_cast<T*>(nd.scale_grad_partial) + group * size + j,
                               Pack<T, 1>{{sum}});
}

// Launch 2: thread `index` adds one scale element's partial sums in group order.
template <typename T, typename Access>
ROPE_HD void scale_grad_sum(const NormRopeProblem& np, int64_t index) {
  int i = 0;
  int64_t j = index;
  if (j >= scale_size(np, 0)) {
    j -= scale_size(np, 0);
    i = 1;
    if (np.rope.num_x < 2 || j >= scale_size(np, 1)) return;
  }
  const int64_t size = scale_size(np, i);
  const T* partial = static_cast<const T*>(np.norm[i].scale_grad_partial);
  T sum = T(0);
  for (int64_t g = 0; g < np.groups; ++g) sum += partial[g * size + j];
  Access::template store<T, 1>(static_cast<T*>(np.norm[i].scale_grad) + j, Pack<T, 1>{{sum}});
}

// The lanes' sums combined as a warp's butterfly (xor-shuffle) combines them: after
// the step of distance o, lane l holds v[l] + v[l ^ o]. The host executor calls this
// on the lanes' values; the GPU does the same additions with __shfl_xor_sync.
template <typename T>
inline void butterfly_host(T* v, int lanes) {
  T tmp[32];
  for (int o = lanes / 2; o > 0; o /= 2) {
    for (int l = 0; l < lanes; ++l) tmp[l] = v[l] + v[l ^ o];
    for (int l = 0; l < lanes; ++l) v[l] = tmp[l];
  }
}

// ---- the problem's dtypes to one Runner::run<scalar_t, table_t, N, MinBlocks> ----

template <typename scalar_t, typename Runner>
void norm_dispatch_table(const NormRopeProblem& np, const NormPlan& plan, Runner& runner) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  const auto go = [&](auto table_tag) {
    using table_t = decltype(table_tag);
    if (plan.vec == kVec) {
      if (plan.min_blocks == 4) return runner.template run<scalar_t, table_t, kVec, 4>(np, plan);
      return runner.template run<scalar_t, table_t, kVec, 0>(np, plan);
    }
    return runner.template run<scalar_t, table_t, 1, 0>(np, plan);
  };
  switch (np.rope.table_dtype) {
    case c10::ScalarType::Float:
      return go(float{});
    case c10::ScalarType::Double:
      return go(double{});
    default:  // x's own dtype (the adapter admits nothing else)
      if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
        return go(scalar_t{});
      }
  }
}

template <typename Runner>
NormPlan plan_and_run_norm(const NormRopeProblem& np, const LaunchConfig& cfg, int sm_count,
                           Runner& runner) {
  const NormPlan plan = plan_norm_launch(np, cfg, sm_count, c10::elementSize(np.rope.x_dtype),
                                         c10::elementSize(np.rope.table_dtype));
  visit_x_dtype(np.rope.x_dtype,
                [&](auto x_tag) { norm_dispatch_table<decltype(x_tag)>(np, plan, runner); });
  return plan;
}

}  // namespace rope::cuda
