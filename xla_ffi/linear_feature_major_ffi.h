// Handler symbols of the feature-major sparse linear layer (defined in
// linear_feature_major_ffi.cc). x, y and their
// gradients are [groups, features, n]: the features of each group's n
// columns along the middle dim, which the layer contracts, as in a Mixer's
// token mixing on [batch, tokens, dim]. The batch is groups x n.
#pragma once

#include "linear_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace sparseprop {

// The handlers bind linear_ffi.h's signatures: the same operands, in the
// same order, with x (not x^T) where the weight gradient reads the input.
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorForward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorBackward);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorInputGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorWeightGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorForwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorBackwardBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorInputGradBf16);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kLinearFeatureMajorWeightGradBf16);

}  // namespace sparseprop
