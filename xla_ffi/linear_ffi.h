// Handler symbols of the sparse linear layer (defined in linear_ffi.cc) and
// their signatures. x and y are batch-major ([batch, features]); x^T is
// [in, batch], as the forward saves it for the backward.
#pragma once

#include "ffi_signature.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// Each for D, the dtype of the activations and values: F32 or BF16.
// (x, values, indptr, indices) -> y
template <ffi::DataType D>
inline constexpr Signature kLinearForwardSignature =
    signature({D, D, ffi::S32, ffi::S32}, {D});
// (x, values, indptr, indices) -> (y, x^T)
template <ffi::DataType D>
inline constexpr Signature kLinearForwardAndXtSignature =
    signature({D, D, ffi::S32, ffi::S32}, {D, D});
// (dy, x^T, values, indptr, indices, t_indptr, t_indices, t_perm) -> (dx, dvalues)
template <ffi::DataType D>
inline constexpr Signature kLinearBackwardSignature =
    signature({D, D, D, ffi::S32, ffi::S32, ffi::S32, ffi::S32, ffi::S32}, {D, D});
// (dy, values, indptr, indices, t_indptr, t_indices, t_perm) -> dx
template <ffi::DataType D>
inline constexpr Signature kLinearInputGradSignature =
    signature({D, D, ffi::S32, ffi::S32, ffi::S32, ffi::S32, ffi::S32}, {D});
// (dy, x^T, indptr, indices) -> dvalues
template <ffi::DataType D>
inline constexpr Signature kLinearWeightGradSignature =
    signature({D, D, ffi::S32, ffi::S32}, {D});

XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForwardAndXt);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearBackward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearInputGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearWeightGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForwardAndXtBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearBackwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearInputGradBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearWeightGradBf16);

}  // namespace sparseprop
