// Input checks and the translation of tensors into a RopeProblem.
//
// Every rejection names the argument and says what to pass instead: dtype
// problems raise TypeError, everything else ValueError (docs/api.md section 8).
#include "rope_adapter.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

namespace rope {

bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "rope: ", name,
                   " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 3, "rope: ", name,
                    " must be 4-D [batch, seq, heads, head_dim] or 3-D [tokens, heads, head_dim],"
                    " got shape ",
                    x.sizes());
}

void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* xname,
                       const char* tname) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "rope: ", tname, " is on ", t.device(), " but ",
                    xname, " is on ", x.device(), "; move ", tname, " to ", x.device());
}

namespace {
// x seen as [batch, seq, heads, head_dim]: thd is one sequence of `tokens`.
HeadsDesc describe(const at::Tensor& x, const at::Tensor& out) {
  HeadsDesc h;
  h.in = x.const_data_ptr();
  h.out = out.data_ptr();
  const int o = x.dim() == 4 ? 1 : 0;
  h.heads = x.size(o + 1);
  h.head_dim = x.size(o + 2);
  h.in_stride_batch = o ? x.stride(0) : 0;
  h.in_stride_seq = x.stride(o);
  h.in_stride_head = x.stride(o + 1);
  h.in_stride_dim = x.stride(o + 2);
  h.out_stride_batch = o ? out.stride(0) : 0;
  h.out_stride_seq = out.stride(o);
  h.out_stride_head = out.stride(o + 1);
  h.out_stride_dim = out.stride(o + 2);
  return h;
}

const char* const* arg_names(int num_x) {
  static const char* names[2][2] = {{"x", "x"}, {"q", "k"}};
  return names[num_x - 1];
}
}  // namespace

