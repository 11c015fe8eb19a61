// The op schemas, their CPU kernels and their autograd. The CUDA kernels register
// in cuda/rope_cuda.cu; the fake kernels (shapes only) are registered from Python
// (rope_ext/_ops.py). Autograd lives here, in C++, so that a call from Python reaches
// the kernel without running any Python on the way (a decode step's whole cost on a
// GPU is this host path).
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <Python.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>

#include "cpu/rope_cpu.h"
#include "cuda/rope_launch_config.h"
#include "rope_adapter.h"

extern "C" {
// `import rope_ext._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace rope {
namespace {

at::Tensor apply_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                     const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  return apply(cpu::rope_cpu, x, cos, sin, positions, interleaved, inverse, inv_freq,
               attention_factor);
}

void apply_cpu_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  apply_(cpu::rope_cpu, x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
}

std::tuple<at::Tensor, at::Tensor> apply_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                const std::optional<at::Tensor>& positions,
                                                bool interleaved, bool inverse,
                                                const std::optional<at::Tensor>& inv_freq,
                                                double attention_factor) {
  return apply_qk(cpu::rope_cpu, q, k, cos, sin, positions, interleaved, inverse, inv_freq,
                  attention_factor);
}

void apply_qk_cpu_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                   bool interleaved, bool inverse, const std::optional<at::Tensor>& inv_freq,
                   double attention_factor) {
  apply_qk_(cpu::rope_cpu, q, k, cos, sin, positions, interleaved, inverse, inv_freq,
            attention_factor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, bool across_heads, double weight_offset,
    bool interleaved) {
  return rms_norm_rope_qk(cpu::norm_rope_cpu, q, k, cos, sin, positions, q_weight, k_weight, eps,
                          across_heads, weight_offset, interleaved);
}

void rms_norm_rope_qk_cpu_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                           const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                           const at::Tensor& q_weight, const at::Tensor& k_weight, double eps,
                           bool across_heads, double weight_offset, bool interleaved) {
  rms_norm_rope_qk_(cpu::norm_rope_cpu, q, k, cos, sin, positions, q_weight, k_weight, eps,
                    across_heads, weight_offset, interleaved);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& positions,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_rstd,
    const at::Tensor& k_rstd, bool across_heads, double weight_offset, bool interleaved) {
  return rms_norm_rope_qk_backward(cpu::norm_rope_cpu, grad_q, grad_k, q, k, cos, sin, positions,
                                   q_weight, k_weight, q_rstd, k_rstd, across_heads, weight_offset,
                                   interleaved);
}

// --- autograd of the functional ops: a rotation is orthogonal, so its gradient is
// the same op with `inverse` flipped (docs/math.md section 5). The backward calls the op
// through the dispatcher, autograd included, so double backward needs nothing more.
// cos, sin and positions get no gradient. The graph node is made by hand, as ATen's
// generated autograd kernels make theirs: torch::autograd::Function would refuse
// torch.func's transforms.

using ApplyFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, bool, bool,
                           const std::optional<at::Tensor>&, double);
using ApplyQkFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, bool, bool,
                                                     const std::optional<at::Tensor>&, double);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Each op's handle, looked up once (a lookup per call would cost a hash and a lock).
const c10::TypedOperatorHandle<ApplyFn>& apply_op() {
  static const auto op = find_op<ApplyFn>("rope::apply");
  return op;
}

