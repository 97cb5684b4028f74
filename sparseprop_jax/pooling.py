"""Max pooling with a gradient that XLA's CPU backend runs fast.

`max_pool` has the signature of `flax.nnx.max_pool` (and `flax.linen.max_pool`)
and gives the same values and gradients. Flax's gradient goes through XLA's
`select_and_scatter`, which the CPU backend runs one window at a time; here
the forward also records which tap of each window won (an int8 per output),
and the backward adds each tap's share of the output gradient into place with
a strided pad, all of which XLA fuses into loops over memory.

Ties go to the first maximum in row-major window order, as in Flax; a NaN in a
window makes the output NaN, and the gradient goes to the first NaN.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import flax.linen
import numpy as np
from jax import lax

from sparseprop_jax import _checks

Padding = Union[str, Sequence[tuple[int, int]]]


def _pads(where: str, padding: Padding, spatial: tuple[int, ...],
          window: tuple[int, ...], strides: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """`padding` as (low, high) pairs, one per spatial dim, as lax.reduce_window reads it."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{where}: padding must be 'SAME', 'VALID' or a sequence of "
                             f"(low, high) pairs, got {padding!r}")
        return tuple(lax.padtype_to_pads(spatial, window, strides, padding.upper()))
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: padding must be 'SAME', 'VALID' or a sequence of "
                         f"(low, high) pairs, got {padding!r}") from None
    if len(pads) != len(window):
        raise ValueError(f"{where}: padding {padding!r} must give one (low, high) pair per "
                         f"window dim ({len(window)})")
    if any(lo < 0 or hi < 0 for lo, hi in pads):
        raise ValueError(f"{where}: padding must not be negative, got {padding!r}")
    return pads


def _positive_ints(where: str, name: str, value, length: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be a sequence of ints, got {value!r}") from None
    if len(values) != length or any(v < 1 for v in values):
        raise ValueError(f"{where}: {name} must be {length} positive ints, got {value!r}")
    return values


def max_pool(inputs: jax.Array, window_shape: Sequence[int],
             strides: Sequence[int] | None = None, padding: Padding = "VALID") -> jax.Array:
    """Max pooling over the window dims of `inputs` (batch..., window dims..., features).

    Same arguments and results as `flax.nnx.max_pool`: `window_shape` and
    `strides` (default all 1) give one int per window dim, `padding` is
    "SAME", "VALID" or one (low, high) pair per window dim. Padded positions
    never win.
    """
    where = "max_pool"
    inputs = _checks.as_array(where, "inputs", inputs)
    window = _positive_ints(where, "window_shape", window_shape, len(tuple(window_shape)))
    if inputs.ndim < len(window) + 1:
        raise ValueError(f"{where}: inputs must have the {len(window)} window dims and a "
                         f"features dim, got shape {inputs.shape}")
    strides = (1,) * len(window) if strides is None else _positive_ints(
        where, "strides", strides, len(window))
    if not jnp.issubdtype(inputs.dtype, jnp.floating):  # no -inf to pad with; no gradient
        return flax.linen.max_pool(inputs, window, strides, padding)
    first = inputs.ndim - 1 - len(window)
    spatial = inputs.shape[first:-1]
    pads = _pads(where, padding, spatial, window, strides)
    out = tuple((size + lo + hi - w) // s + 1
                for size, (lo, hi), w, s in zip(spatial, pads, window, strides))
    if any(o < 1 for o in out):
        raise ValueError(f"{where}: the window {window} does not fit the padded input "
                         f"{tuple(size + lo + hi for size, (lo, hi) in zip(spatial, pads))}")
    return _max_pool(inputs, window, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
    # Without a gradient to take, XLA's reduce_window is the fastest forward.
    first = x.ndim - 1 - len(window)
    ones = (1,) * first
    return lax.reduce_window(x, -jnp.inf, lax.max, ones + window + (1,),
                             ones + strides + (1,), _spatial_pads(x.ndim, pads))


def _tap_index_dtype(window) -> np.dtype:
    return np.dtype(np.int8) if math.prod(window) <= 127 else np.dtype(np.int32)


def _taps(xp: jax.Array, window, strides, out):
    """(tap number, strided slice of the padded input that tap reads), in row-major order."""
    first = xp.ndim - 1 - len(window)
    for number, offsets in enumerate(itertools.product(*(range(w) for w in window))):
        start = (0,) * first + offsets + (0,)
        limit = (xp.shape[:first] + tuple(o + s * (n - 1) + 1
                                          for o, s, n in zip(offsets, strides, out))
                 + xp.shape[-1:])
        yield number, lax.slice(xp, start, limit, (1,) * first + tuple(strides) + (1,))


def _spatial_pads(ndim: int, pads) -> list[tuple[int, int]]:
    first = ndim - 1 - len(pads)
    return [(0, 0)] * first + list(pads) + [(0, 0)]


def _max_pool_fwd(x, window, strides, pads):
    first = x.ndim - 1 - len(window)
    out = tuple((size + lo + hi - w) // s + 1
                for size, (lo, hi), w, s in zip(x.shape[first:-1], pads, window, strides))
    xp = jnp.pad(x, _spatial_pads(x.ndim, pads), constant_values=-jnp.inf)
    index_dtype = _tap_index_dtype(window)
    y = tap = None
    for number, values in _taps(xp, window, strides, out):
        if y is None:
            y, tap = values, jnp.zeros(values.shape, index_dtype)
            continue
        # The first maximum wins; NaN beats everything but an earlier NaN.
        wins = (values > y) | (jnp.isnan(values) & ~jnp.isnan(y))
        y = jnp.where(wins, values, y)
        tap = jnp.where(wins, jnp.asarray(number, index_dtype), tap)
    return y, (tap, x.shape)


def _max_pool_bwd(window, strides, pads, residuals, dy):
    tap, shape = residuals
    first = len(shape) - 1 - len(window)
    out = dy.shape[first:-1]
    padded = shape[:first] + tuple(size + lo + hi for size, (lo, hi)
                                   in zip(shape[first:-1], pads)) + shape[-1:]
    zero = jnp.zeros((), dy.dtype)
    dxp = jnp.zeros(padded, dy.dtype)
    for number, offsets in enumerate(itertools.product(*(range(w) for w in window))):
        share = jnp.where(tap == number, dy, zero)
        # Tap `offsets` of output position o reads padded position o * s + offset.
        config = ([(0, 0, 0)] * first
                  + [(o, p - (o + s * (n - 1) + 1), s - 1)
                     for o, s, n, p in zip(offsets, strides, out, padded[first:-1])]
                  + [(0, 0, 0)])
        dxp = dxp + lax.pad(share, zero, config)
    crop = tuple(slice(lo, lo + size) for (lo, _), size in zip(pads, shape[first:-1]))
    return (dxp[(slice(None),) * first + crop + (slice(None),)],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
