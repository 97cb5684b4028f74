// Handler symbols of the sparse 2-D convolution (defined in conv_ffi.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

namespace sparseprop {
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvWeightGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvInputGrad);
// The batch variant on NHWC activations (row-run layout): forward, and dx with dvalues.
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvNhwcForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvNhwcBackward);
}  // namespace sparseprop
