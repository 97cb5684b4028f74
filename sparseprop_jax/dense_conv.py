"""A dense convolution whose gradients XLA's CPU backend runs fast: patches times a matrix.

`conv_general_dilated` has the signature of `jax.lax.conv_general_dilated`,
so it can be given to `flax.nnx.Conv(..., conv_general_dilated=...)` or
`flax.linen.Conv(conv_general_dilated=...)` for the convolutions a model keeps
dense (`sparsify` does that for nnx models by default). For an undilated,
ungrouped convolution the products are with the input's patches. For a 2-D
float32 convolution with short kernel rows (the 7x7 stem on 3 channels) the
forward and the weight gradient are C++ products that read each patch where
it lies in the input (`_in_cpp`); otherwise the forward is XLA's and the
weight gradient multiplies the patches (gathered by strided slices), laid
out feature-major, by the output gradient. The input gradient multiplies the
output gradient by the kernel and scatters the product back through the
slices' transpose (pads and adds that XLA fuses). XLA's own convolution
gradients, above all the weight gradient of a 7x7 stem on 3 channels, are
several times slower (`benchmarks/results/NOTES.md`). The price is memory in
the backward pass: the patches hold kh * kw copies of the input.

A bfloat16 convolution runs these float32 products on its widened operands
and rounds the result to bfloat16 (each gradient comes back in its
operand's dtype): the C++ products are float32, and XLA's own bfloat16
convolutions on CPUs were slower than the float32 ones (the mixed-precision
ResNet18 step in `benchmarks/results/end_to_end-avx512_bf16-bfloat16.txt`).

Other convolutions (dilated, grouped, other layouts than channels last,
negative padding) go to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from sparseprop_jax import _ffi, _targets

# A 2-D float32 convolution runs its forward and weight gradient as the C++
# products (xla_ffi/dense_conv_ffi.cc) where a kernel row has at most this
# many entries (kw x cin): there they measured faster than XLA's convolution
# and patches times dy (the ResNet18 stem, 7 x 3, and 3 x 64), and slower
# from 3 x 128 up, where XLA's products of the larger matrices are the faster
# (benchmarks/results/NOTES.md).
_CPP_MAX_ROW = 192

# Below this many input channels the patches are gathered in two steps (all
# taps of a row, then the rows): fewer, wider slices for the 3-channel stem.
_TWO_STEP_BELOW_CHANNELS = 16


def _channels_last(ndim: int, dimension_numbers: Any) -> Optional[lax.ConvDimensionNumbers]:
    """The spec of channels-last (N..C, ..IO, N..C) dimension numbers, or None for another."""
    spatial = tuple(range(1, ndim - 1))
    want = lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1, *spatial),
                                    rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
                                    out_spec=(0, ndim - 1, *spatial))
    if dimension_numbers is None:
        return None  # lax's default is channels first
    try:
        got = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    except (TypeError, ValueError):
        return None
    return want if got == want else None


def _taps(x: jax.Array, axis: int, taps: int, stride: int, out: int) -> list[jax.Array]:
    """The `taps` strided slices of `x` along `axis`, each `out` long."""
    return [lax.slice_in_dim(x, t, t + stride * (out - 1) + 1, stride, axis)
            for t in range(taps)]


def _patches(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...],
             out: tuple[int, ...], features: int) -> jax.Array:
    """The padded input's patches, in the kernel's (taps, C) order, on axis `features`.

    `x` is [N, *spatial, C] (`features` = -1; gives [N, *out, K]) or
    [C, N, *spatial] (`features` = 0; gives [K, N, *out]), K = prod(window) * C.
    """
    spatial = len(window)
    first = 1 if features == -1 else 2  # the first spatial axis

    def join(pieces):
        return jnp.concatenate(pieces, axis=features) if len(pieces) > 1 else pieces[0]

    if x.shape[features] < _TWO_STEP_BELOW_CHANNELS:
        # Innermost spatial axis first: its taps end up inside the earlier axes' taps,
        # the row-major order of the kernel's HW..IO.
        for axis in reversed(range(spatial)):
            x = join(_taps(x, first + axis, window[axis], strides[axis], out[axis]))
        return x
    pieces = [x]
    for axis in range(spatial):
        pieces = [s for p in pieces
                  for s in _taps(p, first + axis, window[axis], strides[axis], out[axis])]
    return join(pieces)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _patch_conv(x, kernel, strides, pads, dimension_numbers, precision):
    return _patch_conv_fwd(x, kernel, strides, pads, dimension_numbers, precision)[0]


def _geometry(x_shape, kernel_shape, strides, pads):
    """(window, output spatial shape) of a channels-last convolution."""
    window = tuple(kernel_shape[:-2])
    out = tuple((x_shape[1 + a] + lo + hi - window[a]) // strides[a] + 1
                for a, (lo, hi) in enumerate(pads))
    return window, out


def _pad(x, pads, spatial_first):
    """Zero-pads the spatial axes, which start at axis `spatial_first`."""
    if all(p == (0, 0) for p in pads):
        return x
    widths = [(0, 0)] * x.ndim
    widths[spatial_first:spatial_first + len(pads)] = pads
    return jnp.pad(x, widths)


def _in_cpp(x, kernel) -> bool:
    """Whether the C++ products (xla_ffi/dense_conv_ffi.cc) run this convolution."""
    return (kernel.ndim == 4 and x.dtype == jnp.float32
            and kernel.shape[1] * kernel.shape[2] <= _CPP_MAX_ROW)


def _patch_conv_fwd(x, kernel, strides, pads, dimension_numbers, precision):
    if _in_cpp(x, kernel):
        _, out = _geometry(x.shape, kernel.shape, strides, pads)
        y = _ffi.call(_targets.DENSE_CONV_FORWARD, (x.shape[0], *out, kernel.shape[-1]),
                      _pad(x, pads, 1), kernel, stride_h=strides[0], stride_w=strides[1])
    else:
        # XLA's forward convolution is as fast as patches times the kernel (and
        # needs no patches in memory); its gradients are what is slow.
        y = lax.conv_general_dilated(x, kernel, strides, pads, precision=precision,
                                     dimension_numbers=dimension_numbers)
    return y, (x, kernel)


def _patch_conv_bwd(strides, pads, dimension_numbers, precision, residuals, dy):
    del dimension_numbers  # channels last, which the patches assume
    x, kernel = residuals
    window, out = _geometry(x.shape, kernel.shape, strides, pads)
    cout = kernel.shape[-1]
    if _in_cpp(x, kernel):
        # The C++ product reads the patches where they lie.
        dkernel = _ffi.call(_targets.DENSE_CONV_WEIGHT_GRAD, kernel.shape, _pad(x, pads, 1), dy,
                            stride_h=strides[0], stride_w=strides[1])
    else:
        # The weight gradient from feature-major patches [K, N * pixels]: a plain
        # product, where [N * pixels, K] patches would need the transpose of one
        # operand (of dy, fused into the producer of dy, in XLA's CPU schedule).
        x_t = jnp.moveaxis(x, -1, 0)
        patches_t = _patches(_pad(x_t, pads, 2), window, strides, out, 0)
        dkernel = lax.dot_general(patches_t.reshape(patches_t.shape[0], -1),
                                  dy.reshape(-1, cout), (((1,), (0,)), ((), ())),
                                  precision=precision)
    # The input gradient: the patches' gradient, scattered back by the slices' transpose.
    dpatches = lax.dot_general(dy, kernel.reshape(-1, cout), (((x.ndim - 1,), (1,)), ((), ())),
                               precision=precision)
    _, patches_vjp = jax.vjp(
        lambda x: _patches(_pad(x, pads, 1), window, strides, out, -1), x)
    (dx,) = patches_vjp(dpatches)
    return dx, dkernel.reshape(kernel.shape)


_patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)


def _pads(padding: Union[str, Sequence[tuple[int, int]]], spatial_shape: tuple[int, ...],
          window: tuple[int, ...], strides: tuple[int, ...]) -> Optional[list[tuple[int, int]]]:
    """`padding` as (low, high) pairs, or None where lax should run (and judge) it."""
    try:
        if isinstance(padding, str):
            return list(lax.padtype_to_pads(spatial_shape, window, strides, padding))
        pads = [(int(lo), int(hi)) for lo, hi in padding]
    except (TypeError, ValueError, RuntimeError):
        return None
    ok = len(pads) == len(window) and all(lo >= 0 and hi >= 0 for lo, hi in pads)
    return pads if ok else None


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Union[str, Sequence[tuple[int, int]]],
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, out_sharding: Any = None,
                         **kwargs) -> jax.Array:
    """`jax.lax.conv_general_dilated`, with gradients as products with patches where it can.

    Takes exactly `lax.conv_general_dilated`'s arguments and gives its
    result (to float rounding). For channels-last convolutions (NHWC inputs
    and outputs, an HWIO kernel, or their 1-D and 3-D forms) without
    dilation, groups, negative padding or `out_sharding`, the gradients are
    products with the input's patches (see the module doc); any other goes
    to `lax.conv_general_dilated`.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    ndim = lhs.ndim
    spatial = ndim - 2
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    pads = None
    if (ndim >= 3 and rhs.ndim == ndim and not dilated and feature_group_count == 1
            and batch_group_count == 1 and out_sharding is None and not kwargs
            and (channels_last := _channels_last(ndim, dimension_numbers)) is not None
            and len(tuple(window_strides)) == spatial):
        strides = tuple(int(s) for s in window_strides)
        pads = _pads(padding, tuple(lhs.shape[1:-1]), tuple(rhs.shape[:spatial]), strides)
    if pads is not None:
        _, out = _geometry(lhs.shape, rhs.shape, strides, pads)
        promoted = jnp.result_type(lhs, rhs)
        if (any(o <= 0 for o in out) or rhs.shape[-2] != lhs.shape[-1]
                or not jnp.issubdtype(promoted, jnp.floating)
                or preferred_element_type not in (None, promoted)):
            pads = None  # lax gives the error or the empty result
    if pads is None or kwargs:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        batch_group_count, precision, preferred_element_type,
                                        out_sharding=out_sharding, **kwargs)
    # bfloat16 in float32 products, rounded once (see the module doc).
    compute = jnp.float32 if promoted == jnp.bfloat16 else promoted
    y = _patch_conv(lhs.astype(compute), rhs.astype(compute), strides, tuple(pads),
                    channels_last, precision)
    return y.astype(promoted)


__all__ = ["conv_general_dilated"]
