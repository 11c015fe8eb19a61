// Input checks and the translation of tensors into a NormRopeProblem for the fused
// QK-RMSNorm + RoPE. The table, positions, q and k are checked as the rotation checks
// them (rope_adapter.cpp); this file adds the norm's weights, eps and saved state.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>

#include "rope_adapter.h"

namespace rope {
namespace {

// Tokens summed into one row of the scale gradient's partial sums: the rows are then
// added in order, so the gradient has the same bits on every run and thread count.
constexpr int64_t kTokensPerGroup = 16;

c10::ScalarType math_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The number of elements one norm group holds, and the weight size that goes with it.
int64_t weight_size(const at::Tensor& x, bool across_heads) {
  return across_heads ? x.size(-2) * x.size(-1) : x.size(-1);
}

void check_weight(const at::Tensor& x, const at::Tensor& w, const char* xname, const char* wname,
                  bool across_heads) {
  // None reaches a `Tensor` argument of the schema as an undefined tensor.
  TORCH_CHECK_TYPE(w.defined(), "rope: ", wname, " must be a tensor (the norm's weight), got None");
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == x.scalar_type() ||
                       (x.scalar_type() == at::kDouble && is_float_dtype(w.scalar_type())),
                   "rope: ", wname, " must be float32 or ", xname, "'s dtype (", x.scalar_type(),
                   "), got ", w.scalar_type());
  check_same_device(x, w, xname, wname);
  const int64_t want = weight_size(x, across_heads);
  if (across_heads) {
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == want, "rope: with across_heads=True, ", wname,
                      " must be [heads * head_dim] = [", x.size(-2), " * ", x.size(-1), "] = [",
                      want, "] (one weight per element of a token's ", xname, "), got shape ",
                      w.sizes());
  } else {
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == want, "rope: ", wname, " must be [head_dim] = [",
                      want,
                      "] (one weight per dimension of a head),"
                      " got shape ",
                      w.sizes(),
                      w.dim() == 1 && w.size(0) == x.size(-2) * x.size(-1)
                          ? "; for a norm over all heads of a token (OLMo 2) pass across_heads=True"
                          : "");
  }
}

void check_norm_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                          const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                          const at::Tensor& q_weight, const at::Tensor& k_weight, double eps,
                          bool across_heads, double weight_offset) {
  check_x(q, "q");
  check_x(k, "k");
  const at::Tensor xs[2] = {q, k};
  check_arguments(xs, 2, cos, sin, positions, std::nullopt, 1.0);
  TORCH_CHECK_VALUE(q.size(-1) == k.size(-1),
                    "rope: the fused norm needs q and k of the same "
                    "head_dim, got q ",
                    q.sizes(), " and k ", k.sizes());
  check_weight(q, q_weight, "q", "q_weight", across_heads);
  check_weight(k, k_weight, "k", "k_weight", across_heads);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0,
                    "rope: eps must be a positive finite number, "
                    "got ",
                    eps);
  TORCH_CHECK_VALUE(std::isfinite(weight_offset), "rope: weight_offset must be finite, got ",
                    weight_offset);
}

// weight + offset in the math type, contiguous: the factor the kernels multiply by.
at::Tensor scale_of(const at::Tensor& x, const at::Tensor& w, double weight_offset) {
  at::Tensor scale = w.to(math_dtype(x));
  if (weight_offset != 0.0) scale = scale + weight_offset;
  return scale.contiguous();
}

// rstd's shape: x's leading dims, then heads (per head) or 1 (across heads).
std::vector<int64_t> rstd_shape(const at::Tensor& x, bool across_heads) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  if (across_heads) shape.back() = 1;
  return shape;
}

