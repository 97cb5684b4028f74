// The Python extension: the FFI targets (handler capsules for
// jax.ffi.register_ffi_target, with their signatures), plus the run-time
// SIMD, threading and memory switches.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "conv_ffi.h"
#include "dense_conv_ffi.h"
#include "ffi_common.h"
#include "linear_feature_major_ffi.h"
#include "linear_ffi.h"
#include "norm_pool_ffi.h"
#include "simd_dispatch.h"

namespace nb = nanobind;

namespace {

using sparseprop::Signature;

// Every FFI target the extension registers: its name, handler and signature.
struct Target {
  const char* name;
  XLA_FFI_Handler* handler;
  const Signature* signature;
};

const Target kTargets[] = {
    {"sparseprop_linear_forward", sparseprop::kLinearForward,
     &sparseprop::kLinearForwardSignature<xla::ffi::F32>},
    {"sparseprop_linear_forward_and_xt", sparseprop::kLinearForwardAndXt,
     &sparseprop::kLinearForwardAndXtSignature<xla::ffi::F32>},
    {"sparseprop_linear_backward", sparseprop::kLinearBackward,
     &sparseprop::kLinearBackwardSignature<xla::ffi::F32>},
    {"sparseprop_linear_input_grad", sparseprop::kLinearInputGrad,
     &sparseprop::kLinearInputGradSignature<xla::ffi::F32>},
    {"sparseprop_linear_weight_grad", sparseprop::kLinearWeightGrad,
     &sparseprop::kLinearWeightGradSignature<xla::ffi::F32>},
    {"sparseprop_linear_forward_bf16", sparseprop::kLinearForwardBf16,
     &sparseprop::kLinearForwardSignature<xla::ffi::BF16>},
    {"sparseprop_linear_forward_and_xt_bf16", sparseprop::kLinearForwardAndXtBf16,
     &sparseprop::kLinearForwardAndXtSignature<xla::ffi::BF16>},
    {"sparseprop_linear_backward_bf16", sparseprop::kLinearBackwardBf16,
     &sparseprop::kLinearBackwardSignature<xla::ffi::BF16>},
    {"sparseprop_linear_input_grad_bf16", sparseprop::kLinearInputGradBf16,
     &sparseprop::kLinearInputGradSignature<xla::ffi::BF16>},
    {"sparseprop_linear_weight_grad_bf16", sparseprop::kLinearWeightGradBf16,
     &sparseprop::kLinearWeightGradSignature<xla::ffi::BF16>},
    {"sparseprop_linear_feature_major_forward", sparseprop::kLinearFeatureMajorForward,
     &sparseprop::kLinearForwardSignature<xla::ffi::F32>},
    {"sparseprop_linear_feature_major_backward", sparseprop::kLinearFeatureMajorBackward,
     &sparseprop::kLinearBackwardSignature<xla::ffi::F32>},
    {"sparseprop_linear_feature_major_input_grad", sparseprop::kLinearFeatureMajorInputGrad,
     &sparseprop::kLinearInputGradSignature<xla::ffi::F32>},
    {"sparseprop_linear_feature_major_weight_grad", sparseprop::kLinearFeatureMajorWeightGrad,
     &sparseprop::kLinearWeightGradSignature<xla::ffi::F32>},
    {"sparseprop_linear_feature_major_forward_bf16", sparseprop::kLinearFeatureMajorForwardBf16,
     &sparseprop::kLinearForwardSignature<xla::ffi::BF16>},
    {"sparseprop_linear_feature_major_backward_bf16",
     sparseprop::kLinearFeatureMajorBackwardBf16,
     &sparseprop::kLinearBackwardSignature<xla::ffi::BF16>},
    {"sparseprop_linear_feature_major_input_grad_bf16",
     sparseprop::kLinearFeatureMajorInputGradBf16,
     &sparseprop::kLinearInputGradSignature<xla::ffi::BF16>},
    {"sparseprop_linear_feature_major_weight_grad_bf16",
     sparseprop::kLinearFeatureMajorWeightGradBf16,
     &sparseprop::kLinearWeightGradSignature<xla::ffi::BF16>},
    {"sparseprop_conv_batch_forward", sparseprop::kConvBatchForward,
     &sparseprop::kConvForwardSignature<xla::ffi::F32>},
    {"sparseprop_conv_batch_backward", sparseprop::kConvBatchBackward,
     &sparseprop::kConvBackwardSignature<xla::ffi::F32>},
    {"sparseprop_conv_batch_forward_bf16", sparseprop::kConvBatchForwardBf16,
     &sparseprop::kConvForwardSignature<xla::ffi::BF16>},
    {"sparseprop_conv_batch_backward_bf16", sparseprop::kConvBatchBackwardBf16,
     &sparseprop::kConvBackwardSignature<xla::ffi::BF16>},
    {"sparseprop_conv_width_forward", sparseprop::kConvWidthForward,
     &sparseprop::kConvForwardSignature<xla::ffi::F32>},
    {"sparseprop_conv_width_backward", sparseprop::kConvWidthBackward,
     &sparseprop::kConvBackwardSignature<xla::ffi::F32>},
    {"sparseprop_conv_width_forward_bf16", sparseprop::kConvWidthForwardBf16,
     &sparseprop::kConvForwardSignature<xla::ffi::BF16>},
    {"sparseprop_conv_width_backward_bf16", sparseprop::kConvWidthBackwardBf16,
     &sparseprop::kConvBackwardSignature<xla::ffi::BF16>},
    {"sparseprop_dense_conv_forward", sparseprop::kDenseConvForward,
     &sparseprop::kDenseConvForwardSignature},
    {"sparseprop_dense_conv_weight_grad", sparseprop::kDenseConvWeightGrad,
     &sparseprop::kDenseConvWeightGradSignature},
    {"sparseprop_norm_pool_grad_sums", sparseprop::kNormPoolGradSums,
     &sparseprop::kNormPoolGradSumsSignature},
    {"sparseprop_norm_pool_input_grad", sparseprop::kNormPoolInputGrad,
     &sparseprop::kNormPoolInputGradSignature},
};

// A dtype as numpy names it.
std::string dtype_name(xla::ffi::DataType d) {
  switch (d) {
    case xla::ffi::DataType::F32: return "float32";
    case xla::ffi::DataType::BF16: return "bfloat16";
    case xla::ffi::DataType::S32: return "int32";
    case xla::ffi::DataType::S8: return "int8";
    default: return "dtype " + std::to_string(static_cast<int>(d));
  }
}

nb::dict describe(const Signature& s) {
  nb::list operands, results, attrs;
  for (int i = 0; i < s.n_operands; ++i) operands.append(dtype_name(s.operands[i]));
  for (int i = 0; i < s.n_results; ++i) results.append(dtype_name(s.results[i]));
  for (int i = 0; i < s.n_attrs; ++i) attrs.append(s.attrs[i]);
  nb::dict d;
  d["operands"] = nb::tuple(operands);
  d["results"] = nb::tuple(results);
  d["attrs"] = nb::tuple(attrs);
  return d;
}

}  // namespace

