"""Helpers shared by the Flax layers of `sparseprop_jax.nnx` and `sparseprop_jax.linen`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparseprop_jax import _checks
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array
Initializer = Callable[..., Any]

DEFAULT_SPARSITY = 0.9


def random_pattern(where: str, shape: tuple[int, int], sparsity: float,
                    key: Array) -> SparsityPattern:
    """A uniformly random pattern, with a clear error when `key` is traced."""
    # The number of nonzeros fixes array shapes, so patterns are built eagerly.
    if isinstance(key, jax.core.Tracer):
        raise TypeError(
            f"{where}: the sparsity pattern is drawn when the layer is initialised, which "
            "cannot happen under jit/eval_shape (the number of nonzeros fixes array shapes); "
            "initialise the layer outside jit")
    return SparsityPattern.random(shape, sparsity, key)


def init_values(where: str, kernel_init: Initializer, key: Array,
                 pattern: SparsityPattern) -> Array:
    """Draws a dense kernel with `kernel_init` and keeps the entries on `pattern`."""
    kernel = kernel_init(key, pattern.shape, jnp.float32)
    _checks.check_float32(where, "kernel_init(...) result", kernel)
    _checks.check_shape(where, "kernel_init(...) result", kernel, pattern.shape)
    return SparseWeight.gather(kernel, pattern).values


def check_dense(where: str, kernel: Any, bias: Any, mask: Any, kernel_name: str = "kernel",
                 bias_name: str = "bias") -> tuple[np.ndarray, SparsityPattern, Optional[Array]]:
    """Validates a dense kernel, bias and mask; returns the kernel, pattern and bias.

    Without a mask the kernel's exact zeros define the pattern.
    """
    kernel = _checks.concrete(where, kernel_name, kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{where}: {kernel_name} must be 2-D (in_features, out_features), "
                         f"got shape {kernel.shape}")
    _checks.check_float32(where, kernel_name, kernel)
    _checks.check_features(where, f"{kernel_name}.shape[0] (in_features)", kernel.shape[0])
    _checks.check_features(where, f"{kernel_name}.shape[1] (out_features)", kernel.shape[1])
    if mask is None:
        mask = kernel != 0
    else:
        mask = _checks.concrete(where, "mask", mask)
        _checks.check_shape(where, "mask", mask, kernel.shape)
        if mask.dtype != np.bool_:
            raise TypeError(f"{where}: mask must be boolean, got {mask.dtype}")
    if bias is not None:
        bias = jnp.asarray(_checks.concrete(where, bias_name, bias))
        _checks.check_float32(where, bias_name, bias)
        _checks.check_shape(where, bias_name, bias, (kernel.shape[1],))
    return kernel, SparsityPattern.from_mask(mask), bias