// Every check of a call's arguments but x's own (check_x, made before any output is
// allocated). xs: the tensors to rotate (q alone, or q and k).
void check_arguments(const at::Tensor* xs, int num_x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  const char* const* name = arg_names(num_x);
  const at::Tensor& x = xs[0];
  if (num_x == 2) {
    const at::Tensor& k = xs[1];
    TORCH_CHECK_TYPE(k.scalar_type() == x.scalar_type(),
                     "rope: q and k must have the same dtype,"
                     " got q ",
                     x.scalar_type(), " and k ", k.scalar_type());
    check_same_device(x, k, "q", "k");
    TORCH_CHECK_VALUE(
        k.dim() == x.dim() && k.sizes().slice(0, x.dim() - 2) == x.sizes().slice(0, x.dim() - 2),
        "rope: q and k must have the same leading (token) dimensions, got q ", x.sizes(), " and k ",
        k.sizes());
  }
  const bool thd = x.dim() == 3;
  const int64_t batch = thd ? 1 : x.size(0);
  const int64_t seq = thd ? x.size(0) : x.size(1);

  TORCH_CHECK_TYPE(cos.scalar_type() == sin.scalar_type(),
                   "rope: cos and sin must have the same"
                   " dtype, got cos ",
                   cos.scalar_type(), " and sin ", sin.scalar_type());
  const auto tdt = cos.scalar_type();
  TORCH_CHECK_TYPE(tdt == at::kFloat || tdt == at::kDouble || tdt == x.scalar_type(),
                   "rope: cos must be float32, float64 or x's dtype (", x.scalar_type(), "), got ",
                   tdt);
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes(),
                    "rope: cos and sin must have the same shape, got"
                    " cos ",
                    cos.sizes(), " and sin ", sin.sizes());
  check_same_device(x, cos, name[0], "cos");
  check_same_device(x, sin, name[0], "sin");
  TORCH_CHECK_VALUE(cos.dim() == 2 || cos.dim() == 3,
                    "rope: cos must be [positions, rotary_dim/2]"
                    ", [batch, seq, rotary_dim/2] or [seq, rotary_dim/2], got shape ",
                    cos.sizes());
  const int64_t pairs = cos.size(-1);
  for (int i = 0; i < num_x; ++i) {
    TORCH_CHECK_VALUE(2 * pairs <= xs[i].size(-1),
                      "rope: the rotary dimension 2 * cos.size(-1) = ", 2 * pairs, " exceeds ",
                      name[i], "'s head_dim ", xs[i].size(-1),
                      "; pass a table with at most head_dim / 2 columns");
  }

  if (positions.has_value()) {
    const at::Tensor& pos = *positions;
    TORCH_CHECK_TYPE(pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong,
                     "rope: positions must be int32 or int64, got ", pos.scalar_type());
    check_same_device(x, pos, name[0], "positions");
    TORCH_CHECK_VALUE(cos.dim() == 2,
                      "rope: with positions, cos and sin must be a table "
                      "[positions, rotary_dim/2], got cos of shape ",
                      cos.sizes(), "; pass positions=None for a per-token table");
    if (thd) {
      TORCH_CHECK_VALUE(pos.dim() == 1 && pos.size(0) == seq,
                        "rope: for x of shape [tokens, "
                        "heads, head_dim] = ",
                        x.sizes(), ", positions must be [tokens] = [", seq, "], got shape ",
                        pos.sizes());
    } else {
      const bool ok =
          (pos.dim() == 1 && pos.size(0) == seq) ||
          (pos.dim() == 2 && (pos.size(0) == batch || pos.size(0) == 1) && pos.size(1) == seq);
      TORCH_CHECK_VALUE(ok, "rope: for x of shape [batch, seq, heads, head_dim] = ", x.sizes(),
                        ", positions must be [", batch, ", ", seq, "], [1, ", seq, "] or [", seq,
                        "], got shape ", pos.sizes());
    }
    if (inv_freq.has_value()) {
      const at::Tensor& f = *inv_freq;
      TORCH_CHECK_TYPE(f.scalar_type() == at::kDouble,
                       "rope: inv_freq must be float64 (the "
                       "exact frequencies of rope_frequencies), got ",
                       f.scalar_type());
      check_same_device(x, f, name[0], "inv_freq");
      TORCH_CHECK_VALUE(f.dim() == 1 && f.size(0) == pairs && (f.size(0) <= 1 || f.stride(0) == 1),
                        "rope: inv_freq must be a contiguous [rotary_dim/2] = [", pairs,
                        "] tensor, got shape ", f.sizes());
      TORCH_CHECK_VALUE(std::isfinite(attention_factor) && attention_factor > 0,
                        "rope: attention_factor must be a positive finite number, got ",
                        attention_factor);
    }
    return;
  }
  TORCH_CHECK_VALUE(!inv_freq.has_value(),
                    "rope: inv_freq computes the rows of positions past "
                    "the table, so it needs positions: pass them");
  if (cos.dim() == 2) {
    TORCH_CHECK_VALUE(!thd,
                      "rope: x of shape [tokens, heads, head_dim] is packed, so positions "
                      "is required: pass each token's position");
    TORCH_CHECK_VALUE(cos.size(0) >= seq,
                      "rope: without positions, token s uses row s of cos, "
                      "but cos has ",
                      cos.size(0), " rows and x has seq ", seq,
                      "; build a longer table or pass positions");
  } else {
    TORCH_CHECK_VALUE(!thd,
                      "rope: x of shape [tokens, heads, head_dim] is packed, so positions "
                      "is required and cos must be [positions, rotary_dim/2]");
    TORCH_CHECK_VALUE((cos.size(0) == batch || cos.size(0) == 1) && cos.size(1) == seq,
                      "rope: a per-token cos must be [", batch, ", ", seq,
                      ", rotary_dim/2] or [1, ", seq, ", rotary_dim/2] for x of shape ", x.sizes(),
                      ", got ", cos.sizes());
  }
}

