// Handler symbols of the backward of BatchNorm, ReLU and max pool in that
// order (norm_pool_ffi.cc), NHWC, in two calls: the sums over the batch that
// BatchNorm's gradient needs, then the input gradient from them. Each splits
// over the batch, so a sharded batch gets its sums all-reduced in between.
#pragma once

#include "ffi_signature.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// The pool's window (height, width), strides and the pads before the image.
constexpr Signature norm_pool_signature(std::initializer_list<ffi::DataType> operands,
                                        std::initializer_list<ffi::DataType> results) {
  return signature(operands, results,
                   {"window_h", "window_w", "stride_h", "stride_w", "pad_top", "pad_left"});
}
// (dpool, pooled, taps, x, shift) -> (g, sum_g, sum_gx)
inline constexpr Signature kNormPoolGradSumsSignature = norm_pool_signature(
    {ffi::F32, ffi::F32, ffi::S8, ffi::F32, ffi::F32}, {ffi::F32, ffi::F32, ffi::F32});
// (g, taps, x, shift, a, b, d) -> dx
inline constexpr Signature kNormPoolInputGradSignature = norm_pool_signature(
    {ffi::F32, ffi::S8, ffi::F32, ffi::F32, ffi::F32, ffi::F32, ffi::F32}, {ffi::F32});

XLA_FFI_DECLARE_HANDLER_SYMBOL(kNormPoolGradSums);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kNormPoolInputGrad);

}  // namespace sparseprop
