// Handler symbols of the dense 2-D convolution's forward and weight gradient
// (dense_conv_ffi.cc), for the convolutions whose kernel rows are short (the
// 7x7 stem on 3 channels), where XLA's CPU backend runs them slowly
// (sparseprop_jax/dense_conv.py calls them).
#pragma once

#include "ffi_signature.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// Both take the strides along height and width.
// (x padded, NHWC; kernel, HWIO) -> y (NHWC)
inline constexpr Signature kDenseConvForwardSignature =
    signature({ffi::F32, ffi::F32}, {ffi::F32}, {"stride_h", "stride_w"});
// (x padded, NHWC; dy, NHWC) -> dkernel (HWIO)
inline constexpr Signature kDenseConvWeightGradSignature =
    signature({ffi::F32, ffi::F32}, {ffi::F32}, {"stride_h", "stride_w"});

XLA_FFI_DECLARE_HANDLER_SYMBOL(kDenseConvForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kDenseConvWeightGrad);

}  // namespace sparseprop