// The checked call as a RopeProblem: pointers, sizes and strides, for the kernels.
// outs: where the results go (the xs themselves, in place).
RopeProblem describe_problem(const at::Tensor* xs, const at::Tensor* outs, int num_x,
                             const at::Tensor& cos, const at::Tensor& sin,
                             const std::optional<at::Tensor>& positions, bool interleaved,
                             bool inverse, const std::optional<at::Tensor>& inv_freq,
                             double attention_factor) {
  const at::Tensor& x = xs[0];
  const bool thd = x.dim() == 3;
  RopeProblem p;
  p.batch = thd ? 1 : x.size(0);
  p.seq = thd ? x.size(0) : x.size(1);
  p.pairs = cos.size(-1);
  p.interleaved = interleaved;
  p.inverse = inverse;
  p.x_dtype = x.scalar_type();
  p.table_dtype = cos.scalar_type();
  p.cos = cos.const_data_ptr();
  p.sin = sin.const_data_ptr();
  p.num_x = num_x;
  for (int i = 0; i < num_x; ++i) p.x[i] = describe(xs[i], outs[i]);

  TableIndex& t = p.table;
  t.cos_stride_pair = cos.stride(-1);
  t.sin_stride_pair = sin.stride(-1);
  t.rows = cos.size(0);
  if (positions.has_value()) {  // a [P, r/2] table, rows picked by positions
    const at::Tensor& pos = *positions;
    if (pos.scalar_type() == at::kInt) {
      t.pos32 = pos.const_data_ptr<int32_t>();
    } else {
      t.pos64 = pos.const_data_ptr<int64_t>();
    }
    t.pos_stride_seq = pos.stride(-1);
    t.pos_stride_batch = (pos.dim() == 2 && pos.size(0) > 1) ? pos.stride(0) : 0;
    t.cos_stride_row = cos.stride(0);
    t.sin_stride_row = sin.stride(0);
    if (inv_freq.has_value()) {
      t.inv_freq = inv_freq->const_data_ptr<double>();
      t.attention = attention_factor;
    }
  } else if (cos.dim() == 2) {  // [P >= seq, r/2]: row s for token s
    t.cos_stride_seq = cos.stride(0);
    t.sin_stride_seq = sin.stride(0);
  } else {  // [batch | 1, seq, r/2]: one row per token
    t.cos_stride_batch = cos.size(0) == 1 ? 0 : cos.stride(0);
    t.sin_stride_batch = sin.size(0) == 1 ? 0 : sin.stride(0);
    t.cos_stride_seq = cos.stride(1);
    t.sin_stride_seq = sin.stride(1);
  }
  return p;
}

namespace {
// The one entry of the four ops: every check, then the description.
RopeProblem make_problem(const at::Tensor* xs, const at::Tensor* outs, int num_x,
                         const at::Tensor& cos, const at::Tensor& sin,
                         const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                         const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  check_arguments(xs, num_x, cos, sin, positions, inv_freq, attention_factor);
  return describe_problem(xs, outs, num_x, cos, sin, positions, interleaved, inverse, inv_freq,
                          attention_factor);
}
}  // namespace

// True when no two indices of x can reach the same element: with the dims of
// size > 1 sorted by stride, each stride steps past everything the smaller
// ones span. That holds for every slice and transpose of a dense tensor (a q
// cut from a fused qkv included) and fails for expand and hand-made overlaps.
namespace {
bool provably_non_overlapping(const at::Tensor& x) {
  if (x.numel() == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // largest offset reachable with the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += (size - 1) * stride;
  }
  return true;
}
}  // namespace

void check_writable(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(provably_non_overlapping(x), "rope: in-place rotation needs ", name,
                    " whose elements do not overlap, got strides ", x.strides(), " for shape ",
                    x.sizes(), " (e.g. from expand); use the functional op or pass ", name,
                    ".contiguous()");
}

