"""Helpers shared by the Flax layers of `sparseprop_jax.nnx` and `sparseprop_jax.linen`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparseprop_jax import _checks
from sparseprop_jax.conv_variants import CHOICES as CONV_KERNELS
from sparseprop_jax.conv import (ConvPadding, conv_pair, parse_padding, parse_strides,
                                 sparse_conv2d)
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array
Initializer = Callable[..., Any]

DEFAULT_SPARSITY = 0.9

#: Names of the kernel dims, for messages: linear (in, out) and convolution HWIO kernels.
DENSE_DIMS = ("in_features", "out_features")
CONV_DIMS = ("kh", "kw", "in_features", "out_features")


def _layout(dims: tuple[str, ...]) -> str:
    return f"({', '.join(dims)})"


def random_pattern(where: str, shape: tuple[int, ...], sparsity: float,
                   key: Array) -> SparsityPattern:
    """A uniformly random pattern, with a clear error when `key` is traced."""
    # The number of nonzeros fixes array shapes, so patterns are built eagerly.
    if isinstance(key, jax.core.Tracer):
        raise TypeError(
            f"{where}: the sparsity pattern is drawn when the layer is initialised, which "
            "cannot happen under jit/eval_shape (the number of nonzeros fixes array shapes); "
            "initialise the layer outside jit")
    return SparsityPattern.random(shape, sparsity, key)


def layer_pattern(where: str, shape: tuple[int, ...], sparsity: Optional[float],
                  pattern: Optional[SparsityPattern], key: Callable[[], Array],
                  dims: tuple[str, ...] = DENSE_DIMS) -> SparsityPattern:
    """The pattern of an nnx layer: `pattern` checked against `shape`, or a random one.

    `key` is called (to draw an rng key) only when a random pattern is drawn.
    """
    if pattern is None:
        sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
        sparsity = _checks.check_sparsity(where, sparsity)
        return random_pattern(where, shape, sparsity, key())
    if sparsity is not None:
        raise ValueError(f"{where}: give sparsity or pattern, not both "
                         "(the pattern fixes the sparsity)")
    if not isinstance(pattern, SparsityPattern):
        raise TypeError(f"{where}: pattern must be a SparsityPattern, "
                        f"got {type(pattern).__name__}")
    if pattern.shape != tuple(shape):
        raise ValueError(f"{where}: pattern must have shape {tuple(shape)} "
                         f"{_layout(dims)}, got {pattern.shape}")
    return pattern


def dtype_name(dtype: Any) -> str:
    """`dtype`'s name for messages ("float16", not "<class 'jax.numpy.float16'>")."""
    if dtype is None:  # which jnp.dtype reads as float64
        return "None"
    try:
        return jnp.dtype(dtype).name
    except (TypeError, ValueError):
        return repr(dtype)


def check_dtype_arg(where: str, name: str, dtype: Any, optional: bool = False) -> Any:
    """A layer's `dtype`/`param_dtype` argument, returned as given (as flax keeps it) if the
    ops support it; otherwise a TypeError naming the argument and the supported dtypes.

    With `optional`, None (infer the dtype at call time) is accepted.
    """
    if dtype is None and optional:
        return None
    try:
        # jnp.dtype(None) is float64, so None is refused here explicitly.
        ok = dtype is not None and _checks.is_supported_dtype(dtype)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        supported = ", ".join(_checks.SUPPORTED_DTYPES) + (" or None" if optional else "")
        raise TypeError(f"{where}: {name} must be one of the supported dtypes ({supported}), "
                        f"got {dtype_name(dtype)}")
    return dtype


def init_values(where: str, kernel_init: Initializer, key: Array, pattern: SparsityPattern,
                param_dtype: Any = _checks.DEFAULT_DTYPE) -> Array:
    """Draws a dense kernel in `param_dtype` with `kernel_init` and keeps the entries on
    `pattern`."""
    kernel = kernel_init(key, pattern.shape, param_dtype)
    _checks.check_dtype(where, "kernel_init(...) result", kernel)
    _checks.check_shape(where, "kernel_init(...) result", kernel, pattern.shape)
    return SparseWeight.gather(kernel, pattern).values


def init_bias(where: str, bias_init: Initializer, key: Array, features: int,
              param_dtype: Any = _checks.DEFAULT_DTYPE) -> Array:
    """Draws a `[features]` bias in `param_dtype` with `bias_init`, checked."""
    bias = bias_init(key, (features,), param_dtype)
    _checks.check_dtype(where, "bias_init(...) result", bias)
    _checks.check_shape(where, "bias_init(...) result", bias, (features,))
    return bias


