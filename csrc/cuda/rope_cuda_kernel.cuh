// The CUDA kernel's body and its launch plan, compiled twice from this one source:
// by nvcc for the GPU (rope_cuda.cu wraps the body in a __global__ function), and
// by the host compiler for the CPU, where the host executor (rope_cuda_host.cpp)
// calls the body for every (block, thread) of the grid the plan chose. No index,
// vector or tail logic exists anywhere else, so every CI run executes the device
// code's logic without a GPU (docs/kernels.md, "The CUDA kernel on the host").
//
// Which grid serves which shape, and why:
//  - Work item = (token, group of heads). A thread row (threadIdx.y) takes one item,
//    threadIdx.x one 16-byte chunk of the pairs of every head in the group: it reads
//    its cos/sin chunk once per item and reuses it for all those heads of q and k.
//  - Prefill / training (many tokens): one item per token, all heads of q and k,
//    several tokens per block (block_y = block_threads / chunks per head), so a
//    Llama head_dim of 128 in bf16 (8 threads) packs 32 tokens into 256 threads.
//  - Decode (few tokens): token-only items cannot fill the SMs, so the heads are
//    split into groups and the grid becomes token x head-group items.
//  - The grid is capped at one wave (sm_count x max_blocks_per_sm blocks) and the
//    blocks stride over the items: a persistent grid, no launch sized by the input.
//  - Index arithmetic is 32-bit when every offset of the problem fits, 64-bit
//    otherwise; the only divisions are two per item, none per element.
// The thresholds sit in LaunchConfig, parsed from ROPE_EXT_CUDA_LAUNCH.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../rope_problem.h"

