// The avx512 instantiation of the sparse kernels (16 float lane(s) per vector).
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "sparse_kernels.h"

namespace sparseprop {
namespace avx512 {
#define SPARSEPROP_SIMD_WIDTH 16
#include "kernels_impl.h"
#undef SPARSEPROP_SIMD_WIDTH
}  // namespace avx512
}  // namespace sparseprop
