// The avx512 instantiation of the numeric routines (16 float lane(s) per vector).
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace avx512 {
#define SPARSEPROP_SIMD_WIDTH 16
#include "routines_impl.h"
#undef SPARSEPROP_SIMD_WIDTH
}  // namespace avx512
}  // namespace sparseprop