namespace rope::cuda {

// float64 x is computed in float64, every other dtype in float32.
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// N contiguous elements moved as one access: 16 bytes on the vector path.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The launch heuristics' thresholds (named, so one device call can sweep them).
struct LaunchConfig {
  int block_threads = 256;     // threads per block the plan aims at
  int max_blocks_per_sm = 8;   // persistent grid: at most this many blocks per SM
  int fill_blocks_per_sm = 2;  // split heads when token-only items give fewer blocks per SM
  int heads_per_item = 0;      // 0: chosen by the rule above; else forced
  int max_heads_per_item = 4;  // the rule's cap (0: none): token items of at most this many heads
  int index_bits = 0;          // 0: 32 where the problem fits, else 64; 32/64 forces (64 only)
  int sm_count = 0;            // 0: the device's; else assumed (tests of the grid-stride loop)
  int vectorize = 1;           // 0: always the scalar path
  int min_blocks = 4;          // 4: the vector kernel built for 4 resident blocks per SM; 0: not
  int prefetch = 0;            // 1: a thread hints the next head of its item into L2
  int norm_min_blocks = 0;     // the same for the fused QK-norm forward (64 registers, with spills)
  int norm_prefetch = 0;       // 1: the fused kernels hint each lane's next item into L2
};

// The vector kernel can be built with __launch_bounds__(kOccupancyThreads, 4): at most
// 64 registers, so 4 blocks of 256 threads fit an SM instead of 3 (more loads in flight).
constexpr int kOccupancyThreads = 256;

// What one launch does: the grid, the block, the vector width, the code path.
struct LaunchPlan {
  int64_t grid = 1;   // blocks (1-D); they stride over the items
  int block_x = 1;    // threads across one head's chunks
  int block_y = 1;    // items per block
  int vec = 1;        // elements of x per access (16 bytes' worth, or 1)
  int table_vec = 1;  // elements of cos/sin per access (1: element by element)
  bool index64 = false;
  int64_t heads_per_item = 1;  // all heads of q and k (token items) or fewer (token x head)
  int64_t groups = 1;          // items per token: ceil(heads / heads_per_item)
  int64_t items = 0;           // tokens * groups
  int min_blocks = 0;          // 0: the plain kernel; 4: the one built for 4 blocks per SM
  bool prefetch = false;       // each head's loads are preceded by a hint of the next head's
};

// ---- the plan: plain functions of the problem, the same on device and host ----

inline bool aligned_to(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// n-element runs of x need unit-stride head_dim, every other stride and both run
// starts a multiple of n, and n * element-size aligned base pointers.
inline bool x_vectorizes(const RopeProblem& p, int64_t n, int64_t elem_size) {
  if (p.pairs % n != 0) return false;
  for (int i = 0; i < p.num_x; ++i) {
    const HeadsDesc& d = p.x[i];
    if (d.in_stride_dim != 1 || d.out_stride_dim != 1 || d.head_dim % n != 0) return false;
    if (!aligned_to(d.in, n * elem_size) || !aligned_to(d.out, n * elem_size)) return false;
    for (int64_t st : {d.in_stride_batch, d.in_stride_seq, d.in_stride_head, d.out_stride_batch,
                       d.out_stride_seq, d.out_stride_head}) {
      if (st % n != 0) return false;
    }
  }
  return true;
}

// cos/sin in runs of min(n, 16 bytes) per access where every such access is aligned
// (unit-stride rows, aligned bases and row strides); else element by element (1).
inline int table_run(const RopeProblem& p, int n, int64_t table_elem_size) {
  const TableIndex& t = p.table;
  const int run =
      static_cast<int>(16 / table_elem_size) < n ? static_cast<int>(16 / table_elem_size) : n;
  if (run == 1 || t.cos_stride_pair != 1 || t.sin_stride_pair != 1) return 1;
  bool ok = aligned_to(p.cos, run * table_elem_size) && aligned_to(p.sin, run * table_elem_size);
  for (int64_t st : {t.cos_stride_batch, t.cos_stride_seq, t.cos_stride_row, t.sin_stride_batch,
                     t.sin_stride_seq, t.sin_stride_row}) {
    ok = ok && st % run == 0;
  }
  return ok ? run : 1;
}

// The largest offset (in elements) any access of the problem can form.
inline int64_t largest_offset(const RopeProblem& p) {
  const int64_t b1 = p.batch - 1, s1 = p.seq - 1;
  int64_t most = 0;
  const auto keep = [&](int64_t v) { most = v > most ? v : most; };
  for (int i = 0; i < p.num_x; ++i) {
    const HeadsDesc& d = p.x[i];
    // + head_dim: the tail loop's index may step one block past the last element.
    keep(b1 * d.in_stride_batch + s1 * d.in_stride_seq + (d.heads - 1) * d.in_stride_head +
         2 * d.head_dim * d.in_stride_dim);
    keep(b1 * d.out_stride_batch + s1 * d.out_stride_seq + (d.heads - 1) * d.out_stride_head +
         2 * d.head_dim * d.out_stride_dim);
  }
  const TableIndex& t = p.table;
  keep(b1 * t.pos_stride_batch + s1 * t.pos_stride_seq);
  keep(b1 * t.cos_stride_batch + s1 * t.cos_stride_seq + t.rows * t.cos_stride_row +
       p.pairs * t.cos_stride_pair);
  keep(b1 * t.sin_stride_batch + s1 * t.sin_stride_seq + t.rows * t.sin_stride_row +
       p.pairs * t.sin_stride_pair);
  return most;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

ROPE_HD int64_t total_heads(const RopeProblem& p) {
  return p.x[0].heads + (p.num_x > 1 ? p.x[1].heads : 0);
}

// elem_size / table_elem_size: bytes of one element of x and of cos/sin.
inline LaunchPlan plan_launch(const RopeProblem& p, const LaunchConfig& cfg, int sm_count,
                              int64_t elem_size, int64_t table_elem_size) {
  LaunchPlan plan;
  const int64_t vec = 16 / elem_size;
  plan.vec = (cfg.vectorize != 0 && x_vectorizes(p, vec, elem_size)) ? static_cast<int>(vec) : 1;
  plan.table_vec = table_run(p, plan.vec, table_elem_size);

  // Threads across a head: enough for its chunks of pairs, or its pass-through tail.
  int64_t max_dim = p.x[0].head_dim;
  if (p.num_x > 1 && p.x[1].head_dim > max_dim) max_dim = p.x[1].head_dim;
  const int64_t chunks = p.pairs / plan.vec;
  const int64_t tail_chunks = (max_dim - 2 * p.pairs + plan.vec - 1) / plan.vec;
  const int64_t threads = cfg.block_threads < 1 ? 1 : cfg.block_threads;
  const int64_t bx = pow2_at_least(chunks > tail_chunks ? chunks : tail_chunks);
  plan.block_x = static_cast<int>(bx < threads ? bx : threads);
  const int64_t by = threads / plan.block_x;
  plan.block_y = static_cast<int>(by < 1 ? 1 : by);

  const int64_t tokens = p.batch * p.seq;
  const int64_t heads = total_heads(p);
  const int64_t sms = cfg.sm_count > 0 ? cfg.sm_count : (sm_count > 0 ? sm_count : 1);
  if (cfg.heads_per_item > 0) {
    plan.heads_per_item = cfg.heads_per_item < heads ? cfg.heads_per_item : heads;
  } else {
    const int64_t token_blocks = ceil_div(tokens, plan.block_y);
    const int64_t want_blocks = sms * cfg.fill_blocks_per_sm;
    if (token_blocks >= want_blocks || heads <= 1) {
      // Enough tokens: an item holds the token's heads, up to the cap (smaller items even
      // out the last wave of the persistent grid; each re-reads the token's cos/sin chunk).
      const int64_t cap = cfg.max_heads_per_item;
      plan.heads_per_item = cap > 0 && cap < heads ? cap : heads;
    } else {
      const int64_t splits = ceil_div(want_blocks, token_blocks);
      plan.heads_per_item = ceil_div(heads, splits < heads ? splits : heads);
    }
  }
  if (plan.heads_per_item < 1) plan.heads_per_item = 1;
  plan.groups = ceil_div(heads, plan.heads_per_item);
  plan.items = tokens * plan.groups;
  // Few items: no more item rows per block than there are items.
  if (plan.items < plan.block_y) plan.block_y = static_cast<int>(plan.items < 1 ? 1 : plan.items);
  const int64_t blocks = ceil_div(plan.items, plan.block_y);
  const int64_t cap = sms * (cfg.max_blocks_per_sm < 1 ? 1 : cfg.max_blocks_per_sm);
  plan.grid = blocks < cap ? blocks : cap;
  if (plan.grid < 1) plan.grid = 1;

  // 32-bit indices when every offset and the item loop (item + stride) fit.
  const int64_t stride = plan.grid * plan.block_y;
  const int64_t int32_max = std::numeric_limits<int32_t>::max();
  plan.index64 = cfg.index_bits == 64 || largest_offset(p) >= int32_max ||
                 plan.items + stride >= int32_max || tokens >= int32_max;
  plan.prefetch = cfg.prefetch == 1;
  // The 64-register build exists for the 32-bit vector path only.
  plan.min_blocks = cfg.min_blocks == 4 && plan.vec > 1 && !plan.index64 &&
                            plan.block_x * plan.block_y <= kOccupancyThreads
                        ? 4
                        : 0;
  return plan;
}

// Head h of token (b, s): q's heads first, then k's (h - heads0). Where it is read
// from and written to, and the head_dim strides.
template <typename scalar_t, typename Index>
struct HeadView {
  const scalar_t* x;
  scalar_t* y;
  Index stride_in, stride_out, head_dim;  // head_dim strides
  bool in_place;

  ROPE_HD HeadView(const RopeProblem& p, Index heads0, Index h, Index b, Index s) {
    const bool is_q = h < heads0;
    const HeadsDesc& d = is_q ? p.x[0] : p.x[1];
    const Index hh = is_q ? h : h - heads0;
    x = static_cast<const scalar_t*>(d.in) + b * static_cast<Index>(d.in_stride_batch) +
        s * static_cast<Index>(d.in_stride_seq) + hh * static_cast<Index>(d.in_stride_head);
    y = static_cast<scalar_t*>(d.out) + b * static_cast<Index>(d.out_stride_batch) +
        s * static_cast<Index>(d.out_stride_seq) + hh * static_cast<Index>(d.out_stride_head);
    stride_in = static_cast<Index>(d.in_stride_dim);
    stride_out = static_cast<Index>(d.out_stride_dim);
    head_dim = static_cast<Index>(d.head_dim);
    in_place = d.in == d.out;
  }
};

// ---- the body: what thread (tx, ty) of block `block` does ----
//
// Access moves memory: plain loads and stores on the GPU; on the host, loads and
// stores that assert alignment and count every element stored.

// The widest run of cos/sin one access may move next to an x run of N elements.
template <typename table_t, int N>
constexpr int kTableRun =
    16 / static_cast<int>(sizeof(table_t)) < N ? 16 / static_cast<int>(sizeof(table_t)) : N;

// cos/sin of pairs [i0, i0 + N) of one table row, sin times `sign` (-1 for the inverse):
// runs of kTableRun elements where the rows allow (table_runs: aligned, unit stride), else
// element by element at t's pair strides. The rotation and the fused norm kernels load
// their table chunks through this one function.
template <typename table_t, int N, typename T, typename Access, typename Index>
ROPE_HD void load_table_chunk(const TableIndex& t, const table_t* cos_row, const table_t* sin_row,
                              Index i0, bool table_runs, T sign, T (&c)[N], T (&sn)[N]) {
  constexpr int TN = kTableRun<table_t, N>;
  if (table_runs) {
    ROPE_UNROLL
    for (int j = 0; j < N; j += TN) {
      const Pack<table_t, TN> cp = Access::template load<table_t, TN>(cos_row + i0 + j);
      const Pack<table_t, TN> sp = Access::template load<table_t, TN>(sin_row + i0 + j);
      ROPE_UNROLL
      for (int u = 0; u < TN; ++u) {
        c[j + u] = static_cast<T>(cp.v[u]);
        sn[j + u] = sign * static_cast<T>(sp.v[u]);
      }
    }
    return;
  }
  const Index cos_stride_pair = static_cast<Index>(t.cos_stride_pair),
              sin_stride_pair = static_cast<Index>(t.sin_stride_pair);
  ROPE_UNROLL
  for (int j = 0; j < N; ++j) {
    c[j] = static_cast<T>(
        Access::template load<table_t, 1>(cos_row + (i0 + j) * cos_stride_pair).v[0]);
    sn[j] =
        sign * static_cast<T>(
                   Access::template load<table_t, 1>(sin_row + (i0 + j) * sin_stride_pair).v[0]);
  }
}

template <typename scalar_t, typename table_t, int N, typename Index, typename Access>
ROPE_HD void rope_thread(const RopeProblem& p, const LaunchPlan& plan, Index block, Index tx,
                         Index ty) {
  using T = opmath_t<scalar_t>;
  // plan.table_vec is kTableRun (aligned unit-stride rows) or 1: uniform over the launch.
  const bool table_runs = plan.table_vec > 1;
  const TableIndex& t = p.table;
  const Index seq = static_cast<Index>(p.seq);
  const Index pairs = static_cast<Index>(p.pairs);
  const Index chunks = pairs / N;
  const Index heads0 = static_cast<Index>(p.x[0].heads);
  const Index heads = heads0 + static_cast<Index>(p.num_x > 1 ? p.x[1].heads : 0);
  const Index groups = static_cast<Index>(plan.groups);
  const Index per_item = static_cast<Index>(plan.heads_per_item);
  const Index items = static_cast<Index>(plan.items);
  const Index stride = static_cast<Index>(plan.grid) * plan.block_y;
  const bool has_positions = t.pos32 != nullptr || t.pos64 != nullptr;
  const T sign = p.inverse ? T(-1) : T(1);

  for (Index item = block * plan.block_y + ty; item < items; item += stride) {
    const Index token = item / groups;
    const Index group = item - token * groups;
    const Index b = token / seq;
    const Index s = token - b * seq;
    const Index h_begin = group * per_item;
    const Index h_end = h_begin + per_item < heads ? h_begin + per_item : heads;

    // Without a device sync the range cannot be checked before launch: a token
    // whose position lies outside the table (and not computed) reads nothing and
    // comes out NaN.
    const int64_t pos = has_positions ? token_position(t, b, s) : 0;
    const bool in_table = !has_positions || (pos >= 0 && pos < t.rows);
    // Past the table with inv_freq: the row cos_sin_table would hold, computed here.
    const bool computed =
        !in_table && t.inv_freq != nullptr && pos >= 0 && pos < kMaxComputedPosition;
    const Index row = in_table ? static_cast<Index>(pos) : 0;
    const table_t* cos_row = static_cast<const table_t*>(p.cos) +
                             (in_table ? b * static_cast<Index>(t.cos_stride_batch) +
                                             s * static_cast<Index>(t.cos_stride_seq) +
                                             row * static_cast<Index>(t.cos_stride_row)
                                       : 0);
    const table_t* sin_row = static_cast<const table_t*>(p.sin) +
                             (in_table ? b * static_cast<Index>(t.sin_stride_batch) +
                                             s * static_cast<Index>(t.sin_stride_seq) +
                                             row * static_cast<Index>(t.sin_stride_row)
                                       : 0);

    for (Index chunk = tx; chunk < chunks; chunk += plan.block_x) {
      const Index i0 = chunk * N;
      // This chunk's cos/sin: read once, reused for every head of the item.
      T c[N], sn[N];
      if (in_table) {
        load_table_chunk<table_t, N, T, Access>(t, cos_row, sin_row, i0, table_runs, sign, c, sn);
      } else if (computed) {
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) {
          double cos_value, sin_value;
          computed_row_value(t, pos, i0 + j, cos_value, sin_value);
          c[j] = static_cast<T>(static_cast<table_t>(cos_value));
          sn[j] = sign * static_cast<T>(static_cast<table_t>(sin_value));
        }
      } else {
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) c[j] = sn[j] = std::numeric_limits<T>::quiet_NaN();
      }
      int64_t lo64, hi64;
      chunk_offsets(i0, N, pairs, p.interleaved, lo64, hi64);
      const Index lo_off = static_cast<Index>(lo64), hi_off = static_cast<Index>(hi64);

      for (Index h = h_begin; h < h_end; ++h) {
        const HeadView<scalar_t, Index> v(p, heads0, h, b, s);
        if (plan.prefetch && h + 1 < h_end) {
          // The next head's runs into L2 (a hint, no register): its loads, issued only after
          // this head's stores, then wait on L2 instead of DRAM (launch setting prefetch=1).
          const HeadView<scalar_t, Index> next(p, heads0, h + 1, b, s);
          Access::prefetch(next.x + lo_off * next.stride_in);
          Access::prefetch(next.x + hi_off * next.stride_in);
        }
        // N > 1 only with unit-stride head_dim (x_vectorizes), so the dim stride is 1 there.
        const Pack<scalar_t, N> lo_in =
            Access::template load<scalar_t, N>(v.x + lo_off * v.stride_in);
        const Pack<scalar_t, N> hi_in =
            Access::template load<scalar_t, N>(v.x + hi_off * v.stride_in);
        T lo[N], hi[N];
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) {
          lo[j] = static_cast<T>(lo_in.v[j]);
          hi[j] = static_cast<T>(hi_in.v[j]);
        }
        rotate_chunk(lo, hi, c, sn, p.interleaved);
        Pack<scalar_t, N> lo_out, hi_out;
        ROPE_UNROLL
        for (int j = 0; j < N; ++j) {
          lo_out.v[j] = static_cast<scalar_t>(lo[j]);
          hi_out.v[j] = static_cast<scalar_t>(hi[j]);
        }
        Access::template store<scalar_t, N>(v.y + lo_off * v.stride_out, lo_out);
        Access::template store<scalar_t, N>(v.y + hi_off * v.stride_out, hi_out);
      }
    }

    // x[r:] of the functional op is copied; in place it already is where it belongs.
    for (Index h = h_begin; h < h_end; ++h) {
      const HeadView<scalar_t, Index> v(p, heads0, h, b, s);
      if (v.in_place) continue;
      for (Index e = 2 * pairs + tx * N; e < v.head_dim; e += plan.block_x * N) {
        Access::template store<scalar_t, N>(
            v.y + e * v.stride_out, Access::template load<scalar_t, N>(v.x + e * v.stride_in));
      }
    }
  }
}

