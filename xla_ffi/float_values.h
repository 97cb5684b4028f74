// The handlers' bridges between their operands' dtype T (float or BFloat16)
// and the routines, which take the values and write the weight gradient's
// sums in float: for float the buffers themselves, for bfloat16 float
// copies in scratch (the values widened by a phase that runs first, the sums
// rounded into the result by each task for its own entries).
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "bfloat16.h"
#include "ffi_common.h"

namespace sparseprop {

// The values of a call (`stack.count` slices of n at `src`) as float.
template <typename T>
class FloatValues {
 public:
  // For T other than float, appends to `phases` the phase that widens them.
  FloatValues(const T* src, const Stack& stack, int64_t n, int parts,
              std::vector<Phase>* phases)
      : src_(src), stack_(stack), n_(n) {
    if constexpr (!std::is_same_v<T, float>) {
      wide_ = scratch<float>(stack.count * n);
      Phase phase;
      for (int64_t v = 0; v < stack.count; ++v) split_even(n, v, 0, parts, &phase.tasks);
      phase.fn = [src, stack, n, wide = wide_](const Task& t) {
        const T* from = src + t.slice * stack.slice();
        float* to = wide.get() + t.slice * n;
        for (int64_t p = t.begin; p < t.end; ++p) to[p] = as_float(from[p]);
        return ffi::Error::Success();
      };
      phases->push_back(std::move(phase));
    }
  }
  // The values result slice v reads (the phase having run).
  const float* of(int64_t v) const {
    if constexpr (std::is_same_v<T, float>)
      return src_ + slice_offset(stack_, v);
    else
      return wide_.get() + stack_.index(v) * n_;
  }

 private:
  const T* src_;
  Stack stack_;
  int64_t n_;
  std::shared_ptr<float[]> wide_;
};

// The weight gradient of a call (`slices` slices of n entries at `dst`),
// summed in float.
template <typename T>
class FloatSums {
 public:
  FloatSums(T* dst, int64_t slices, int64_t n) : dst_(dst), n_(n) {
    if constexpr (!std::is_same_v<T, float>) sums_ = scratch<float>(slices * n);
  }
  // Where the routines write slice v's sums.
  float* of(int64_t v) const {
    if constexpr (std::is_same_v<T, float>)
      return dst_ + v * n_;
    else
      return sums_.get() + v * n_;
  }
  // Rounds entries [begin, end) of slice v's sums into the result.
  void finish(int64_t v, int64_t begin, int64_t end) const {
    if constexpr (!std::is_same_v<T, float>)
      for (int64_t p = begin; p < end; ++p) dst_[v * n_ + p] = rounded<T>(sums_[v * n_ + p]);
  }

 private:
  T* dst_;
  int64_t n_;
  std::shared_ptr<float[]> sums_;
};

}  // namespace sparseprop
