"""Loads the compiled extension and registers its XLA FFI targets with JAX."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

try:
    from sparseprop_jax import _sparseprop_jax_ffi as _ext
except ImportError as err:  # e.g. importing the source tree instead of the install
    raise ImportError(
        "sparseprop_jax: the compiled extension _sparseprop_jax_ffi is missing. Install the "
        "package (`pip install .`, or the editable developer install in the README) and do not "
        "run Python from a folder where the source package shadows the installed one."
    ) from err

for _name, _capsule in _ext.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

LINEAR_FORWARD = "sparseprop_linear_forward"
LINEAR_FORWARD_RESIDUAL = "sparseprop_linear_forward_residual"
LINEAR_BACKWARD = "sparseprop_linear_backward"
LINEAR_INPUT_GRAD = "sparseprop_linear_input_grad"
LINEAR_WEIGHT_GRAD = "sparseprop_linear_weight_grad"
CONV_FORWARD = "sparseprop_conv_forward"
CONV_INPUT_GRAD = "sparseprop_conv_input_grad"
CONV_WEIGHT_GRAD = "sparseprop_conv_weight_grad"
CONV_NHWC_FORWARD = "sparseprop_conv_nhwc_forward"
CONV_NHWC_BACKWARD = "sparseprop_conv_nhwc_backward"

# SPARSEPROP_JAX_SIMD=scalar|avx2|avx512|auto picks the kernel path at import.
if os.environ.get("SPARSEPROP_JAX_SIMD"):
    _ext.set_simd_path(os.environ["SPARSEPROP_JAX_SIMD"])


# vmap: batched operands get their vmap dims in front and unbatched ones size-1
# dims there; the handlers loop over those leading dims, broadcasting size 1.
_VMAP_METHOD = "expand_dims"


def call(target: str, shapes, *operands: jax.Array, **attrs):
    """One float32 FFI call; `shapes` is one result shape or a tuple of them.

    Every custom call of the package goes through here, so how results are
    declared (shape, dtype, vmap rule) lives in one place.
    """
    if shapes and isinstance(shapes[0], tuple):
        result = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    else:
        result = jax.ShapeDtypeStruct(shapes, jnp.float32)
    return jax.ffi.ffi_call(target, result, vmap_method=_VMAP_METHOD)(*operands, **attrs)
