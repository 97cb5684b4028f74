// The avx2 instantiation of the sparse kernels (8 float lane(s) per vector).
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "sparse_kernels.h"

namespace sparseprop {
namespace avx2 {
#define SPARSEPROP_SIMD_WIDTH 8
#include "kernels_impl.h"
#undef SPARSEPROP_SIMD_WIDTH
}  // namespace avx2
}  // namespace sparseprop
