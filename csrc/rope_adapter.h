// The device-independent body of each op: check the tensors, describe them as a
// RopeProblem, hand that to a device kernel. The CPU and CUDA registrations
// differ only in the kernel they pass.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "rope_problem.h"

namespace rope {

using Kernel = void (*)(const RopeProblem&);
using NormKernel = void (*)(const NormRopeProblem&);

// ---- the pieces the fused QK-norm adapter (norm_rope_adapter.cpp) shares ----
bool is_float_dtype(c10::ScalarType t);
void check_x(const at::Tensor& x, const char* name);
void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* xname,
                       const char* tname);
// Every check of a call's arguments but x's own. xs: q alone, or q and k.
void check_arguments(const at::Tensor* xs, int num_x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& positions,
                     const std::optional<at::Tensor>& inv_freq, double attention_factor);
// The checked call as a RopeProblem; outs: where the results go (the xs, in place).
RopeProblem describe_problem(const at::Tensor* xs, const at::Tensor* outs, int num_x,
                             const at::Tensor& cos, const at::Tensor& sin,
                             const std::optional<at::Tensor>& positions, bool interleaved,
                             bool inverse, const std::optional<at::Tensor>& inv_freq,
                             double attention_factor);
void check_writable(const at::Tensor& x, const char* name);
bool may_share_elements(const at::Tensor& q, const at::Tensor& k);
bool empty(const RopeProblem& p);

// ---- the ops ----

at::Tensor apply(Kernel kernel, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
                 const std::optional<at::Tensor>& inv_freq, double attention_factor);

void apply_(Kernel kernel, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
            const std::optional<at::Tensor>& positions, bool interleaved, bool inverse,
            const std::optional<at::Tensor>& inv_freq, double attention_factor);

std::tuple<at::Tensor, at::Tensor> apply_qk(Kernel kernel, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            const std::optional<at::Tensor>& positions,
                                            bool interleaved, bool inverse,
                                            const std::optional<at::Tensor>& inv_freq,
                                            double attention_factor);

void apply_qk_(Kernel kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
               const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved,
               bool inverse, const std::optional<at::Tensor>& inv_freq, double attention_factor);

}  // namespace rope

namespace rope {

// The fused QK-RMSNorm + RoPE (docs/api.md section 2b): (q_out, k_out, q_rstd, k_rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk(
    NormKernel kernel, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
    const at::Tensor& sin, const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, double eps, bool across_heads, double weight_offset,
    bool interleaved);

void rms_norm_rope_qk_(NormKernel kernel, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
                       const at::Tensor& k_weight, double eps, bool across_heads,
                       double weight_offset, bool interleaved);

// (grad_q, grad_k, grad_q_weight, grad_k_weight) from the outputs' gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rms_norm_rope_qk_backward(
    NormKernel kernel, const at::Tensor& grad_q_out, const at::Tensor& grad_k_out,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
    const std::optional<at::Tensor>& positions, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const at::Tensor& q_rstd, const at::Tensor& k_rstd,
    bool across_heads, double weight_offset, bool interleaved);

}  // namespace rope
