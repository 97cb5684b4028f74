// The avx2 instantiation of the numeric routines (8 float lane(s) per vector).
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace avx2 {
#define SPARSEPROP_SIMD_WIDTH 8
#include "routines_impl.h"
#undef SPARSEPROP_SIMD_WIDTH
}  // namespace avx2
}  // namespace sparseprop