const c10::TypedOperatorHandle<ApplyQkFn>& apply_qk_op() {
  static const auto op = find_op<ApplyQkFn>("rope::apply_qk");
  return op;
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                  const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  return apply_op().call(x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
}

// Backward of apply (one input) or apply_qk (two): each incoming gradient rotated back.
struct RopeBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable cos, sin, positions, inv_freq;
  bool interleaved = false, inverse = false;
  double attention_factor = 1.0;

  std::string name() const override { return "RopeBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const at::Tensor c = cos.unpack(), s = sin.unpack(), p = positions.unpack();
    const at::Tensor f = inv_freq.unpack();
    const std::optional<at::Tensor> pos = p.defined() ? std::optional<at::Tensor>(p) : std::nullopt;
    const std::optional<at::Tensor> freq =
        f.defined() ? std::optional<at::Tensor>(f) : std::nullopt;
    torch::autograd::variable_list out(grads.size());
    if (grads.size() == 2 && grads[0].defined() && grads[1].defined()) {
      std::tie(out[0], out[1]) = apply_qk_op().call(grads[0], grads[1], c, s, pos, interleaved,
                                                    !inverse, freq, attention_factor);
      return out;
    }
    // An output nobody used has no gradient, and gives none.
    for (size_t i = 0; i < grads.size(); ++i) {
      if (grads[i].defined() && should_compute_output(i)) {
        out[i] = rotate(grads[i], c, s, pos, interleaved, !inverse, freq, attention_factor);
      }
    }
    return out;
  }

  void release_variables() override {
    cos.reset_data();
    sin.reset_data();
    positions.reset_data();
    inv_freq.reset_data();
  }
};

// Without a gradient to track (inference, decode under generate) no node is made.
bool needs_graph(const at::Tensor& x) { return at::GradMode::is_enabled() && x.requires_grad(); }

// A graph node is held by std::shared_ptr up to torch 2.12 and by c10::intrusive_ptr
// from 2.13; Edge::function names whichever this torch uses.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T>
NodePtr new_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

NodePtr make_node(const at::Tensor& cos, const at::Tensor& sin,
                  const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                  const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  NodePtr node = new_node<RopeBackward>();
  auto* rope = static_cast<RopeBackward*>(node.get());
  rope->cos = torch::autograd::SavedVariable(cos, false);
  rope->sin = torch::autograd::SavedVariable(sin, false);
  rope->positions = torch::autograd::SavedVariable(positions.value_or(at::Tensor()), false);
  rope->inv_freq = torch::autograd::SavedVariable(inv_freq.value_or(at::Tensor()), false);
  rope->interleaved = interleaved;
  rope->inverse = inverse;
  rope->attention_factor = attention_factor;
  return node;
}

// Forward mode (torch.func.jvp, torch.autograd.forward_ad): the op is linear in x,
// so the output's tangent is the input's tangent rotated the same way.
void set_forward_grad(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos,
                      const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                      bool interleaved, bool inverse, const std::optional<at::Tensor>& inv_freq,
                      double attention_factor) {
  const at::Tensor& tangent = x._fw_grad(/*level=*/0);
  if (tangent.defined()) {
    out._set_fw_grad(
        rotate(tangent, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor),
        /*level=*/0,
        /*is_inplace_op=*/false);
  }
}