NB_MODULE(_sparseprop_jax_ffi, m) {
  m.doc() = "XLA FFI handlers of sparseprop_jax";

  m.def(
      "targets",
      []() {
        nb::dict targets;
        for (const Target& t : kTargets) {
          nb::dict entry = describe(*t.signature);
          entry["capsule"] = nb::capsule(reinterpret_cast<void*>(t.handler));
          targets[t.name] = entry;
        }
        return targets;
      },
      "Every FFI target: name -> {capsule, operands, results (dtypes), attrs (int64 names)}.");

  m.def("simd_path", &sparseprop::active_simd_path, "The instruction set of the routines in use.");
  m.def("known_simd_paths", &sparseprop::known_simd_paths,
        "Instruction sets this build has, best first, supported or not.");
  m.def("supported_simd_paths", nb::overload_cast<>(&sparseprop::supported_simd_paths),
        "Instruction sets this CPU can run, best first.");
  m.def("distinct_simd_paths",
        [](const std::string& dtype) {
          if (dtype != "float32" && dtype != "bfloat16")
            throw std::invalid_argument("dtype must be float32 or bfloat16, got " + dtype);
          return sparseprop::supported_simd_paths(dtype == "bfloat16");
        },
        nb::arg("dtype"),
        "The supported paths whose routines for dtype are their own, best first.");
  m.def(
      "set_simd_path",
      [](const std::string& name) {
        if (!sparseprop::set_simd_path(name))
          throw std::invalid_argument("unknown or unsupported SIMD path: " + name);
      },
      nb::arg("name"));
  m.def("cached_scratch_bytes", &sparseprop::cached_scratch_bytes,
        "Bytes of scratch buffers kept for reuse between calls.");
  m.def("release_scratch", &sparseprop::release_scratch,
        "Frees the scratch buffers kept for reuse.");
  m.def("tasks_per_call", &sparseprop::tasks_per_call);
  m.def("set_tasks_per_call", &sparseprop::set_tasks_per_call, nb::arg("n"));
}
