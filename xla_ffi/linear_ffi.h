// Handler symbols of the sparse linear layer (defined in linear_ffi.cc).
#pragma once

#include "xla/ffi/api/ffi.h"

namespace sparseprop {
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForwardAndXt);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearBackward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearInputGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearWeightGrad);
}  // namespace sparseprop