def check_dense(where: str, kernel: Any, bias: Any, mask: Any, kernel_name: str = "kernel",
                bias_name: str = "bias", dims: tuple[str, ...] = DENSE_DIMS,
                ) -> tuple[np.ndarray, SparsityPattern, Optional[Array]]:
    """Validates a dense kernel, bias and mask; returns the kernel, pattern and bias.

    `dims` names the kernel's dims (its length is the required rank): the
    default is a linear `(in_features, out_features)` kernel, `CONV_DIMS` an
    HWIO convolution kernel. The bias has the kernel's last dim. Without a
    mask the kernel's exact zeros define the pattern.
    """
    kernel = _checks.concrete(where, kernel_name, kernel)
    if kernel.ndim != len(dims):
        raise ValueError(f"{where}: {kernel_name} must be {len(dims)}-D {_layout(dims)}, "
                         f"got shape {kernel.shape}")
    _checks.check_dtype(where, kernel_name, kernel)
    for i, dim in enumerate(dims):
        _checks.check_features(where, f"{kernel_name}.shape[{i}] ({dim})", kernel.shape[i])
    if mask is None:
        mask = kernel != 0
    else:
        mask = _checks.concrete(where, "mask", mask)
        _checks.check_shape(where, "mask", mask, kernel.shape)
        if mask.dtype != np.bool_:
            raise TypeError(f"{where}: mask must be boolean, got {mask.dtype}")
    if bias is not None:
        bias = jnp.asarray(_checks.concrete(where, bias_name, bias))
        _checks.check_dtype(where, bias_name, bias)
        _checks.check_shape(where, bias_name, bias, (kernel.shape[-1],))
    return kernel, SparsityPattern.from_mask(mask), bias


# -- convolution layers -------------------------------------------------------
def conv_kernel_size(where: str, kernel_size: Any, name: str = "kernel_size") -> tuple[int, int]:
    """`(kh, kw)` from a pair; flax reads an int as a 1-D window, which is not supported."""
    if _checks.is_int(kernel_size):
        raise ValueError(
            f"{where}: {name} must be a pair (kh, kw), got {kernel_size!r}: an int is a 1-D "
            f"window in flax's Conv, and 1-D convolutions are not supported (for a square "
            f"window give ({kernel_size}, {kernel_size}))")
    if not isinstance(kernel_size, Sequence) or isinstance(kernel_size, str):
        raise ValueError(f"{where}: {name} must be a pair of ints (kh, kw), got {kernel_size!r}")
    if len(kernel_size) != 2:
        raise ValueError(f"{where}: {name}={tuple(kernel_size)!r} asks for a "
                         f"{len(kernel_size)}-D convolution, which is not supported (only 2-D: "
                         "a pair (kh, kw))")
    return tuple(_checks.check_features(where, f"{name}[{i}]", k)  # type: ignore[return-value]
                 for i, k in enumerate(kernel_size))


def conv_config(where: str, kernel_size: Any, strides: Any, padding: Any, *,
                input_dilation: Any = 1, kernel_dilation: Any = 1, feature_group_count: Any = 1,
                conv_variant: str = "auto", prefix: str = "",
                ) -> tuple[tuple[int, int], tuple[int, int], ConvPadding]:
    """Checks a conv layer's arguments (flax's forms); returns kernel_size, strides, padding.

    Raises ValueError naming the argument (with `prefix`, e.g. "conv.") for
    anything the sparse convolution does not support: dilation, feature groups,
    unequal strides, padding other than SAME/VALID/explicit, non-2-D windows.
    """
    kernel_size = conv_kernel_size(where, kernel_size, f"{prefix}kernel_size")
    strides = parse_strides(where, strides, f"{prefix}strides")
    padding = parse_padding(where, padding, f"{prefix}padding")
    for name, value in (("input_dilation", input_dilation),
                        ("kernel_dilation", kernel_dilation)):
        if not all(_checks.is_int(d) and d == 1 for d in conv_pair(where, prefix + name, value)):
            raise ValueError(f"{where}: {prefix}{name}={value!r} is not supported (only 1)")
    if not (_checks.is_int(feature_group_count) and feature_group_count == 1):
        raise ValueError(f"{where}: {prefix}feature_group_count={feature_group_count!r} is not "
                         "supported (only 1: no grouped or depthwise convolutions)")
    if not isinstance(conv_variant, str) or conv_variant not in CONV_KERNELS:
        raise ValueError(f"{where}: conv_variant must be one of {CONV_KERNELS}, "
                         f"got {conv_variant!r}")
    return kernel_size, strides, padding


def check_conv_inputs(where: str, inputs: Any) -> Array:
    """`inputs` as an array of rank >= 3 (`[*batch, H, W, C]`), or an error naming it."""
    inputs = _checks.as_array(where, "inputs", inputs)
    if inputs.ndim < 3:
        raise ValueError(f"{where}: inputs must have shape [N, H, W, C] (or [H, W, C], or more "
                         f"batch dims), got shape {inputs.shape}")
    return inputs


def apply_conv(where: str, inputs: Any, weight: SparseWeight, bias: Optional[Array],
               strides: tuple[int, int], padding: ConvPadding, conv_variant: str) -> Array:
    """`sparse_conv2d` on `[*batch, H, W, C]` inputs, as flax's Conv takes them.

    Unbatched `[H, W, C]` inputs get a batch dim that is removed again; several
    batch dims are flattened into one and restored.
    """
    inputs = check_conv_inputs(where, inputs)
    batch = inputs.shape[:-3]
    x = inputs.reshape((int(np.prod(batch)),) + inputs.shape[-3:]) if len(batch) != 1 else inputs
    y = sparse_conv2d(x, weight, bias, strides, padding, variant=conv_variant)
    return y.reshape(batch + y.shape[1:]) if len(batch) != 1 else y
