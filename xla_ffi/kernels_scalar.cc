// The scalar instantiation of the sparse kernels (1 float lane(s) per vector).
#include <algorithm>
#include <utility>
#include <vector>

#include "sparse_kernels.h"

namespace sparseprop {
namespace scalar {
#define SPARSEPROP_SIMD_WIDTH 1
#include "kernels_impl.h"
#undef SPARSEPROP_SIMD_WIDTH
}  // namespace scalar
}  // namespace sparseprop
