"""`sparse_linear`: `x @ kernel + bias` with a sparse kernel, forward and backward in C++.

Forward, input gradient and weight gradient each cost O(batch x nnz). The
routines want the batch as the minor dimension; the C++ handlers transpose the
activations themselves, tile by tile of the batch. The residual for the weight
gradient is x^T, `[in_features, batch]`: the forward transposes x into it
rather than into scratch, so the backward reads x batch-minor without
transposing it again. With both gradients wanted, one pass over the kernel's
columns computes both.

With `feature_axis` other than the last, x is viewed as [groups, in, n] (the
dims before the axis, the axis, the dims after it): each group is already
batch-minor, so the feature-major targets read and write the activations in
place, and consecutive layers along one axis (a Mixer's token mixing) pay no
transposes at all.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import numpy as np

from sparseprop_jax import _checks, _ffi, _targets
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_2d(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    return _ffi.call(_targets.LINEAR_FORWARD, (x.shape[0], shape[1]), x, values, indptr, indices)


# symbolic_zeros: the forward learns which of x and the values need a gradient
# (`perturbed`), so a frozen weight costs no weight gradient and, more often,
# an input that is data (the first layer) costs no input gradient.
def _linear_2d_fwd(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    want_dx, want_dw = x.perturbed, values.perturbed
    x, values = x.value, values.value
    pattern = tuple(a.value for a in (indptr, indices, t_indptr, t_indices, t_perm))
    y_shape = (x.shape[0], shape[1])
    if not want_dw:
        y = _ffi.call(_targets.LINEAR_FORWARD, y_shape, x, values, *pattern[:2])
        return y, (None, values if want_dx else None, pattern)
    y, xt = _ffi.call(_targets.LINEAR_FORWARD_AND_XT, (y_shape, x.shape[::-1]), x, values,
                      *pattern[:2])
    return y, (xt, values if want_dx else None, pattern)


def _backward(targets, dx_shape, saved_x, values, pattern, dy):
    """The cotangents of (x, values, *pattern) for one layout's targets.

    `targets` are its (backward, input gradient, weight gradient) targets;
    `saved_x` is what its weight gradient reads (None when the values need no
    gradient), `values` None when x needs none.
    """
    backward, input_grad, weight_grad = targets
    indptr, indices = pattern[:2]
    # The pattern is integer data: no cotangent. None is a zero cotangent.
    none = (None,) * 5
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        return (None, None) + none
    if saved_x is not None and values is not None:
        dx, dvalues = _ffi.call(backward, (dx_shape, (indices.shape[0],)), dy, saved_x, values,
                                *pattern)
        return (dx, dvalues) + none
    if values is not None:
        return (_ffi.call(input_grad, dx_shape, dy, values, *pattern), None) + none
    if saved_x is not None:
        dvalues = _ffi.call(weight_grad, (indices.shape[0],), dy, saved_x, indptr, indices)
        return (None, dvalues) + none
    return (None, None) + none


def _linear_2d_bwd(shape, residuals, dy):
    xt, values, pattern = residuals
    targets = (_targets.LINEAR_BACKWARD, _targets.LINEAR_INPUT_GRAD, _targets.LINEAR_WEIGHT_GRAD)
    return _backward(targets, (dy.shape[0], shape[0]), xt, values, pattern, dy)


_linear_2d.defvjp(_linear_2d_fwd, _linear_2d_bwd, symbolic_zeros=True)


# The feature-major layer on x [groups, in, n]: x is its own residual (it is
# already batch-minor), and the same symbolic zeros as above.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_feature_major(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    return _ffi.call(_targets.LINEAR_FEATURE_MAJOR_FORWARD, (x.shape[0], shape[1], x.shape[2]),
                     x, values, indptr, indices)


def _linear_feature_major_fwd(shape, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    want_dx, want_dw = x.perturbed, values.perturbed
    x, values = x.value, values.value
    pattern = tuple(a.value for a in (indptr, indices, t_indptr, t_indices, t_perm))
    y = _ffi.call(_targets.LINEAR_FEATURE_MAJOR_FORWARD, (x.shape[0], shape[1], x.shape[2]), x,
                  values, *pattern[:2])
    return y, (x if want_dw else None, values if want_dx else None, pattern)


def _linear_feature_major_bwd(shape, residuals, dy):
    x, values, pattern = residuals
    targets = (_targets.LINEAR_FEATURE_MAJOR_BACKWARD, _targets.LINEAR_FEATURE_MAJOR_INPUT_GRAD,
               _targets.LINEAR_FEATURE_MAJOR_WEIGHT_GRAD)
    return _backward(targets, (dy.shape[0], shape[0], dy.shape[2]), x, values, pattern, dy)


_linear_feature_major.defvjp(_linear_feature_major_fwd, _linear_feature_major_bwd,
                             symbolic_zeros=True)


def sparse_linear(x: Any, weight: SparseWeight, bias: Optional[Any] = None, *,
                  feature_axis: int = -1) -> Array:
    """Applies a sparse kernel: `x @ weight.to_dense() + bias`, in O(batch x nnz).

    Differentiable (`jax.custom_vjp`) with respect to `x`, `weight.values` and
    `bias`; works under `jit`, `grad`, `vmap` and `checkpoint`.

    Args:
      x: float32 `[..., in_features]`, or with `feature_axis`, `in_features`
        along that axis.
      weight: the sparse `(in_features, out_features)` kernel.
      bias: optional float32 `[out_features]`.
      feature_axis: the axis of x the kernel contracts; the result has the
        out_features in its place. Other than the last, every other dim is
        batch, and x is read in place: a token-mixing layer on
        `[batch, tokens, dim]` is `sparse_linear(x, w, feature_axis=-2)`, the
        same as `jnp.swapaxes(sparse_linear(jnp.swapaxes(x, -1, -2), w), -1, -2)`
        but without the transposes.

    Returns:
      float32 `[..., out_features]`, or x's shape with out_features at
      `feature_axis`.
    """
    where = "sparse_linear"
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"{where}: weight must be a SparseWeight, got {type(weight).__name__}")
    pattern: SparsityPattern = weight.pattern
    if len(pattern.shape) != 2:
        raise ValueError(f"{where}: weight must be a 2-D (in_features, out_features) kernel, got "
                         f"shape {pattern.shape} (sparse_conv2d takes convolution kernels)")
    n_in, n_out = pattern.shape
    x = _checks.as_array(where, "x", x)
    _checks.check_dtype(where, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{where}: x must have shape [..., {n_in}] (in_features={n_in}), "
                         f"got {x.shape}")
    axis = _checks.check_axis(where, "feature_axis", feature_axis, x.ndim)
    if x.shape[axis] != n_in:
        expected = (f"shape [..., {n_in}]" if axis == x.ndim - 1 else
                    f"{n_in} along feature_axis {feature_axis}")
        raise ValueError(f"{where}: x must have {expected} (in_features={n_in}), got shape "
                         f"{x.shape}")
    weight.check(where)
    if bias is not None:
        bias = _checks.as_array(where, "bias", bias)
        _checks.check_dtype(where, "bias", bias)
        _checks.check_shape(where, "bias", bias, (n_out,))
    lead, trail = x.shape[:axis], x.shape[axis + 1:]
    size = functools.partial(np.prod, dtype=np.int64)
    if trail:
        x = x.reshape(int(size(lead)), n_in, int(size(trail)))
        layer = _linear_feature_major
    else:
        x = x.reshape(int(size(lead)), n_in)
        layer = _linear_2d
    x, values = _checks.promote_to_common(x, weight.values)
    # Under shard_map: the weight made varying like x, so its gradient is all-reduced once.
    operands = _ffi.match_vma(x, values, pattern.indptr, pattern.indices,
                              pattern.t_indptr, pattern.t_indices, pattern.t_perm)
    y = layer(pattern.shape, *operands).reshape(*lead, n_out, *trail)
    if bias is None:
        return y
    return y + bias.reshape(n_out, *(1,) * len(trail))

