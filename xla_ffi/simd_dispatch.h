// Run-time choice of the kernel instruction set. The best path the CPU
// supports is the default; tests force the others (the scalar path is the
// reference the SIMD paths are checked against).
#pragma once

#include <string>
#include <vector>

#include "sparse_kernels.h"

namespace sparseprop {

// Kernels of the active path.
const KernelTable& active_kernels();

// Name of the active path: "avx512", "avx2" or "scalar".
std::string active_simd_path();

// Paths this CPU can run, best first; "scalar" is always there.
std::vector<std::string> supported_simd_paths();

// Selects a path by name, or "auto" for the best supported one. Returns false
// (and changes nothing) for an unknown name or a path this CPU cannot run.
bool set_simd_path(const std::string& name);

// Upper bound on the tasks one kernel call is split into (0: one per thread of
// XLA's pool).
int max_tasks();
void set_max_tasks(int n);

}  // namespace sparseprop
