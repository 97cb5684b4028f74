// The operands of one call of a linear layer's backward, for the handlers of
// both layouts (linear_ffi.cc, linear_feature_major_ffi.cc). Each handler
// fills the parts it has: the input gradient needs the values and the
// transposed pattern (and the pattern, to check the two against each other),
// the weight gradient the layer's saved input and the pattern.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace sparseprop {

namespace ffi = xla::ffi;

// D: the dtype of the activations and values (the index arrays are int32).
template <ffi::DataType D = ffi::F32>
struct LinearBackwardOperands {
  // The layer's input as the weight gradient reads it: x^T, [in, batch], as
  // the batch-major forward saves it; x itself, [groups, in, n], feature-major.
  ffi::Buffer<D>* x = nullptr;
  ffi::Buffer<D>* values = nullptr;
  ffi::Buffer<ffi::S32>* indptr = nullptr;
  ffi::Buffer<ffi::S32>* indices = nullptr;
  ffi::Buffer<ffi::S32>* t_indptr = nullptr;
  ffi::Buffer<ffi::S32>* t_indices = nullptr;
  ffi::Buffer<ffi::S32>* t_perm = nullptr;
  ffi::Result<ffi::Buffer<D>>* dx = nullptr;
  ffi::Result<ffi::Buffer<D>>* dvalues = nullptr;

  // The input gradient's operands alone.
  static LinearBackwardOperands input_grad(ffi::Buffer<D>& values,
                                           ffi::Buffer<ffi::S32>& indptr,
                                           ffi::Buffer<ffi::S32>& indices,
                                           ffi::Buffer<ffi::S32>& t_indptr,
                                           ffi::Buffer<ffi::S32>& t_indices,
                                           ffi::Buffer<ffi::S32>& t_perm,
                                           ffi::Result<ffi::Buffer<D>>& dx) {
    return {nullptr, &values, &indptr, &indices, &t_indptr, &t_indices, &t_perm, &dx, nullptr};
  }
  // The weight gradient's operands alone.
  static LinearBackwardOperands weight_grad(ffi::Buffer<D>& x,
                                            ffi::Buffer<ffi::S32>& indptr,
                                            ffi::Buffer<ffi::S32>& indices,
                                            ffi::Result<ffi::Buffer<D>>& dvalues) {
    return {&x, nullptr, &indptr, &indices, nullptr, nullptr, nullptr, nullptr, &dvalues};
  }
};

}  // namespace sparseprop
