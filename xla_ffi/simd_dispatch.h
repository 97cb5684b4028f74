// Run-time choice of the routines' instruction set. The best path the CPU
// supports is the default; tests force the others (the scalar path is the
// reference the SIMD paths are checked against).
#pragma once

#include <string>
#include <vector>

#include "routines.h"

namespace sparseprop {

// Routines of the active path for dense operands stored as T (float or
// BFloat16).
template <typename T = float>
const RoutinesFor<T>& active_routines();

// Name of the active path, one of known_simd_paths().
std::string active_simd_path();

// Every path this build has, best first, whether this CPU can run it or not:
// the names of the dispatch table (simd_dispatch.cc), the one list of them.
std::vector<std::string> known_simd_paths();

// Paths this CPU can run, best first; "scalar" is always there.
std::vector<std::string> supported_simd_paths();

// Those of them whose routines for one dtype (bfloat16 if `bf16`, else
// float) are their own, not a better path's: running each runs every
// distinct implementation of that dtype's routines (avx512_bf16 runs
// avx512's float routines, so only the bfloat16 list has both).
std::vector<std::string> supported_simd_paths(bool bf16);

// Selects a path by name, or "auto" for the best supported one. Returns false
// (and changes nothing) for an unknown name or a path this CPU cannot run.
bool set_simd_path(const std::string& name);

// Number of tasks every handler call is split into, whatever its size; 0 (the
// default) means one per thread of XLA's pool for calls big enough to gain.
// Benchmarks use 1 to measure one thread; tests use odd counts to exercise the
// row splitting.
int tasks_per_call();
void set_tasks_per_call(int n);

}  // namespace sparseprop
