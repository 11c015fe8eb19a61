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
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

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
  template <typename T, int N>
  static void store(T* p, const Pack<T, N>& v) {
    check_aligned<T, N>(p, "a store");
    for (int j = 0; j < N; ++j) ++current_check->stores[reinterpret_cast<uintptr_t>(p + j)];
    std::memcpy(p, &v, sizeof(v));
  }
};

struct HostRunner {
  template <typename scalar_t, typename table_t, int N, typename Index>
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

// Every element the launch had to write, stored exactly once, and nothing else stored.
void check_stores(const RopeProblem& p, LaunchCheck& check) {
  static const char* names[2][2] = {{"x", "x"}, {"q", "k"}};
  const int64_t elem = c10::elementSize(p.x_dtype);
  int64_t expected = 0;
  for (int i = 0; i < p.num_x; ++i) {
    const HeadsDesc& d = p.x[i];
    // In place, the pass-through tail x[r:] is not written.
    const int64_t dims = d.in == d.out ? 2 * p.pairs : d.head_dim;
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t s = 0; s < p.seq; ++s) {
        for (int64_t h = 0; h < d.heads; ++h) {
          for (int64_t e = 0; e < dims; ++e) {
            const int64_t off = b * d.out_stride_batch + s * d.out_stride_seq +
                                h * d.out_stride_head + e * d.out_stride_dim;
            const auto addr =
                reinterpret_cast<uintptr_t>(d.out) + static_cast<uintptr_t>(off * elem);
            const auto it = check.stores.find(addr);
            const uint32_t times = it == check.stores.end() ? 0 : it->second;
            TORCH_CHECK(times == 1, "rope cuda-host: output element ", names[p.num_x - 1][i], "[",
                        b, ", ", s, ", ", h, ", ", e, "] was stored ", times,
                        " times in one launch (expected exactly once)");
            ++expected;
          }
        }
      }
    }
  }
  TORCH_CHECK(static_cast<int64_t>(check.stores.size()) == expected,
              "rope cuda-host: the launch "
              "stored ",
              check.stores.size() - expected, " elements outside its outputs");
}

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
                                               : nullptr;
    if (field == nullptr || eq == std::string::npos) {
      return "unknown setting '" + item +
             "'; the settings are block_threads, max_blocks_per_sm, "
             "fill_blocks_per_sm, heads_per_item, index_bits, sm_count, vectorize (key=value)";
    }
    const std::string value = item.substr(eq + 1);
    char* end = nullptr;
    const long v = std::strtol(value.c_str(), &end, 10);
    const bool ok = !value.empty() && *end == '\0' && v >= 0 && v <= 1024 &&
                    (key != "block_threads" || v >= 1) &&
                    (key != "index_bits" || v == 0 || v == 32 || v == 64);
    if (!ok) {
      return "bad value '" + value + "' for " + key +
             " (an integer in [0, 1024]; block_threads >= 1; index_bits 0, 32 or 64)";
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

void rope_cuda_host(const RopeProblem& p) {
  // As many multiprocessors as an H100 or H200 (132) unless the config says otherwise.
  constexpr int kHostSmCount = 132;
  LaunchCheck check;
  current_check = &check;
  HostRunner runner;
  LaunchPlan plan;
  try {
    plan = plan_and_run(p, launch_config(), kHostSmCount, runner);
  } catch (...) {
    current_check = nullptr;
    throw;
  }
  current_check = nullptr;
  TORCH_CHECK(plan.block_x * plan.block_y <= 1024 && plan.grid < (int64_t{1} << 31),
              "rope cuda-host: the plan exceeds CUDA's launch limits");
  check_stores(p, check);
  std::ostringstream text;
  text << "grid=" << plan.grid << ",block_x=" << plan.block_x << ",block_y=" << plan.block_y
       << ",vec=" << plan.vec << ",table_vec=" << plan.table_vec << ",index64=" << int(plan.index64)
       << ",heads_per_item=" << plan.heads_per_item << ",items=" << plan.items;
  const std::lock_guard<std::mutex> lock(last_plan_mutex);
  last_plan = text.str();
}

std::string last_host_plan() {
  const std::lock_guard<std::mutex> lock(last_plan_mutex);
  return last_plan;
}

}  // namespace rope::cuda
