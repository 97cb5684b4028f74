// The members of the AVX-512 instruction sets' records (routines_avx512.cc,
// routines_avx512_bf16.cc) that both share: AVX-512 F and VL, 16 floats per
// vector (the members are explained in routines_avx2.cc). Include only from
// within a path's namespace, in a file compiled with AVX-512 flags.
struct Avx512Record {
  // A 512-bit register.
  static constexpr int kWidth = 16;
  // Vectors of a run the products hold in accumulators at once: 4, a whole
  // 64-float batch tile.
  static constexpr int kRunVectors = 4;
  // 8: as on AVX2 (16 measured no faster and leaves longer padded tails).
  static constexpr int kEntryGroup = 8;
  // 8: the 32 vector registers hold 8 sums next to x_m, dx_m and a run.
  static constexpr int kBackwardGroup = 8;
  // Yes: on AVX-512 the one pass measured clearly faster than the two
  // passes apart (see benchmarks/results/NOTES.md).
  static constexpr bool kOnePassBackward = true;
  // 16, each destination row a whole 64-byte line.
  static constexpr int kTransposeBlock = 16;
  // Yes: a 16-float vector is one whole line, so a 16 x 16 block is
  // transposed in 16 registers and each line stored at once.
  static constexpr bool kLineVectors = true;
  // Yes: _mm512_stream_ps, ordered by _mm_sfence.
  static constexpr bool kStreamingStores = true;

  // As on AVX2 (routines_avx2.cc), 16 at a time.
  template <typename V>
  static V widen(const BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return reinterpret_cast<V>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  template <typename V>
  static void stream(float* dst, V v) {
    _mm512_stream_ps(dst, reinterpret_cast<__m512>(v));
  }
  static void store_fence() { _mm_sfence(); }
  // "v": any SSE/AVX/AVX-512 register.
  template <typename V>
  static void keep_in_register(V& v) {
    __asm__("" : "+v"(v));
  }
};
