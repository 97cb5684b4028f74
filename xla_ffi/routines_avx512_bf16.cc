// The avx512_bf16 instantiation of the numeric routines: the avx512 path
// plus AVX512_BF16, whose vdpbf16ps multiplies pairs of bfloat16 into float
// sums. The weight gradients of bfloat16 operands use it; everything else is
// the avx512 path's code. CMakeLists.txt compiles this file with the avx512
// flags and -mavx512bf16; simd_dispatch.cc runs it only where the CPU has
// AVX-512 F, VL and BF16.
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace avx512_bf16 {

#include "isa_avx512.h"

// What routines_impl.h needs to know of the instruction set.
struct Isa : Avx512Record {
  static constexpr const char* kName = "avx512_bf16";
  // Yes: vdpbf16ps. It reads denormal bfloat16 inputs as zero (the widening
  // paths keep them), a difference of at most 2^-126 per product.
  static constexpr bool kPairedBf16Dot = true;

  // 32 bfloat16, 16 pairs, from p (unaligned).
  static __m512i load_pairs(const BFloat16* p) { return _mm512_loadu_si512(p); }
  // acc[i] += a[2i] * b[2i] + a[2i + 1] * b[2i + 1], in float.
  template <typename V>
  static V dot_pairs(V acc, __m512i a, __m512i b) {
    return reinterpret_cast<V>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc),
                                                reinterpret_cast<__m512bh>(a),
                                                reinterpret_cast<__m512bh>(b)));
  }
};

// Its float routines are avx512's (simd_dispatch.cc): no float table here.
#define SPARSEPROP_ROUTINES_BFLOAT16_ONLY
#include "routines_impl.h"
#undef SPARSEPROP_ROUTINES_BFLOAT16_ONLY

}  // namespace avx512_bf16
}  // namespace sparseprop
