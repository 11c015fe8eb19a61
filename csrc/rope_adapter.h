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