at::Tensor apply_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          const std::optional<at::Tensor>& positions, bool interleaved,
                          bool inverse, const std::optional<at::Tensor>& inv_freq,
                          double attention_factor) {
  NodePtr node;
  if (needs_graph(x)) {
    node = make_node(cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
    node->set_next_edges(torch::autograd::collect_next_edges(x));
  }
  at::Tensor out;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = rotate(x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
  }
  if (node) torch::autograd::set_history(out, node);
  set_forward_grad(out, x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
  return out;
}

std::tuple<at::Tensor, at::Tensor> apply_qk_autograd(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     const std::optional<at::Tensor>& positions,
                                                     bool interleaved, bool inverse,
                                                     const std::optional<at::Tensor>& inv_freq,
                                                     double attention_factor) {
  NodePtr node;
  if (needs_graph(q) || needs_graph(k)) {
    node = make_node(cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
    node->set_next_edges(torch::autograd::collect_next_edges(q, k));
  }
  at::Tensor q_out, k_out;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(q_out, k_out) = apply_qk_op().call(q, k, cos, sin, positions, interleaved, inverse,
                                                inv_freq, attention_factor);
  }
  if (node) {
    torch::autograd::set_history(q_out, node);
    torch::autograd::set_history(k_out, node);
  }
  set_forward_grad(q_out, q, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
  set_forward_grad(k_out, k, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
  return {q_out, k_out};
}

// The in-place ops have no autograd formula (torch.library accepts one only for
// functional ops), so instead of letting autograd's fallback warn and compute a
// wrong gradient, they refuse tensors that need one and otherwise run below
// autograd, bumping the version counters of what they wrote.
// functional: the differentiable call to use instead.
void check_no_grad(const at::Tensor& x, const char* name,
                   const char* functional = "apply_rope(..., inplace=False)") {
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && x.requires_grad()), "rope: ", name,
                    " requires grad, and the in-place op is not differentiable; use the "
                    "functional form (",
                    functional, ") or run under torch.no_grad()");
}

void apply_autograd_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                     const std::optional<at::Tensor>& inv_freq, double attention_factor) {
  check_no_grad(x, "x");
  static const auto op = find_op<decltype(apply_cpu_)>("rope::apply_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(x, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

void apply_qk_autograd_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                        const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                        bool interleaved, bool inverse, const std::optional<at::Tensor>& inv_freq,
                        double attention_factor) {
  check_no_grad(q, "q");
  check_no_grad(k, "k");
  static const auto op = find_op<decltype(apply_qk_cpu_)>("rope::apply_qk_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(q, k, cos, sin, positions, interleaved, inverse, inv_freq, attention_factor);
  }
  q.unsafeGetTensorImpl()->bump_version();
  k.unsafeGetTensorImpl()->bump_version();
}

// --- autograd of the fused QK-RMSNorm + RoPE ---
// First-order gradients come from the backward op (one pass over q, k and their
// gradients, docs/math.md section 15). Double backward and forward mode, which
// training rarely needs, go through the same math written with ATen ops and the
// rotation op, which autograd differentiates by itself.

using NormFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, bool, double,
    bool);
using NormBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, bool, double, bool);

const c10::TypedOperatorHandle<NormFn>& norm_op() {
  static const auto op = find_op<NormFn>("rope::rms_norm_rope_qk");
  return op;
}

const c10::TypedOperatorHandle<NormBackwardFn>& norm_backward_op() {
  static const auto op = find_op<NormBackwardFn>("rope::rms_norm_rope_qk_backward");
  return op;
}

// The fused op as differentiable ATen ops: (q_out, k_out, q_rstd, k_rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_rope_composite(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, bool across_heads, double weight_offset,
    bool interleaved) {
  const auto math = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto norm = [&](const at::Tensor& x, const at::Tensor& w, at::Tensor& rstd) {
    const at::Tensor xf = x.to(math);
    const at::Tensor group = across_heads ? xf.flatten(-2) : xf;
    const at::Tensor r = at::rsqrt(group.pow(2).mean(-1, /*keepdim=*/true) + eps);
    rstd = across_heads ? r : r.squeeze(-1);
    return (group * r * (w.to(math) + weight_offset)).view(xf.sizes());
  };
  at::Tensor q_rstd, k_rstd;
  const at::Tensor qn = norm(q, q_weight, q_rstd), kn = norm(k, k_weight, k_rstd);
  auto [q_out, k_out] = apply_qk_op().call(qn, kn, cos.to(math), sin.to(math), positions,
                                           interleaved, false, std::nullopt, 1.0);
  return {q_out.to(q.scalar_type()), k_out.to(k.scalar_type()), q_rstd.detach(), k_rstd.detach()};
}

