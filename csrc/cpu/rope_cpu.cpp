// Picks the CPU kernel: the one built for the widest instruction set this machine
// runs, a narrower one on request, or the CUDA kernel's host executor (tests).
#include "rope_cpu.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "../cuda/rope_launch_config.h"

namespace rope::cpu {

namespace {
// Ordered by width; kCudaHost is not an instruction set but the host executor.
enum class Kernel : int { kDefault, kAvx2, kAvx512, kAvx512Bf16, kCudaHost, kWidest };
constexpr const char* kNames[] = {"default", "avx2", "avx512", "avx512_bf16", "cuda-host", "auto"};

// at::get_cpu_capability() already combines what the processor supports with the
// ATEN_CPU_CAPABILITY override, so rope_ext follows the same choice as ATen.
Kernel widest_isa() {
  Kernel widest = Kernel::kDefault;
#if defined(__x86_64__) || defined(_M_X64)
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") {
    widest = __builtin_cpu_supports("avx512bf16") ? Kernel::kAvx512Bf16 : Kernel::kAvx512;
  } else if (cap == "AVX2") {
    widest = Kernel::kAvx2;
  }
#endif
  return widest;
}

// The widest variant at most `k` that this build holds (setup.py's ROPE_EXT_CPU_ISAS
// may leave some out; each built one defines ROPE_EXT_HAVE_<NAME>).
Kernel built(Kernel k) {
#if !defined(ROPE_EXT_HAVE_AVX512_BF16)
  if (k == Kernel::kAvx512Bf16) k = Kernel::kAvx512;
#endif
#if !defined(ROPE_EXT_HAVE_AVX512)
  if (k == Kernel::kAvx512) k = Kernel::kAvx2;
#endif
#if !defined(ROPE_EXT_HAVE_AVX2)
  if (k == Kernel::kAvx2) k = Kernel::kDefault;
#endif
  return k;
}

Kernel parse(const std::string& name, const char* origin) {
  for (int k = 0; k <= static_cast<int>(Kernel::kWidest); ++k) {
    if (name == kNames[k]) return static_cast<Kernel>(k);
  }
  TORCH_CHECK_VALUE(false, "rope: ", origin, " '", name,
                    "' is not a CPU kernel; choose auto, "
                    "default, avx2, avx512, avx512_bf16 or cuda-host");
}

// The kernel asked for: ROPE_EXT_CPU_KERNEL, read at the first CPU op call (an unknown name
// makes that call and every later one raise: a static left uninitialized by an exception
// is initialized again on the next call), then set_cpu_kernel.
std::atomic<int>& requested() {
  static std::atomic<int> kernel = [] {
    const char* env = std::getenv("ROPE_EXT_CPU_KERNEL");
    return static_cast<int>(env == nullptr || *env == '\0' ? Kernel::kWidest
                                                           : parse(env, "ROPE_EXT_CPU_KERNEL"));
  }();
  return kernel;
}
// Positions outside the table raise on the CPU, where their values are at hand
// (the GPU would need a device sync; its kernel writes NaN rows instead). One pass
// over the raw positions, before any output is written.
void check_positions(const RopeProblem& p) {
  const TableIndex& t = p.table;
  if (t.pos32 == nullptr && t.pos64 == nullptr) return;
  int64_t lo = 0, hi = 0;
  bool first = true;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t s = 0; s < p.seq; ++s) {
      const int64_t pos = token_position(t, b, s);
      lo = first || pos < lo ? pos : lo;
      hi = first || pos > hi ? pos : hi;
      first = false;
    }
  }
  // With inv_freq, rows past the table are computed: any position below 2**31 is fine.
  const int64_t bound = t.inv_freq != nullptr ? kMaxComputedPosition : t.rows;
  TORCH_CHECK_VALUE(lo >= 0, "rope: positions must lie in [0, ", bound, "), got ", lo);
  if (t.inv_freq != nullptr) {
    TORCH_CHECK_VALUE(hi < bound, "rope: positions must lie in [0, 2**31), got ", hi);
    return;
  }
  TORCH_CHECK_VALUE(hi < t.rows, "rope: positions must lie in [0, ", t.rows, ") for a table of ",
                    t.rows, " rows (cos.size(0)), got ", hi,
                    "; build a table with max_positions > ", hi,
                    " (cos_sin_table, or RotaryEmbedding(max_positions=...))");
}
}  // namespace

std::string set_cpu_kernel(const std::string& name) {
  const Kernel want = parse(name, "set_cpu_kernel:");
  return kNames[requested().exchange(static_cast<int>(want))];
}

// The instruction set in force: the one asked for, capped to what the machine runs
// (an instruction set wider than the machine runs is capped to the widest it does)
// and to what was built.
Kernel isa_in_force(Kernel want) {
  static const Kernel widest = widest_isa();
  return built(want == Kernel::kWidest || want == Kernel::kCudaHost ? widest
                                                                    : std::min(want, widest));
}

// Calls the entry point `fn` of the namespace of instruction set `isa`.
#define ROPE_CPU_DISPATCH(isa, fn, ...)    \
  switch (isa) {                           \
    ROPE_CASE_AVX512_BF16(fn, __VA_ARGS__) \
    ROPE_CASE_AVX512(fn, __VA_ARGS__)      \
    ROPE_CASE_AVX2(fn, __VA_ARGS__)        \
    default:                               \
      return DEFAULT::fn(__VA_ARGS__);     \
  }
#if defined(ROPE_EXT_HAVE_AVX512_BF16)
#define ROPE_CASE_AVX512_BF16(fn, ...) \
  case Kernel::kAvx512Bf16:            \
    return AVX512_BF16::fn(__VA_ARGS__);
#else
#define ROPE_CASE_AVX512_BF16(fn, ...)
#endif
#if defined(ROPE_EXT_HAVE_AVX512)
#define ROPE_CASE_AVX512(fn, ...) \
  case Kernel::kAvx512:           \
    return AVX512::fn(__VA_ARGS__);
#else
#define ROPE_CASE_AVX512(fn, ...)
#endif
#if defined(ROPE_EXT_HAVE_AVX2)
#define ROPE_CASE_AVX2(fn, ...) \
  case Kernel::kAvx2:           \
    return AVX2::fn(__VA_ARGS__);
#else
#define ROPE_CASE_AVX2(fn, ...)
#endif

void rope_cpu(const RopeProblem& p) {
  const auto want = static_cast<Kernel>(requested().load(std::memory_order_relaxed));
  // The host executor runs the GPU's code, which writes NaN rows instead of raising.
  if (want == Kernel::kCudaHost) return cuda::rope_cuda_host(p);
  check_positions(p);
  ROPE_CPU_DISPATCH(isa_in_force(want), rope_cpu_kernel, p)
}

void norm_rope_cpu(const NormRopeProblem& p) {
  const auto want = static_cast<Kernel>(requested().load(std::memory_order_relaxed));
  if (want == Kernel::kCudaHost) return cuda::norm_rope_cuda_host(p);
  check_positions(p.rope);
  ROPE_CPU_DISPATCH(isa_in_force(want), norm_rope_cpu_kernel, p)
}

void narrow_float(const float* in, void* out, c10::ScalarType dtype, int64_t n) {
  const auto want = static_cast<Kernel>(requested().load(std::memory_order_relaxed));
  ROPE_CPU_DISPATCH(isa_in_force(want), narrow_float, in, out, dtype, n)
}

}  // namespace rope::cpu
