// The Python extension: FFI handler capsules for jax.ffi.register_ffi_target,
// plus the run-time SIMD and threading switches.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>

#include "conv_ffi.h"
#include "ffi_common.h"
#include "linear_ffi.h"
#include "simd_dispatch.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_sparseprop_jax_ffi, m) {
  m.doc() = "XLA FFI handlers of sparseprop_jax";

  m.def("registrations", []() {
    nb::dict targets;
    targets["sparseprop_linear_forward"] = capsule(sparseprop::kLinearForward);
    targets["sparseprop_linear_forward_and_xt"] = capsule(sparseprop::kLinearForwardAndXt);
    targets["sparseprop_linear_backward"] = capsule(sparseprop::kLinearBackward);
    targets["sparseprop_linear_input_grad"] = capsule(sparseprop::kLinearInputGrad);
    targets["sparseprop_linear_weight_grad"] = capsule(sparseprop::kLinearWeightGrad);
    targets["sparseprop_conv_forward"] = capsule(sparseprop::kConvForward);
    targets["sparseprop_conv_input_grad"] = capsule(sparseprop::kConvInputGrad);
    targets["sparseprop_conv_weight_grad"] = capsule(sparseprop::kConvWeightGrad);
    targets["sparseprop_conv_nhwc_forward"] = capsule(sparseprop::kConvNhwcForward);
    targets["sparseprop_conv_nhwc_backward"] = capsule(sparseprop::kConvNhwcBackward);
    return targets;
  });

  m.def("simd_path", &sparseprop::active_simd_path, "The instruction set of the routines in use.");
  m.def("known_simd_paths", &sparseprop::known_simd_paths,
        "Instruction sets this build has, best first, supported or not.");
  m.def("supported_simd_paths", &sparseprop::supported_simd_paths,
        "Instruction sets this CPU can run, best first.");
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