// The backward (docs/math.md section 15.3) as differentiable ATen ops and the rotation op:
// what double backward and torch.func differentiate. (grad_q, grad_k, grad_q_weight,
// grad_k_weight).
std::array<at::Tensor, 4> norm_rope_backward_composite(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& positions,
    const at::Tensor& q_weight, const at::Tensor& k_weight, double eps, bool across_heads,
    double weight_offset, bool interleaved) {
  const auto math = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // u = R^T grad: the rotation's inverse.
  auto [u_q, u_k] = apply_qk_op().call(grad_q.to(math), grad_k.to(math), cos.to(math), sin.to(math),
                                       positions, interleaved, /*inverse=*/true, std::nullopt, 1.0);
  const auto one = [&](const at::Tensor& x, const at::Tensor& u, const at::Tensor& w,
                       at::Tensor& grad_x, at::Tensor& grad_w) {
    const at::Tensor xf = x.to(math);
    const at::Tensor xg = across_heads ? xf.flatten(-2) : xf;
    const at::Tensor ug = across_heads ? u.flatten(-2) : u;
    const at::Tensor r = at::rsqrt(xg.pow(2).mean(-1, /*keepdim=*/true) + eps);
    const at::Tensor n = xg * r;
    const at::Tensor dn = ug * (w.to(math) + weight_offset);
    grad_x =
        (r * (dn - n * (dn * n).mean(-1, /*keepdim=*/true))).view(xf.sizes()).to(x.scalar_type());
    grad_w = (ug * n).reshape({-1, w.size(0)}).sum(0).to(w.scalar_type());
  };
  std::array<at::Tensor, 4> out;
  one(q, u_q, q_weight, out[0], out[2]);
  one(k, u_k, k_weight, out[1], out[3]);
  return out;
}

struct NormRopeBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable q, k, cos, sin, positions, q_weight, k_weight, q_rstd, k_rstd;
  double eps = 1e-6, weight_offset = 0.0;
  bool across_heads = false, interleaved = false;

  std::string name() const override { return "RmsNormRopeQkBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    const at::Tensor q_ = q.unpack(), k_ = k.unpack(), qw = q_weight.unpack(),
                     kw = k_weight.unpack(), p = positions.unpack();
    const std::optional<at::Tensor> pos = p.defined() ? std::optional<at::Tensor>(p) : std::nullopt;
    const at::Tensor gq = grads[0].defined() ? grads[0] : at::zeros_like(q_);
    const at::Tensor gk = grads[1].defined() ? grads[1] : at::zeros_like(k_);
    torch::autograd::variable_list out(4);
    const bool create_graph = at::GradMode::is_enabled() &&
                              (q_.requires_grad() || k_.requires_grad() || qw.requires_grad() ||
                               kw.requires_grad() || gq.requires_grad() || gk.requires_grad());
    if (create_graph) {  // double backward, torch.func: the same math in differentiable ops
      const auto results =
          norm_rope_backward_composite(gq, gk, q_, k_, cos.unpack(), sin.unpack(), pos, qw, kw, eps,
                                       across_heads, weight_offset, interleaved);
      for (int i = 0; i < 4; ++i) {
        if (should_compute_output(i)) out[i] = results[i];
      }
      return out;
    }
    auto [dq, dk, dqw, dkw] = norm_backward_op().call(gq, gk, q_, k_, cos.unpack(), sin.unpack(),
                                                      pos, qw, kw, q_rstd.unpack(), k_rstd.unpack(),
                                                      across_heads, weight_offset, interleaved);
    const at::Tensor results[4] = {dq, dk, dqw, dkw};
    for (int i = 0; i < 4; ++i) {
      if (should_compute_output(i)) out[i] = results[i];
    }
    return out;
  }

  void release_variables() override {
    for (auto* v : {&q, &k, &cos, &sin, &positions, &q_weight, &k_weight, &q_rstd, &k_rstd}) {
      v->reset_data();
    }
  }
};

