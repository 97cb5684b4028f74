// Handler symbols of the sparse linear layer (defined in linear_ffi.cc) and
// their signatures. x and y are batch-major ([batch, features]); x^T is
// [in, batch], as the forward saves it for the backward.
#pragma once

#include "ffi_signature.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// (x, values, indptr, indices) -> y
inline constexpr Signature kLinearForwardSignature =
    signature({ffi::F32, ffi::F32, ffi::S32, ffi::S32}, {ffi::F32});
// (x, values, indptr, indices) -> (y, x^T)
inline constexpr Signature kLinearForwardAndXtSignature =
    signature({ffi::F32, ffi::F32, ffi::S32, ffi::S32}, {ffi::F32, ffi::F32});
// (dy, x^T, values, indptr, indices, t_indptr, t_indices, t_perm) -> (dx, dvalues)
inline constexpr Signature kLinearBackwardSignature = signature(
    {ffi::F32, ffi::F32, ffi::F32, ffi::S32, ffi::S32, ffi::S32, ffi::S32, ffi::S32},
    {ffi::F32, ffi::F32});
// (dy, values, indptr, indices, t_indptr, t_indices, t_perm) -> dx
inline constexpr Signature kLinearInputGradSignature = signature(
    {ffi::F32, ffi::F32, ffi::S32, ffi::S32, ffi::S32, ffi::S32, ffi::S32}, {ffi::F32});
// (dy, x^T, indptr, indices) -> dvalues
inline constexpr Signature kLinearWeightGradSignature =
    signature({ffi::F32, ffi::F32, ffi::S32, ffi::S32}, {ffi::F32});

XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearForwardAndXt);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearBackward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearInputGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearWeightGrad);

}  // namespace sparseprop
