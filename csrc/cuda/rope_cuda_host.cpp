// The host executor: the CUDA kernel's body (rope_cuda_kernel.cuh), compiled by the
// host compiler and run for every (block, thread) of the grid the launcher plans,
// with memory accesses that check what a GPU would punish silently or fatally:
//  - an access of a Pack<T, N> must be aligned to its size (a misaligned 16-byte
//    access is an error on the GPU);
//  - every output element must be stored exactly once per launch (a second store
//    is a race between threads, a missing one leaves garbage), and nothing else.
// Out-of-bounds reads and writes are left to AddressSanitizer (`make sanitize`).
// The tests select it with torch.ops.rope_testing.set_cpu_kernel("cuda-host").
// Built with -ffp-contract=off (setup.py), like the device code's -fmad=false, so
// the arithmetic is the GPU's operation for operation.
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "norm_rope_cuda_kernel.cuh"
#include "rope_launch_config.h"

namespace rope::cuda {
namespace {

// ---- the launch thresholds ----

struct ConfigState {
  std::mutex mutex;
  std::string spec;
  LaunchConfig config;
};

ConfigState& config_state() {
  static ConfigState* state = [] {
    auto* s = new ConfigState;  // never destroyed: launches may run during exit
    const char* env = std::getenv("ROPE_EXT_CUDA_LAUNCH");
    if (env != nullptr && *env != '\0') {
      LaunchConfig cfg;
      const std::string error = parse_launch_config(env, cfg);
      TORCH_CHECK_VALUE(error.empty(), "rope: ROPE_EXT_CUDA_LAUNCH=", env, ": ", error);
      s->spec = env;
      s->config = cfg;
    }
    return s;
  }();
  return *state;
}

// ---- checked memory access for one launch ----

struct LaunchCheck {
  std::unordered_map<uintptr_t, uint32_t> stores;  // element address -> times stored
};
thread_local LaunchCheck* current_check = nullptr;

struct CheckedHostAccess {
  template <typename T, int N>
  static void check_aligned(const T* p, const char* what) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, N>) == 0, "rope cuda-host: ", what,
                " of ", sizeof(Pack<T, N>), " bytes at address ", static_cast<const void*>(p),
                ", which is not ", sizeof(Pack<T, N>), "-byte aligned (a GPU would fault)");
  }
  template <typename T, int N>
  static Pack<T, N> load(const T* p) {
    check_aligned<T, N>(p, "a load");
    Pack<T, N> v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  // The GPU's prefetch only hints; here its first byte is read, so that under
  // AddressSanitizer (make sanitize) an address outside every tensor fails the run.
  template <typename T>
  static void prefetch(const T* p) {
    const volatile unsigned char first = *reinterpret_cast<const volatile unsigned char*>(p);
    (void)first;
  }
  template <typename T, int N>
  static void store(T* p, const Pack<T, N>& v) {
    check_aligned<T, N>(p, "a store");
    for (int j = 0; j < N; ++j) ++current_check->stores[reinterpret_cast<uintptr_t>(p + j)];
    std::memcpy(p, &v, sizeof(v));
  }
};

struct HostRunner {
  // MinBlocks changes only the device build's register budget, not what a thread does.
  template <typename scalar_t, typename table_t, int N, typename Index, int MinBlocks>
  void run(const RopeProblem& p, const LaunchPlan& plan) {
    for (int64_t block = 0; block < plan.grid; ++block) {
      for (int ty = 0; ty < plan.block_y; ++ty) {
        for (int tx = 0; tx < plan.block_x; ++tx) {
          rope_thread<scalar_t, table_t, N, Index, CheckedHostAccess>(
              p, plan, static_cast<Index>(block), static_cast<Index>(tx), static_cast<Index>(ty));
        }
      }
    }
  }
};

// After a launch: every element it had to write stored exactly once, nothing else stored.
class ExpectedStores {
 public:
  explicit ExpectedStores(LaunchCheck& check) : check_(check) {}

