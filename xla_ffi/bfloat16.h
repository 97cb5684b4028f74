// bfloat16 as XLA's BF16 buffers hold it, and its conversions to and from
// float. The functions have internal linkage (static), so each instruction
// set's translation unit compiles its own copy with its own flags, and none
// can be linked into another's path.
#pragma once

#include <cstdint>
#include <type_traits>

namespace sparseprop {

// The upper 16 bits of a float32.
using BFloat16 = uint16_t;

static inline float as_float(float v) { return v; }
// Exact: a bfloat16 is the float with the same upper bits and zero below.
static inline float as_float(BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// A float rounded to the nearest bfloat16, ties to even; a NaN stays a
// (quiet) NaN. Plain integer code, the same on every path, so that every
// path rounds alike (AVX512_BF16's vcvtneps2bf16 would flush denormals).
// (A select, not a branch, so that loops over rows of them vectorise.)
static inline BFloat16 round_to_bfloat16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof bits);
  const uint32_t nearest = bits + 0x7fffu + ((bits >> 16) & 1u);
  const uint32_t quiet_nan = bits | 0x400000u;
  return static_cast<BFloat16>(((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : nearest) >> 16);
}

// f as a T: itself for float, rounded for BFloat16.
template <typename T>
static inline T rounded(float f) {
  if constexpr (std::is_same_v<T, float>)
    return f;
  else
    return round_to_bfloat16(f);
}

}  // namespace sparseprop