// ---- from the problem's dtypes and the plan to one instantiation ----
//
// Runner::template run<scalar_t, table_t, N, Index, MinBlocks>(problem, plan) launches it (on
// the GPU) or executes it (on the host). The adapter admits float32, float64 and
// x's own dtype for the table, so only those are instantiated.

template <typename scalar_t, typename table_t, typename Runner>
void dispatch_vec(const RopeProblem& p, const LaunchPlan& plan, Runner& runner) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  if (plan.vec == kVec) {
    if (plan.index64) return runner.template run<scalar_t, table_t, kVec, int64_t, 0>(p, plan);
    if (plan.min_blocks == 4)
      return runner.template run<scalar_t, table_t, kVec, int32_t, 4>(p, plan);
    return runner.template run<scalar_t, table_t, kVec, int32_t, 0>(p, plan);
  }
  if (plan.index64) return runner.template run<scalar_t, table_t, 1, int64_t, 0>(p, plan);
  return runner.template run<scalar_t, table_t, 1, int32_t, 0>(p, plan);
}

template <typename scalar_t, typename Runner>
void dispatch_table(const RopeProblem& p, const LaunchPlan& plan, Runner& runner) {
  switch (p.table_dtype) {
    case c10::ScalarType::Float:
      return dispatch_vec<scalar_t, float>(p, plan, runner);
    case c10::ScalarType::Double:
      return dispatch_vec<scalar_t, double>(p, plan, runner);
    default:  // the table has x's dtype (the adapter admits nothing else)
      if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
        return dispatch_vec<scalar_t, scalar_t>(p, plan, runner);
      }
  }
}

// Calls fn(scalar_t{}) with the C++ type of x's dtype, one the adapter admits
// (float32, float64, bfloat16, float16).
template <typename Fn>
void visit_x_dtype(c10::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return fn(float{});
    case c10::ScalarType::Double:
      return fn(double{});
    case c10::ScalarType::BFloat16:
      return fn(c10::BFloat16{});
    default:
      return fn(c10::Half{});
  }
}

// Plans the launch and hands the matching instantiation to the runner.
template <typename Runner>
LaunchPlan plan_and_run(const RopeProblem& p, const LaunchConfig& cfg, int sm_count,
                        Runner& runner) {
  const LaunchPlan plan =
      plan_launch(p, cfg, sm_count, c10::elementSize(p.x_dtype), c10::elementSize(p.table_dtype));
  visit_x_dtype(p.x_dtype, [&](auto x_tag) { dispatch_table<decltype(x_tag)>(p, plan, runner); });
  return plan;
}

// Parses "key=value,key=value" (keys: the LaunchConfig fields) over `cfg`.
// Returns an empty string, or what is wrong with `spec`.
std::string parse_launch_config(const std::string& spec, LaunchConfig& cfg);

}  // namespace rope::cuda