// Whether q and k may share an element: is there an index a of q and b of k
// with q_off + a.q_stride = k_off + b.k_stride? Dims with the same stride in
// both (batch, seq, head_dim of slices of one fused qkv buffer) are searched
// digit by digit from the largest stride, keeping only the steps the smaller
// dims can still make up; the rest (heads, when q and k have different
// head_dims) are taken as the whole interval they span, which can only err
// towards "shared". Given up (answered "shared") past a budget, for exotic strides.
bool may_share_elements(const at::Tensor& q, const at::Tensor& k) {
  if (q.numel() == 0 || k.numel() == 0 || !q.is_alias_of(k)) return false;
  if (q.dim() != k.dim()) return true;
  struct Dim {
    int64_t stride, q_size, k_size;
  };
  std::vector<Dim> dims;
  int64_t q_span = 0, k_span = 0;  // extents of the dims whose strides differ
  for (int64_t d = 0; d < q.dim(); ++d) {
    if (q.stride(d) == k.stride(d)) {
      if (q.stride(d) > 0) dims.push_back({q.stride(d), q.size(d), k.size(d)});
    } else {
      q_span += (q.size(d) - 1) * q.stride(d);
      k_span += (k.size(d) - 1) * k.stride(d);
    }
  }
  std::sort(dims.begin(), dims.end(),
            [](const Dim& a, const Dim& b) { return a.stride > b.stride; });
  // reach_lo[i], reach_hi[i]: the range of sum_{j >= i} (a_j - b_j) * stride_j.
  std::vector<int64_t> reach_lo(dims.size() + 1, 0), reach_hi(dims.size() + 1, 0);
  for (int64_t i = static_cast<int64_t>(dims.size()) - 1; i >= 0; --i) {
    reach_lo[i] = reach_lo[i + 1] - (dims[i].k_size - 1) * dims[i].stride;
    reach_hi[i] = reach_hi[i + 1] + (dims[i].q_size - 1) * dims[i].stride;
  }
  int64_t budget = 4096;
  const auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && (a < 0)); };
  const auto ceil_div = [&](int64_t a, int64_t b) { return -floor_div(-a, b); };
  // Is sum_{j >= i} (a_j - b_j) * stride_j in [lo, hi] for some digits?
  std::function<bool(size_t, int64_t, int64_t)> search = [&](size_t i, int64_t lo,
                                                             int64_t hi) -> bool {
    if (--budget < 0) return true;
    if (i == dims.size()) return lo <= 0 && 0 <= hi;
    const Dim& d = dims[i];
    const int64_t first = std::max(-(d.k_size - 1), ceil_div(lo - reach_hi[i + 1], d.stride));
    const int64_t last = std::min(d.q_size - 1, floor_div(hi - reach_lo[i + 1], d.stride));
    for (int64_t step = first; step <= last; ++step) {
      if (search(i + 1, lo - step * d.stride, hi - step * d.stride)) return true;
    }
    return false;
  };
  // q_off + sum(a s) + x = k_off + sum(b s) + y, x in [0, q_span], y in [0, k_span].
  const int64_t delta = k.storage_offset() - q.storage_offset();
  return search(0, delta - q_span, delta + k_span);
}

bool empty(const RopeProblem& p) { return p.batch == 0 || p.seq == 0; }

at::Tensor apply(Kernel kernel, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                 const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  check_x(x, "x");
  // The layout rule the fake kernel mirrors: torch.empty_like(x).
  at::Tensor out = at::empty_like(x);
  const RopeProblem p = make_problem(&x, &out, 1, cos, sin, positions, interleaved, inverse,
                                     inv_freq, attention_factor);
  if (!empty(p)) kernel(p);
  return out;
}

void apply_(Kernel kernel, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
            const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
            const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  check_x(x, "x");
  const RopeProblem p = make_problem(&x, &x, 1, cos, sin, positions, interleaved, inverse, inv_freq,
                                     attention_factor);
  check_writable(x, "x");
  if (!empty(p)) kernel(p);
}

std::tuple<at::Tensor, at::Tensor> apply_qk(Kernel kernel, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            const std::optional<at::Tensor>& positions,
                                            bool interleaved, bool inverse,
                                            const std::optional<at::Tensor>& inv_freq,
                                            double attention_factor) {
  check_x(q, "q");
  check_x(k, "k");
  const at::Tensor xs[2] = {q, k};
  const at::Tensor outs[2] = {at::empty_like(q), at::empty_like(k)};
  const RopeProblem p = make_problem(xs, outs, 2, cos, sin, positions, interleaved, inverse,
                                     inv_freq, attention_factor);
  if (!empty(p)) kernel(p);
  return {outs[0], outs[1]};
}

void apply_qk_(Kernel kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
               const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved,
               bool inverse, const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  check_x(q, "q");
  check_x(k, "k");
  const at::Tensor xs[2] = {q, k};
  const RopeProblem p = make_problem(xs, xs, 2, cos, sin, positions, interleaved, inverse, inv_freq,
                                     attention_factor);
  check_writable(q, "q");
  check_writable(k, "k");
  TORCH_CHECK_VALUE(!may_share_elements(q, k),
                    "rope: q and k share elements; rotating them in "
                    "place would rotate those twice. Pass disjoint views (q and k sliced from one "
                    "fused qkv buffer are fine) or use the functional op");
  if (!empty(p)) kernel(p);
}

}  // namespace rope
