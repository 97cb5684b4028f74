// The avx512 instantiation of the numeric routines: AVX-512 F and VL, 16
// floats per vector. CMakeLists.txt compiles this file with -mavx512f
// -mavx512vl -mavx2 -mfma; simd_dispatch.cc runs it only where the CPU has
// AVX-512 F and VL.
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace avx512 {

#include "isa_avx512.h"

// What routines_impl.h needs to know of the instruction set.
struct Isa : Avx512Record {
  static constexpr const char* kName = "avx512";
  // No: bfloat16 is widened to float in registers (see avx512_bf16).
  static constexpr bool kPairedBf16Dot = false;
};

#include "routines_impl.h"

}  // namespace avx512
}  // namespace sparseprop