NormRopeProblem describe_norm(const at::Tensor* xs, const at::Tensor* outs, const at::Tensor& cos,
                              const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                              bool interleaved, bool inverse, const at::Tensor* scales,
                              const at::Tensor* rstds, double eps, bool across_heads) {
  NormRopeProblem np;
  np.rope =
      describe_problem(xs, outs, 2, cos, sin, positions, interleaved, inverse, std::nullopt, 1.0);
  np.eps = eps;
  np.across_heads = across_heads;
  for (int i = 0; i < 2; ++i) {
    np.norm[i].scale = scales[i].const_data_ptr();
    np.norm[i].rstd = rstds[i].defined() ? rstds[i].data_ptr() : nullptr;
  }
  return np;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk(
    NormKernel kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, bool across_heads, double weight_offset,
    bool interleaved) {
  check_norm_arguments(q, k, cos, sin, positions, q_weight, k_weight, eps, across_heads,
                       weight_offset);
  const at::Tensor xs[2] = {q, k};
  const at::Tensor outs[2] = {at::empty_like(q), at::empty_like(k)};
  const at::Tensor scales[2] = {scale_of(q, q_weight, weight_offset),
                                scale_of(k, k_weight, weight_offset)};
  const at::Tensor rstds[2] = {
      at::empty(rstd_shape(q, across_heads), q.options().dtype(math_dtype(q))),
      at::empty(rstd_shape(k, across_heads), k.options().dtype(math_dtype(k)))};
  const NormRopeProblem np = describe_norm(xs, outs, cos, sin, positions, interleaved, false,
                                           scales, rstds, eps, across_heads);
  if (!empty(np.rope)) kernel(np);
  return {outs[0], outs[1], rstds[0], rstds[1]};
}

void rms_norm_rope_qk_(NormKernel kernel, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
                       const at::Tensor& k_weight, double eps, bool across_heads,
                       double weight_offset, bool interleaved) {
  check_norm_arguments(q, k, cos, sin, positions, q_weight, k_weight, eps, across_heads,
                       weight_offset);
  check_writable(q, "q");
  check_writable(k, "k");
  TORCH_CHECK_VALUE(!may_share_elements(q, k),
                    "rope: q and k share elements; normalizing and rotating them in place would "
                    "do that twice. Pass disjoint views or use the functional op");
  const at::Tensor xs[2] = {q, k};
  const at::Tensor scales[2] = {scale_of(q, q_weight, weight_offset),
                                scale_of(k, k_weight, weight_offset)};
  const at::Tensor no_rstd[2];
  const NormRopeProblem np = describe_norm(xs, xs, cos, sin, positions, interleaved, false, scales,
                                           no_rstd, eps, across_heads);
  if (!empty(np.rope)) kernel(np);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_backward(
    NormKernel kernel, const at::Tensor& grad_q_out, const at::Tensor& grad_k_out,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const at::Tensor& q_rstd, const at::Tensor& k_rstd,
    bool across_heads, double weight_offset, bool interleaved) {
  check_norm_arguments(q, k, cos, sin, positions, q_weight, k_weight, 1.0, across_heads,
                       weight_offset);
  const at::Tensor xs[2] = {q, k};
  const at::Tensor grads[2] = {grad_q_out, grad_k_out};
  const at::Tensor rstds[2] = {q_rstd, k_rstd};
  const char* names[2][3] = {{"q", "grad_q", "q_rstd"}, {"k", "grad_k", "k_rstd"}};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(
        grads[i].sizes() == xs[i].sizes() && grads[i].scalar_type() == xs[i].scalar_type(),
        "rope: ", names[i][1], " must have ", names[i][0], "'s shape ", xs[i].sizes(),
        " and dtype ", xs[i].scalar_type(), ", got ", grads[i].sizes(), " ",
        grads[i].scalar_type());
    check_same_device(xs[i], grads[i], names[i][0], names[i][1]);
    TORCH_CHECK_VALUE(rstds[i].sizes() == c10::IntArrayRef(rstd_shape(xs[i], across_heads)) &&
                          rstds[i].scalar_type() == math_dtype(xs[i]) && rstds[i].is_contiguous(),
                      "rope: ", names[i][2], " must be the forward's contiguous ",
                      math_dtype(xs[i]), " tensor of shape ",
                      c10::IntArrayRef(rstd_shape(xs[i], across_heads)), ", got ", rstds[i].sizes(),
                      " ", rstds[i].scalar_type());
    check_same_device(xs[i], rstds[i], names[i][0], names[i][2]);
  }
  const at::Tensor outs[2] = {at::empty_like(q), at::empty_like(k)};
  const at::Tensor scales[2] = {scale_of(q, q_weight, weight_offset),
                                scale_of(k, k_weight, weight_offset)};
  NormRopeProblem np = describe_norm(grads, outs, cos, sin, positions, interleaved, true, scales,
                                     rstds, 1.0, across_heads);
  np.backward = true;
  const int64_t tokens = np.rope.batch * np.rope.seq;
  np.tokens_per_group = kTokensPerGroup;
  np.groups = (tokens + kTokensPerGroup - 1) / kTokensPerGroup;
  at::Tensor scale_grads[2], partials[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t size = weight_size(xs[i], across_heads);
    const auto opts = xs[i].options().dtype(math_dtype(xs[i]));
    partials[i] = at::empty({np.groups, size}, opts);
    scale_grads[i] = at::empty({size}, opts);
    NormDesc& nd = np.norm[i];
    nd.x = xs[i].const_data_ptr();
    const int o = xs[i].dim() == 4 ? 1 : 0;
    nd.x_stride_batch = o ? xs[i].stride(0) : 0;
    nd.x_stride_seq = xs[i].stride(o);
    nd.x_stride_head = xs[i].stride(o + 1);
    nd.x_stride_dim = xs[i].stride(o + 2);
    nd.scale_grad_partial = partials[i].data_ptr();
    nd.scale_grad = scale_grads[i].data_ptr();
  }
  if (!empty(np.rope)) {
    kernel(np);
  } else {
    scale_grads[0].zero_();
    scale_grads[1].zero_();
  }
  return {outs[0], outs[1], scale_grads[0].to(q_weight.scalar_type()),
          scale_grads[1].to(k_weight.scalar_type())};
}

}  // namespace rope