bool has_tangent(const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, bool across_heads, double weight_offset,
    bool interleaved) {
  if (has_tangent(q) || has_tangent(k) || has_tangent(q_weight) || has_tangent(k_weight)) {
    // Forward mode: the ATen composition carries the tangents.
    return norm_rope_composite(q, k, cos, sin, positions, q_weight, k_weight, eps, across_heads,
                               weight_offset, interleaved);
  }
  const bool grad =
      needs_graph(q) || needs_graph(k) || needs_graph(q_weight) || needs_graph(k_weight);
  at::Tensor q_out, k_out, q_rstd, k_rstd;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(q_out, k_out, q_rstd, k_rstd) =
        norm_op().call(q, k, cos, sin, positions, q_weight, k_weight, eps, across_heads,
                       weight_offset, interleaved);
  }
  if (!grad) return {q_out, k_out, q_rstd, k_rstd};
  NodePtr node = new_node<NormRopeBackward>();
  auto* n = static_cast<NormRopeBackward*>(node.get());
  n->q = torch::autograd::SavedVariable(q, false);
  n->k = torch::autograd::SavedVariable(k, false);
  n->cos = torch::autograd::SavedVariable(cos, false);
  n->sin = torch::autograd::SavedVariable(sin, false);
  n->positions = torch::autograd::SavedVariable(positions.value_or(at::Tensor()), false);
  n->q_weight = torch::autograd::SavedVariable(q_weight, false);
  n->k_weight = torch::autograd::SavedVariable(k_weight, false);
  n->q_rstd = torch::autograd::SavedVariable(q_rstd, false);
  n->k_rstd = torch::autograd::SavedVariable(k_rstd, false);
  n->eps = eps;
  n->weight_offset = weight_offset;
  n->across_heads = across_heads;
  n->interleaved = interleaved;
  node->set_next_edges(torch::autograd::collect_next_edges(q, k, q_weight, k_weight));
  torch::autograd::set_history(q_out, node);
  torch::autograd::set_history(k_out, node);
  return {q_out, k_out, q_rstd, k_rstd};
}

constexpr const char* kNormFunctional = "rms_norm_rope_qk(..., inplace=False)";

void rms_norm_rope_qk_autograd_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                                const at::Tensor& q_weight, const at::Tensor& k_weight, double eps,
                                bool across_heads, double weight_offset, bool interleaved) {
  check_no_grad(q, "q", kNormFunctional);
  check_no_grad(k, "k", kNormFunctional);
  check_no_grad(q_weight, "q_weight", kNormFunctional);
  check_no_grad(k_weight, "k_weight", kNormFunctional);
  static const auto op = find_op<decltype(rms_norm_rope_qk_cpu_)>("rope::rms_norm_rope_qk_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(q, k, cos, sin, positions, q_weight, k_weight, eps, across_heads, weight_offset,
            interleaved);
  }
  q.unsafeGetTensorImpl()->bump_version();
  k.unsafeGetTensorImpl()->bump_version();
}

// The backward op has no gradient of its own: double backward differentiates the
// composition instead (NormRopeBackward), so a direct call that needs one is refused.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_backward_autograd(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& positions,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& q_rstd,
    const at::Tensor& k_rstd, bool across_heads, double weight_offset, bool interleaved) {
  for (const at::Tensor* t : {&grad_q, &grad_k, &q, &k, &q_weight, &k_weight}) {
    TORCH_CHECK_VALUE(!needs_graph(*t),
                      "rope: rms_norm_rope_qk_backward is not differentiable; differentiate "
                      "rms_norm_rope_qk with create_graph=True instead");
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return norm_backward_op().call(grad_q, grad_k, q, k, cos, sin, positions, q_weight, k_weight,
                                 q_rstd, k_rstd, across_heads, weight_offset, interleaved);
}

}  // namespace

