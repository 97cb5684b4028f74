"""BatchNorm in training mode, ReLU and max pool as one op: the ResNet stem's sequence.

`batch_norm_relu_max_pool(x, scale, bias, window_shape, strides, padding,
epsilon=...)` computes `max_pool(relu(BatchNorm(x)))` with the batch's
statistics, as `flax.nnx.BatchNorm` (training mode, `use_fast_variance`),
`jax.nn.relu` and `sparseprop_jax.max_pool` do one after another, and returns
the batch's mean and variance with it (for the running averages). The values
and gradients are theirs; the backward is different. Differentiated as three
ops, XLA's CPU backend spreads each pooled gradient back with a strided pad
per window tap and recomputes the normalisation inside each: for the
ResNet18 stem that is the slowest of the ops around the sparse layers. Here
the backward is two C++ passes over the pixels (`xla_ffi/norm_pool_ffi.cc`):
the sums BatchNorm's gradient needs over the batch, then the input gradient.

`sparseprop_jax.nnx.batch_norm_relu_max_pool(bn, x, ...)` applies it with an
`nnx.BatchNorm` layer's parameters and updates its running averages as the
layer would; a model keeps its layers and its state.

The fused backward runs for NHWC float32 inputs (4-D, features last) and
windows of at most 127 taps; any other input gets the three ops as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from sparseprop_jax import _checks, _ffi, _targets, pooling

Padding = Union[str, Sequence[tuple[int, int]]]


def _statistics(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The batch's mean and variance as flax.nnx.BatchNorm computes them (fast variance)."""
    mean = jnp.mean(x, axes)
    mean2 = jnp.mean(jnp.square(x), axes)
    return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


def normalize_relu(x, mean, invstd, scale, bias):
    """relu of BatchNorm's normalisation, in Flax's order: (x - mean) * (invstd * scale) + bias."""
    return jax.nn.relu((x - mean) * (invstd * scale) + bias)


def _unfused(x, scale, bias, window, strides, pads, epsilon):
    mean, var = _statistics(x, tuple(range(x.ndim - 1)))
    z = normalize_relu(x, mean, lax.rsqrt(var + epsilon), scale, bias)
    return pooling.max_pool(z, window, strides, pads), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, scale, bias, window, strides, pads, epsilon):
    return _fused_fwd(x, scale, bias, window, strides, pads, epsilon)[0]


def _fused_fwd(x, scale, bias, window, strides, pads, epsilon):
    mean, var = _statistics(x, (0, 1, 2))
    invstd = lax.rsqrt(var + epsilon)
    y, (taps, _) = pooling._max_pool_fwd(normalize_relu(x, mean, invstd, scale, bias), window,
                                         strides, pads)
    return (y, mean, var), (x, scale, mean, invstd, y, taps)


def _fused_bwd(window, strides, pads, epsilon, residuals, cotangents):
    # The mean and variance leave through lax.stop_gradient (batch_norm_relu_max_pool):
    # their cotangents are zeros.
    x, scale, mean, invstd, y, taps = residuals
    dy = cotangents[0]
    attrs = dict(window_h=window[0], window_w=window[1], stride_h=strides[0],
                 stride_w=strides[1], pad_top=pads[0][0], pad_left=pads[1][0])
    channels = x.shape[-1]
    g, sum_g, sum_gx = _ffi.call(_targets.NORM_POOL_GRAD_SUMS, (y.shape, (channels,), (channels,)),
                                 dy, y, taps, x, mean, **attrs)
    count = x.shape[0] * x.shape[1] * x.shape[2]
    sum_gxhat = invstd * sum_gx  # sum of g * xhat, xhat = (x - mean) * invstd
    a = scale * invstd
    # dx = a * (dz - mean(g) - xhat * mean(g * xhat))
    b = -a * invstd * sum_gxhat / count
    d = -a * sum_g / count
    dx = _ffi.call(_targets.NORM_POOL_INPUT_GRAD, x.shape, g, taps, x, mean, a, b, d, **attrs)
    return dx, sum_gxhat, sum_g


_fused.defvjp(_fused_fwd, _fused_bwd)


def batch_norm_relu_max_pool(x: jax.Array, scale: jax.Array, bias: jax.Array,
                             window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
                             padding: Padding = "VALID", *, epsilon: float = 1e-5
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`max_pool(relu(BatchNorm(x)))` with the batch's statistics: (y, batch mean, variance).

    `x` is [batch..., window dims..., features]; `scale` and `bias` are
    [features] (pass ones and zeros for a BatchNorm without them). The
    statistics are over every axis but the last, as `flax.nnx.BatchNorm`
    computes them (`use_fast_variance=True`), and come out of
    `lax.stop_gradient`: to update running averages, not to differentiate.
    `window_shape`, `strides` and `padding` are those of `max_pool` (and
    `flax.nnx.max_pool`).
    """
    where = "batch_norm_relu_max_pool"
    x = _checks.as_array(where, "x", x)
    scale = _checks.as_array(where, "scale", scale)
    bias = _checks.as_array(where, "bias", bias)
    window = pooling._positive_ints(where, "window_shape", window_shape,
                                    len(tuple(window_shape)))
    if x.ndim < len(window) + 1:
        raise ValueError(f"{where}: x must have the {len(window)} window dims and a features "
                         f"dim, got shape {x.shape}")
    for name, value in (("scale", scale), ("bias", bias)):
        if value.shape != x.shape[-1:]:
            raise ValueError(f"{where}: {name} must have shape ({x.shape[-1]},) (x's features), "
                             f"got {value.shape}")
    strides = (1,) * len(window) if strides is None else pooling._positive_ints(
        where, "strides", strides, len(window))
    first = x.ndim - 1 - len(window)
    pads = pooling._pads(where, padding, x.shape[first:-1], window, strides)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise ValueError(f"{where}: epsilon must be a non-negative number, got {epsilon!r}")
    epsilon = float(epsilon)
    fused = (x.ndim == 4 and len(window) == 2 and x.dtype == jnp.float32
             and scale.dtype == jnp.float32 and bias.dtype == jnp.float32
             and math.prod(window) <= 127 and x.size > 0)
    if fused:
        y, mean, var = _fused(x, scale, bias, window, strides, pads, epsilon)
    else:
        y, mean, var = _unfused(x, scale, bias, window, strides, pads, epsilon)
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)


__all__ = ["batch_norm_relu_max_pool"]
