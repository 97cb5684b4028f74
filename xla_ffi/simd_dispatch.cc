#include "simd_dispatch.h"

#include <algorithm>
#include <atomic>

namespace sparseprop {

// Each instruction set's routines (routines_<isa>.cc), compiled in its own
// translation unit with its own target flags (CMakeLists.txt).
#define SPARSEPROP_DECLARE_TABLES(isa)                         \
  namespace isa {                                              \
  extern const Routines kRoutines;                             \
  extern const RoutinesFor<BFloat16> kBf16Routines;            \
  }
SPARSEPROP_DECLARE_TABLES(scalar)
#if defined(SPARSEPROP_X86_SIMD)
SPARSEPROP_DECLARE_TABLES(avx2)
SPARSEPROP_DECLARE_TABLES(avx512)
namespace avx512_bf16 {
extern const RoutinesFor<BFloat16> kBf16Routines;  // its float routines are avx512's
}
#endif
#undef SPARSEPROP_DECLARE_TABLES

namespace {

// A path's tables for each dtype. Its name is its bfloat16 table's (every
// path has its own): its float table may be another path's, where the two
// differ only in their bfloat16 routines.
struct Path {
  const Routines* routines;
  const RoutinesFor<BFloat16>* bf16_routines;
  bool (*cpu_supports)();
  const char* name() const { return bf16_routines->name; }
  // The instruction set whose code the table for one dtype is.
  const char* table_name(bool bf16) const { return bf16 ? bf16_routines->name : routines->name; }
};

// The CPU checks stay here, in a file compiled without any instruction set's
// flags: compiled beside the routines they guard, they could themselves use
// the instructions the CPU lacks.
#if defined(SPARSEPROP_X86_SIMD)
// __builtin_cpu_init is needed because this runs from a static initializer,
// possibly before libgcc's own CPU detection.
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}
bool has_avx512_bf16() {
  return has_avx512() && __builtin_cpu_supports("avx512bf16");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif
bool always() { return true; }

// The dispatch table: every instruction set this build knows, best first.
// The one list of them in the code; Python reads it (known_simd_paths).
// Adding an instruction set takes a routines_<isa>.cc with its record `Isa`
// (routines_avx2.cc explains the members), its extern, CPU check and row
// here, and its source and flags in CMakeLists.txt (ROUTINES_ISAS).
const Path kPaths[] = {
#if defined(SPARSEPROP_X86_SIMD)
    // avx512_bf16 differs from avx512 only in its bfloat16 routines.
    {&avx512::kRoutines, &avx512_bf16::kBf16Routines, &has_avx512_bf16},
    {&avx512::kRoutines, &avx512::kBf16Routines, &has_avx512},
    {&avx2::kRoutines, &avx2::kBf16Routines, &has_avx2},
#endif
    {&scalar::kRoutines, &scalar::kBf16Routines, &always},
};
constexpr int kNumPaths = sizeof(kPaths) / sizeof(kPaths[0]);

int best_path() {
  for (int i = 0; i < kNumPaths; ++i)
    if (kPaths[i].cpu_supports()) return i;
  return kNumPaths - 1;
}

std::atomic<int> active{best_path()};
std::atomic<int> task_count{0};

}  // namespace

template <>
const RoutinesFor<float>& active_routines<float>() {
  return *kPaths[active.load(std::memory_order_relaxed)].routines;
}
template <>
const RoutinesFor<BFloat16>& active_routines<BFloat16>() {
  return *kPaths[active.load(std::memory_order_relaxed)].bf16_routines;
}

std::string active_simd_path() { return kPaths[active.load()].name(); }

std::vector<std::string> known_simd_paths() {
  std::vector<std::string> names;
  for (const Path& p : kPaths) names.push_back(p.name());
  return names;
}

std::vector<std::string> supported_simd_paths() {
  std::vector<std::string> names;
  for (const Path& p : kPaths)
    if (p.cpu_supports()) names.push_back(p.name());
  return names;
}

std::vector<std::string> supported_simd_paths(bool bf16) {
  const std::vector<std::string> supported = supported_simd_paths();
  std::vector<std::string> names;
  for (const Path& p : kPaths) {
    // The table's own path is the one named after it (its instruction set).
    const std::string owner = p.table_name(bf16);
    const bool runs_own = owner == p.name();
    if (p.cpu_supports() &&
        (runs_own || std::find(supported.begin(), supported.end(), owner) == supported.end()))
      names.push_back(p.name());
  }
  return names;
}

bool set_simd_path(const std::string& name) {
  if (name == "auto") {
    active.store(best_path());
    return true;
  }
  for (int i = 0; i < kNumPaths; ++i) {
    if (name == kPaths[i].name() && kPaths[i].cpu_supports()) {
      active.store(i);
      return true;
    }
  }
  return false;
}

int tasks_per_call() { return task_count.load(); }
void set_tasks_per_call(int n) { task_count.store(n < 0 ? 0 : n); }

}  // namespace sparseprop