  // Element e of head h of token (b, s) of an output described by d (`dims` per head).
  void heads(const RopeProblem& p, const HeadsDesc& d, const char* name, int64_t dims) {
    const int64_t elem = c10::elementSize(p.x_dtype);
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t s = 0; s < p.seq; ++s) {
        for (int64_t h = 0; h < d.heads; ++h) {
          for (int64_t e = 0; e < dims; ++e) {
            const int64_t off = b * d.out_stride_batch + s * d.out_stride_seq +
                                h * d.out_stride_head + e * d.out_stride_dim;
            const uint32_t times = stored(reinterpret_cast<uintptr_t>(d.out) + off * elem);
            TORCH_CHECK(times == 1, "rope cuda-host: output element ", name, "[", b, ", ", s, ", ",
                        h, ", ", e, "] was stored ", times,
                        " times in one launch (expected exactly once)");
          }
        }
      }
    }
  }

  // Elements [0, n) of a contiguous output of `elem`-byte elements.
  void range(const void* base, int64_t n, int64_t elem, const char* name) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t times = stored(reinterpret_cast<uintptr_t>(base) + j * elem);
      TORCH_CHECK(times == 1, "rope cuda-host: output element ", name, "[", j, "] was stored ",
                  times, " times in one launch (expected exactly once)");
    }
  }

  void finish() const {
    TORCH_CHECK(static_cast<int64_t>(check_.stores.size()) == expected_,
                "rope cuda-host: the launch stored ", check_.stores.size() - expected_,
                " elements outside its outputs");
  }

 private:
  uint32_t stored(uintptr_t addr) {
    ++expected_;
    const auto it = check_.stores.find(addr);
    return it == check_.stores.end() ? 0 : it->second;
  }
  LaunchCheck& check_;
  int64_t expected_ = 0;
};

// What a rotation launch must store.
void expect_rotation_stores(const RopeProblem& p, ExpectedStores& expected) {
  static const char* names[2][2] = {{"x", "x"}, {"q", "k"}};
  for (int i = 0; i < p.num_x; ++i) {
    const HeadsDesc& d = p.x[i];
    // In place, the pass-through tail x[r:] is not written.
    expected.heads(p, d, names[p.num_x - 1][i], d.in == d.out ? 2 * p.pairs : d.head_dim);
  }
}

// Runs a launch of `run` (called as run() with current_check set) and checks its stores
// with `expect(ExpectedStores&)`.
template <typename Run, typename Expect>
void checked_launch(Run&& run, Expect&& expect) {
  LaunchCheck check;
  current_check = &check;
  try {
    run();
  } catch (...) {
    current_check = nullptr;
    throw;
  }
  current_check = nullptr;
  ExpectedStores expected(check);
  expect(expected);
  expected.finish();
}

// The fused QK-norm kernels, run as norm_rope_cuda_kernel.cuh says: per item, phase 1
// for every lane, the butterfly, phase 2 for every lane.
struct NormHostRunner {
  // MinBlocks changes only the device build's register budget, not what a thread does.
  template <typename scalar_t, typename table_t, int N, int MinBlocks>
  void run(const NormRopeProblem& np, const NormPlan& plan) {
    run_items<scalar_t, table_t, N>(np, plan);
  }

