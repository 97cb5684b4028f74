// Handler symbols of the sparse 2-D convolution, one pair per variant
// (conv_batch_ffi.cc, conv_width_ffi.cc), and the signatures both pairs
// share. Activations are NHWC; the attributes are those of ConvAttrs
// (conv_common.h).
#pragma once

#include "ffi_signature.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// Both variants' attributes: the stride, the kernel's height and width, and
// the pads (ConvAttrs in conv_common.h).
constexpr Signature conv_signature(std::initializer_list<ffi::DataType> operands,
                                   std::initializer_list<ffi::DataType> results) {
  return signature(operands, results,
                   {"stride", "kh", "kw", "pad_top", "pad_bottom", "pad_left", "pad_right"});
}
// Each for D, the dtype of the activations and values: F32 or BF16.
// (x, values, indptr, indices) -> y
template <ffi::DataType D>
inline constexpr Signature kConvForwardSignature =
    conv_signature({D, D, ffi::S32, ffi::S32}, {D});
// (x, dy, values, indptr, indices, t_indptr, t_indices, t_perm) -> (dx, dvalues)
template <ffi::DataType D>
inline constexpr Signature kConvBackwardSignature = conv_signature(
    {D, D, D, ffi::S32, ffi::S32, ffi::S32, ffi::S32, ffi::S32}, {D, D});

XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvBatchForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvBatchBackward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvBatchForwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvBatchBackwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvWidthForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvWidthBackward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvWidthForwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kConvWidthBackwardBf16);

}  // namespace sparseprop
