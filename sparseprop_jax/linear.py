"""`sparse_linear`: `x @ kernel + bias` with a sparse kernel, forward and backward in C++.

Forward, input gradient and weight gradient each cost O(batch x nnz). The
kernels want the batch as the minor dimension, so activations are transposed
on the way in; the transposed input is kept as the residual for the weight
gradient.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparseprop_jax import _checks, _ffi
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array

# vmap: batched operands get their vmap dims in front and unbatched ones size-1
# dims there; the handlers loop over those leading dims, broadcasting size 1.
_VMAP_METHOD = "expand_dims"


def _call(target: str, shape: tuple[int, ...], *operands: Array) -> Array:
    result = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, result, vmap_method=_VMAP_METHOD)(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_2d(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    y, _ = _linear_2d_fwd(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm)
    return y


def _linear_2d_fwd(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    batch = x.shape[0]
    xt = x.T
    yt = _call(_ffi.LINEAR_FORWARD, (shape[1], batch), xt, values, indptr, indices)
    return yt.T, (xt, values, indptr, indices, t_indptr, t_indices, t_perm)


def _linear_2d_bwd(shape, residuals, dy):
    xt, values, indptr, indices, t_indptr, t_indices, t_perm = residuals
    batch = xt.shape[1]
    dyt = dy.T
    dxt = _call(_ffi.LINEAR_INPUT_GRAD, (shape[0], batch), dyt, values, t_indptr, t_indices,
                t_perm)
    dvalues = _call(_ffi.LINEAR_WEIGHT_GRAD, values.shape, dyt, xt, indptr, indices)
    # The pattern is integer data: no cotangent.
    return dxt.T, dvalues, None, None, None, None, None


_linear_2d.defvjp(_linear_2d_fwd, _linear_2d_bwd)


def sparse_linear(x: Any, weight: SparseWeight, bias: Optional[Any] = None) -> Array:
    """Applies a sparse kernel: `x @ weight.to_dense() + bias`, in O(batch x nnz).

    Differentiable (`jax.custom_vjp`) with respect to `x`, `weight.values` and
    `bias`; works under `jit`, `grad`, `vmap` and `checkpoint`.

    Args:
      x: float32 `[..., in_features]`.
      weight: the sparse `(in_features, out_features)` kernel.
      bias: optional float32 `[out_features]`.

    Returns:
      float32 `[..., out_features]`.
    """
    where = "sparse_linear"
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"{where}: weight must be a SparseWeight, got {type(weight).__name__}")
    pattern: SparsityPattern = weight.pattern
    if len(pattern.shape) != 2:
        raise ValueError(f"{where}: weight must be a 2-D (in_features, out_features) kernel, got "
                         f"shape {pattern.shape} (sparse_conv2d takes convolution kernels)")
    n_in, n_out = pattern.shape
    x = jnp.asarray(x)
    _checks.check_float32(where, "x", x)
    if x.ndim < 1 or x.shape[-1] != n_in:
        raise ValueError(f"{where}: x must have shape [..., {n_in}] (in_features={n_in}), "
                         f"got {x.shape}")
    weight.check(where)
    if bias is not None:
        _checks.check_float32(where, "bias", bias)
        _checks.check_shape(where, "bias", bias, (n_out,))
    lead = x.shape[:-1]
    y = _linear_2d(pattern.shape, x.reshape(int(np.prod(lead, dtype=np.int64)), n_in),
                   weight.values, pattern.indptr, pattern.indices, pattern.t_indptr,
                   pattern.t_indices, pattern.t_perm)
    y = y.reshape(*lead, n_out)
    return y if bias is None else y + bias

