// Handler symbol of the dense convolution's weight gradient (dense_conv_ffi.cc),
// the one product of a dense convolution that XLA's CPU backend runs slowly
// (sparseprop_jax/dense_conv.py calls it).
#pragma once

#include "ffi_signature.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// (x padded, NHWC; dy, NHWC) -> dkernel (HWIO); the strides along height and width.
inline constexpr Signature kDenseConvWeightGradSignature =
    signature({ffi::F32, ffi::F32}, {ffi::F32}, {"stride_h", "stride_w"});

XLA_FFI_DECLARE_HANDLER_SYMBOL(kDenseConvWeightGrad);

}  // namespace sparseprop