  template <typename scalar_t, typename table_t, int N>
  void run_items(const NormRopeProblem& np, const NormPlan& plan) {
    using T = opmath_t<scalar_t>;
    using A = CheckedHostAccess;
    const RopeProblem& p = np.rope;
    static const char* names[2] = {"q", "k"};
    checked_launch(
        [&] {
          const int64_t stride = plan.grid * plan.block_y;
          for (int64_t block = 0; block < plan.grid; ++block) {
            for (int64_t base = block * plan.block_y; base < plan.items; base += stride) {
              for (int64_t ty = 0; ty < plan.block_y && base + ty < plan.items; ++ty) {
                const NormItem it(np, base + ty);
                T sums[32];
                KeptRuns<T, N> kept[32];  // each lane's registers between the two phases
                // The next item's hint first, as the device kernel gives it.
                const int64_t next = base + stride + ty;
                if (plan.prefetch && next < plan.items) {
                  for (int lane = 0; lane < plan.block_x; ++lane) {
                    prefetch_item<scalar_t, N, A>(np, plan, next, lane);
                  }
                }
                for (int lane = 0; lane < plan.block_x; ++lane) {
                  sums[lane] = np.backward
                                   ? norm_backward_sum<scalar_t, table_t, N, A>(np, plan, it, lane)
                                   : norm_forward_sum<scalar_t, table_t, N, A>(np, plan, it, lane,
                                                                               kept[lane]);
                }
                butterfly_host(sums, plan.block_x);
                for (int lane = 0; lane < plan.block_x; ++lane) {
                  if (np.backward) {
                    norm_backward_store<scalar_t, table_t, N, A>(np, plan, it, lane, sums[lane]);
                  } else {
                    norm_forward_store<scalar_t, table_t, N, A>(np, plan, it, lane, sums[lane],
                                                                kept[lane]);
                  }
                }
              }
            }
          }
        },
        [&](ExpectedStores& expected) {
          for (int i = 0; i < p.num_x; ++i) {
            expected.heads(p, p.x[i], names[i], p.x[i].head_dim);
            const NormDesc& nd = np.norm[i];
            if (!np.backward && nd.rstd != nullptr) {
              const int64_t per_token = np.across_heads ? 1 : p.x[i].heads;
              expected.range(nd.rstd, p.batch * p.seq * per_token, sizeof(T), "rstd");
            }
          }
        });
    if (!np.backward) return;
    checked_launch(
        [&] {
          for (int64_t index = 0; index < plan.partial_grid * kFlatBlock; ++index) {
            scale_grad_partial<scalar_t, table_t, A>(np, index);
          }
        },
        [&](ExpectedStores& expected) {
          for (int i = 0; i < p.num_x; ++i) {
            expected.range(np.norm[i].scale_grad_partial, np.groups * scale_size(np, i), sizeof(T),
                           "scale_grad_partial");
          }
        });
    checked_launch(
        [&] {
          for (int64_t index = 0; index < plan.sum_grid * kFlatBlock; ++index) {
            scale_grad_sum<T, A>(np, index);
          }
        },
        [&](ExpectedStores& expected) {
          for (int i = 0; i < p.num_x; ++i) {
            expected.range(np.norm[i].scale_grad, scale_size(np, i), sizeof(T), "scale_grad");
          }
        });
  }
};

std::mutex last_plan_mutex;
std::string last_plan;

}  // namespace

