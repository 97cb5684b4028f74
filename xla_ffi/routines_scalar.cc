// The scalar instantiation of the numeric routines (1 float lane(s) per vector).
#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace scalar {
#define SPARSEPROP_SIMD_WIDTH 1
#include "routines_impl.h"
#undef SPARSEPROP_SIMD_WIDTH
}  // namespace scalar
}  // namespace sparseprop
