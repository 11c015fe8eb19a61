// The op schemas and their CPU kernels. The CUDA kernels register in
// cuda/rope_cuda.cu; fake kernels and autograd are registered from Python
// (rope_ext/_ops.py), next to the wrappers that document them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <Python.h>
#include <torch/library.h>

#include "cpu/rope_cpu.h"
#include "cuda/rope_launch_config.h"
#include "rope_ops.h"

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
                     const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  return apply(cpu::rope_cpu, x, cos, sin, positions, interleaved, inverse);
}

void apply_cpu_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  apply_(cpu::rope_cpu, x, cos, sin, positions, interleaved, inverse);
}

std::tuple<at::Tensor, at::Tensor> apply_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                const std::optional<at::Tensor>& positions,
                                                bool interleaved, bool inverse) {
  return apply_qk(cpu::rope_cpu, q, k, cos, sin, positions, interleaved, inverse);
}

void apply_qk_cpu_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                   const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                   bool interleaved, bool inverse) {
  apply_qk_(cpu::rope_cpu, q, k, cos, sin, positions, interleaved, inverse);
}

// The in-place ops have no autograd formula (torch.library accepts one only for
// functional ops), so instead of letting autograd's fallback warn and compute a
// wrong gradient, they refuse tensors that need one and otherwise run below
// autograd, bumping the version counters of what they wrote.
void check_no_grad(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && x.requires_grad()), "rope: ", name,
                    " requires grad, and the in-place rotation is not differentiable; use the "
                    "functional form (apply_rope(..., inplace=False)) or run under torch.no_grad()");
}

void apply_autograd_(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  check_no_grad(x, "x");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rope::apply_", "")
                             .typed<decltype(apply_cpu_)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(x, cos, sin, positions, interleaved, inverse);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

void apply_qk_autograd_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                        const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                        bool interleaved, bool inverse) {
  check_no_grad(q, "q");
  check_no_grad(k, "k");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rope::apply_qk_", "")
                             .typed<decltype(apply_qk_cpu_)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(q, k, cos, sin, positions, interleaved, inverse);
  }
  q.unsafeGetTensorImpl()->bump_version();
  k.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY(rope, m) {
  // Rotates x [batch, seq, heads, head_dim] or [tokens, heads, head_dim] by the
  // table cos/sin [P, r/2] (rows picked by positions) or [batch|1, seq, r/2].
  m.def("apply(Tensor x, Tensor cos, Tensor sin, Tensor? positions=None, bool interleaved=False, "
        "bool inverse=False) -> Tensor");
  // The same, in place on x.
  m.def("apply_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? positions=None, "
        "bool interleaved=False, bool inverse=False) -> ()");
  // q and k in one pass: each table row is read once per token for both.
  m.def("apply_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions=None, "
        "bool interleaved=False, bool inverse=False) -> (Tensor, Tensor)");
  m.def("apply_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions=None, "
        "bool interleaved=False, bool inverse=False) -> ()");
}

TORCH_LIBRARY_IMPL(rope, CPU, m) {
  m.impl("apply", &apply_cpu);
  m.impl("apply_", &apply_cpu_);
  m.impl("apply_qk", &apply_qk_cpu);
  m.impl("apply_qk_", &apply_qk_cpu_);
}

// Test hooks, apart from the public ops (docs/kernels.md): which CPU kernel runs
// (an instruction set, or the CUDA kernel's host executor), the CUDA launch
// thresholds, and the plan of the last host-executed launch.
TORCH_LIBRARY(rope_testing, m) {
  m.def("set_cpu_kernel(str kernel) -> str", [](c10::string_view kernel) {
    return cpu::set_cpu_kernel(std::string(kernel));
  });
  m.def("set_cuda_launch(str config) -> str", [](c10::string_view config) {
    return cuda::set_launch_config(std::string(config));
  });
  m.def("last_host_plan() -> str", [] { return cuda::last_host_plan(); });
}

TORCH_LIBRARY_IMPL(rope, Autograd, m) {
  m.impl("apply_", &apply_autograd_);
  m.impl("apply_qk_", &apply_qk_autograd_);
}

}  // namespace rope
