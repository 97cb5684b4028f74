// The avx2 instantiation of the numeric routines: AVX2 with FMA, 8 floats
// per vector. CMakeLists.txt compiles this file with -mavx2 -mfma;
// simd_dispatch.cc runs it only where the CPU has AVX2 and FMA.
#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "routines.h"

namespace sparseprop {
namespace avx2 {

// Everything routines_impl.h needs to know of the instruction set. Every
// routines_<isa>.cc defines a record with these members; stream and
// store_fence only where kStreamingStores is true.
struct Isa {
  // The path's name, as set_simd_path and known_simd_paths spell it.
  static constexpr const char* kName = "avx2";
  // Floats per vector: a 256-bit register.
  static constexpr int kWidth = 8;
  // Vectors of a run the products hold in accumulators at once: 8, a whole
  // 64-float batch tile in one pass over a row's entries, with 8 independent
  // multiply-add chains (4 left the two FMA ports half idle on their 4-cycle
  // latency, and read each row's indices and values twice per tile).
  static constexpr int kRunVectors = 8;
  // Entries of a row the weight gradients take together: 8, the lanes of
  // one vector. They share each load of the row's gradient, and
  // transpose_sum turns their 8 vectors into one of 8 sums in 7 shuffle-add
  // steps.
  static constexpr int kEntryGroup = 8;
  // Entries the one-pass backward takes together: 4, as many as the 16
  // vector registers hold next to x_m, dx_m and a run.
  static constexpr int kBackwardGroup = 4;
  // Whether the linear backward computes both gradients in one pass
  // (spmm_sddmm_indexed): no. On AVX2 it measured about even with the two
  // passes apart, and the scatter of its sums then made the whole backward
  // slower (see benchmarks/results/NOTES.md).
  static constexpr bool kOnePassBackward = false;
  // Side of the square blocks `transpose` moves in registers: 16, so that
  // each destination row of a block is one whole 64-byte line.
  static constexpr int kTransposeBlock = 16;
  // Whether one vector holds a whole 64-byte line: no (half a line), so a
  // 16 x 16 block goes as four 8 x 8 blocks.
  static constexpr bool kLineVectors = false;
  // Whether there are stores past the caches (non-temporal): yes,
  // _mm256_stream_ps, ordered by _mm_sfence.
  static constexpr bool kStreamingStores = true;
  // Whether the weight gradients multiply bfloat16 runs in pairs, with
  // float sums (vdpbf16ps: load_pairs, dot_pairs): no, AVX2 widens
  // bfloat16 to float in registers (a shift) and multiplies floats.
  static constexpr bool kPairedBf16Dot = false;
  // Loads kWidth bfloat16 at p (unaligned) as the floats they are: each
  // zero-extended to 32 bits, then moved to the upper half.
  template <typename V>
  static V widen(const BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return reinterpret_cast<V>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }

  // Stores the kWidth floats of v at dst (32-byte aligned) past the caches.
  template <typename V>
  static void stream(float* dst, V v) {
    _mm256_stream_ps(dst, reinterpret_cast<__m256>(v));
  }
  // Orders the streaming stores before the stores that follow it.
  static void store_fence() { _mm_sfence(); }
  // Keeps v in a vector register, where the compiler would otherwise fold
  // the load that made it into each use: an empty asm that claims to
  // change it, in any SSE/AVX register ("v").
  template <typename V>
  static void keep_in_register(V& v) {
    __asm__("" : "+v"(v));
  }
};

#include "routines_impl.h"

}  // namespace avx2
}  // namespace sparseprop