TORCH_LIBRARY(rope, m) {
  // Rotates x [batch, seq, heads, head_dim] or [tokens, heads, head_dim] by the
  // table cos/sin [P, r/2] (rows picked by positions) or [batch|1, seq, r/2].
  // inv_freq (float64 [r/2], with positions): a position past the table's rows gets the
  // row cos_sin_table(inv_freq, ..., attention_factor) would hold, computed in the kernel,
  // instead of an error (CPU) or NaN (CUDA). RotaryEmbedding passes it.
  m.def(
      "apply(Tensor x, Tensor cos, Tensor sin, Tensor? positions=None, bool interleaved=False, "
      "bool inverse=False, Tensor? inv_freq=None, float attention_factor=1.0) -> Tensor");
  // The same, in place on x.
  m.def(
      "apply_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? positions=None, "
      "bool interleaved=False, bool inverse=False, Tensor? inv_freq=None, "
      "float attention_factor=1.0) -> ()");
  // q and k in one pass: each table row is read once per token for both.
  m.def(
      "apply_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions=None, "
      "bool interleaved=False, bool inverse=False, Tensor? inv_freq=None, "
      "float attention_factor=1.0) -> (Tensor, Tensor)");
  m.def(
      "apply_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions=None, "
      "bool interleaved=False, bool inverse=False, Tensor? inv_freq=None, "
      "float attention_factor=1.0) -> ()");
  // Fused QK-RMSNorm + RoPE (docs/api.md section 2b): q_out = rope(rms_norm(q) * (q_weight +
  // weight_offset)), the same for k; also returns each group's 1/rms (float32, float64 for
  // float64), which the backward reads.
  m.def(
      "rms_norm_rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions, "
      "Tensor q_weight, Tensor k_weight, float eps=1e-06, bool across_heads=False, "
      "float weight_offset=0.0, bool interleaved=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rms_norm_rope_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions, "
      "Tensor q_weight, Tensor k_weight, float eps=1e-06, bool across_heads=False, "
      "float weight_offset=0.0, bool interleaved=False) -> ()");
  // Gradients of q, k, q_weight, k_weight from those of q_out and k_out.
  m.def(
      "rms_norm_rope_qk_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor cos, "
      "Tensor sin, Tensor? positions, Tensor q_weight, Tensor k_weight, Tensor q_rstd, "
      "Tensor k_rstd, bool across_heads, float weight_offset, bool interleaved) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rope, CPU, m) {
  m.impl("apply", &apply_cpu);
  m.impl("apply_", &apply_cpu_);
  m.impl("apply_qk", &apply_qk_cpu);
  m.impl("apply_qk_", &apply_qk_cpu_);
  m.impl("rms_norm_rope_qk", &rms_norm_rope_qk_cpu);
  m.impl("rms_norm_rope_qk_", &rms_norm_rope_qk_cpu_);
  m.impl("rms_norm_rope_qk_backward", &rms_norm_rope_qk_backward_cpu);
}

// Test hooks, apart from the public ops (docs/kernels.md): which CPU kernel runs
// (an instruction set, or the CUDA kernel's host executor), the CUDA launch
// thresholds, and the plan of the last host-executed launch.
TORCH_LIBRARY(rope_testing, m) {
  m.def("set_cpu_kernel(str kernel) -> str",
        [](c10::string_view kernel) { return cpu::set_cpu_kernel(std::string(kernel)); });
  m.def("set_cuda_launch(str config) -> str",
        [](c10::string_view config) { return cuda::set_launch_config(std::string(config)); });
  m.def("last_host_plan() -> str", [] { return cuda::last_host_plan(); });
  // float32 -> bf16/fp16 as the selected CPU kernel rounds its stores.
  m.def("narrow_as_stored(Tensor x, ScalarType dtype) -> Tensor",
        [](const at::Tensor& x, c10::ScalarType dtype) {
          TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.is_cpu() && x.is_contiguous(),
                            "narrow_as_stored: x must be a contiguous float32 CPU tensor");
          TORCH_CHECK_VALUE(dtype == at::kBFloat16 || dtype == at::kHalf,
                            "narrow_as_stored: dtype must be bfloat16 or float16");
          at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype));
          cpu::narrow_float(x.const_data_ptr<float>(), out.data_ptr(), dtype, x.numel());
          return out;
        });
}

TORCH_LIBRARY_IMPL(rope, Autograd, m) {
  m.impl("apply", &apply_autograd);
  m.impl("apply_qk", &apply_qk_autograd);
  m.impl("apply_", &apply_autograd_);
  m.impl("apply_qk_", &apply_qk_autograd_);
  m.impl("rms_norm_rope_qk", &rms_norm_rope_qk_autograd);
  m.impl("rms_norm_rope_qk_", &rms_norm_rope_qk_autograd_);
  m.impl("rms_norm_rope_qk_backward", &rms_norm_rope_qk_backward_autograd);
}

}  // namespace rope
