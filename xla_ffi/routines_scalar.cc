// The scalar instantiation of the numeric routines: plain C++ on one float
// at a time, for every CPU. It is the reference the SIMD paths are tested
// against, and the only path on CPUs other than x86-64.
#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace scalar {

// What routines_impl.h needs to know of the instruction set (the members are
// explained in routines_avx2.cc).
struct Isa {
  static constexpr const char* kName = "scalar";
  // One float: no vectors.
  static constexpr int kWidth = 1;
  // Floats of a run the products hold in accumulators at once: 4.
  static constexpr int kRunVectors = 4;
  // 4, the size of the groups that finish every row anyway: a float has no
  // lanes for a larger group's transpose_sum to share.
  static constexpr int kEntryGroup = 4;
  // 4, the smaller of the vector paths' groups: the reference path is not
  // tuned for speed.
  static constexpr int kBackwardGroup = 4;
  // Yes, so that on every machine the tests hold the one-pass handler code
  // against the dense reference.
  static constexpr bool kOnePassBackward = true;
  // 1: no blocks in registers; `transpose` moves one float at a time.
  static constexpr int kTransposeBlock = 1;
  // No: no vectors.
  static constexpr bool kLineVectors = false;
  // No: plain C++ has no stores past the caches (and no stream, store_fence).
  static constexpr bool kStreamingStores = false;
  // No: bfloat16 is widened to float one element at a time.
  static constexpr bool kPairedBf16Dot = false;
  template <typename V>
  static V widen(const BFloat16* p) {
    return as_float(*p);
  }

  // Nothing to do: the reference path stays plain C++, without asm.
  template <typename V>
  static void keep_in_register(V&) {}
};

#include "routines_impl.h"

}  // namespace scalar
}  // namespace sparseprop