std::string parse_launch_config(const std::string& spec, LaunchConfig& cfg) {
  std::stringstream items(spec);
  std::string item;
  while (std::getline(items, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    const std::string key = item.substr(0, eq);
    int* field = key == "block_threads"        ? &cfg.block_threads
                 : key == "max_blocks_per_sm"  ? &cfg.max_blocks_per_sm
                 : key == "fill_blocks_per_sm" ? &cfg.fill_blocks_per_sm
                 : key == "heads_per_item"     ? &cfg.heads_per_item
                 : key == "index_bits"         ? &cfg.index_bits
                 : key == "sm_count"           ? &cfg.sm_count
                 : key == "vectorize"          ? &cfg.vectorize
                 : key == "max_heads_per_item" ? &cfg.max_heads_per_item
                 : key == "min_blocks"         ? &cfg.min_blocks
                 : key == "norm_min_blocks"    ? &cfg.norm_min_blocks
                 : key == "prefetch"           ? &cfg.prefetch
                 : key == "norm_prefetch"      ? &cfg.norm_prefetch
                                               : nullptr;
    if (field == nullptr || eq == std::string::npos) {
      return "unknown setting '" + item +
             "'; the settings are block_threads, max_blocks_per_sm, "
             "fill_blocks_per_sm, heads_per_item, max_heads_per_item, index_bits, sm_count, "
             "vectorize, min_blocks, prefetch, norm_min_blocks, norm_prefetch (key=value)";
    }
    const std::string value = item.substr(eq + 1);
    char* end = nullptr;
    const long v = std::strtol(value.c_str(), &end, 10);
    const bool ok = !value.empty() && *end == '\0' && v >= 0 && v <= 1024 &&
                    (key != "block_threads" || v >= 1) &&
                    (key != "index_bits" || v == 0 || v == 32 || v == 64) &&
                    (key != "min_blocks" || v == 0 || v == 4) &&
                    (key != "norm_min_blocks" || v == 0 || v == 4) &&
                    (key != "prefetch" || v == 0 || v == 1) &&
                    (key != "norm_prefetch" || v == 0 || v == 1);
    if (!ok) {
      return "bad value '" + value + "' for " + key +
             " (an integer in [0, 1024]; block_threads >= 1; index_bits 0, 32 or 64; min_blocks "
             "and norm_min_blocks 0 or 4; prefetch and norm_prefetch 0 or 1)";
    }
    *field = static_cast<int>(v);
  }
  return "";
}

LaunchConfig launch_config() {
  ConfigState& s = config_state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  return s.config;
}

std::string set_launch_config(const std::string& spec) {
  LaunchConfig cfg;
  const std::string error = parse_launch_config(spec.c_str(), cfg);
  TORCH_CHECK_VALUE(error.empty(), "rope: launch config '", spec, "': ", error);
  ConfigState& s = config_state();
  const std::lock_guard<std::mutex> lock(s.mutex);
  std::string previous = s.spec;
  s.spec = spec;
  s.config = cfg;
  return previous;
}

// As many multiprocessors as an H100 or H200 (132) unless the config says otherwise.
constexpr int kHostSmCount = 132;

// A host-executed plan must fit CUDA's launch limits (at most 1024 threads per block, a
// grid below 2**31); it is kept as "key=value,..." for the tests (last_host_plan), built
// with std::to_string: no iostreams on this path (a number formatted through a stream is
// where a second, statically linked libstdc++ crashes first).
void record_plan(int64_t grid, int64_t block_threads,
                 std::initializer_list<std::pair<const char*, int64_t>> fields) {
  TORCH_CHECK(block_threads <= 1024 && grid < (int64_t{1} << 31),
              "rope cuda-host: the plan exceeds CUDA's launch limits");
  std::string text;
  for (const auto& [key, value] : fields) {
    text += (text.empty() ? "" : ",") + std::string(key) + "=" + std::to_string(value);
  }
  const std::lock_guard<std::mutex> lock(last_plan_mutex);
  last_plan = std::move(text);
}

void rope_cuda_host(const RopeProblem& p) {
  HostRunner runner;
  LaunchPlan plan;
  checked_launch([&] { plan = plan_and_run(p, launch_config(), kHostSmCount, runner); },
                 [&](ExpectedStores& expected) { expect_rotation_stores(p, expected); });
  record_plan(plan.grid, plan.block_x * plan.block_y,
              {{"grid", plan.grid},
               {"block_x", plan.block_x},
               {"block_y", plan.block_y},
               {"vec", plan.vec},
               {"table_vec", plan.table_vec},
               {"index64", plan.index64 ? 1 : 0},
               {"heads_per_item", plan.heads_per_item},
               {"items", plan.items},
               {"min_blocks", plan.min_blocks},
               {"prefetch", plan.prefetch ? 1 : 0}});
}

void norm_rope_cuda_host(const NormRopeProblem& np) {
  NormHostRunner runner;
  const NormPlan plan = plan_and_run_norm(np, launch_config(), kHostSmCount, runner);
  record_plan(plan.grid, plan.block_x * plan.block_y,
              {{"grid", plan.grid},
               {"block_x", plan.block_x},
               {"block_y", plan.block_y},
               {"vec", plan.vec},
               {"table_vec", plan.table_vec},
               {"scale_runs", plan.scale_runs ? 1 : 0},
               {"items", plan.items},
               {"units", plan.units},
               {"min_blocks", plan.min_blocks},
               {"prefetch", plan.prefetch ? 1 : 0}});
}

std::string last_host_plan() {
  const std::lock_guard<std::mutex> lock(last_plan_mutex);
  return last_plan;
}

}  // namespace rope::cuda
