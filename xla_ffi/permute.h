// Moving a weight's per-entry floats between the pattern's order and the
// transposed pattern's: dst[p] = src[index[p]] (gather) or dst[index[p]] =
// src[p] (scatter), where index is the transposed permutation.
//
// Consecutive entries of the transposed pattern belong to different rows of
// the pattern, so each access lands on a line of its own, and with a few
// hundred thousand entries the array is past L2: the loops wait on the
// memory system, not on their instructions. The line `kPermuteAhead` entries
// on is prefetched, so its miss overlaps the work in between: both loops
// measured faster with every distance from 64 to 256, most with 128, alone
// and in the one-pass backward (see benchmarks/results/NOTES.md).
#pragma once

#include <cstdint>

#include "bfloat16.h"

namespace sparseprop {

constexpr int64_t kPermuteAhead = 128;

// dst[p] = src[index[p]] for p in [begin, end), widened to float.
template <typename Src>
inline void gather(const Src* src, const int32_t* index, int64_t begin, int64_t end,
                   float* dst) {
  int64_t p = begin;
  for (; p + kPermuteAhead < end; ++p) {
    __builtin_prefetch(src + index[p + kPermuteAhead], /*rw=*/0);
    dst[p] = as_float(src[index[p]]);
  }
  for (; p < end; ++p) dst[p] = as_float(src[index[p]]);
}

// dst[index[p]] = src[p] for p in [begin, end), rounded to Dst.
template <typename Dst>
inline void scatter(const float* src, const int32_t* index, int64_t begin, int64_t end,
                    Dst* dst) {
  int64_t p = begin;
  for (; p + kPermuteAhead < end; ++p) {
    __builtin_prefetch(dst + index[p + kPermuteAhead], /*rw=*/1);
    dst[index[p]] = rounded<Dst>(src[p]);
  }
  for (; p < end; ++p) dst[index[p]] = rounded<Dst>(src[p]);
}

}  // namespace sparseprop
