"""Flax NNX `SparseDense`: a drop-in for `flax.nnx.Linear` with a sparse kernel.

The trainable values and bias are `nnx.Param`s; the fixed nonzero pattern is
a `SparsityPatternVar`, state that is split, merged, jitted and checkpointed
with the module but never trained, so `nnx.Optimizer(model, tx, wrt=nnx.Param)`
keeps optimizer state for the nonzeros only::

    layer = SparseDense(784, 256, sparsity=0.9, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)

Build layers outside `jit`/`nnx.eval_shape`: the pattern is drawn eagerly,
because its number of nonzeros fixes array shapes.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import reprlib

from sparseprop_jax import _checks
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax._layers import (DEFAULT_SPARSITY, Initializer, check_dense, init_values,
                                    random_pattern)
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array


class SparsityPatternVar(nnx.Variable):
    """Holds a layer's `SparsityPattern`: module state that is never trained.

    Read it with `.get_value()`. Not an `nnx.Param`, so optimizers built with
    `wrt=nnx.Param` and `nnx.grad` leave it alone.
    """


def _constant(array: Any) -> Initializer:
    """An initializer that returns `array`, to build a layer from given weights."""
    return lambda key, shape, dtype=None: array


class SparseDense(nnx.Module):
    """A linear layer `y = x @ kernel + bias` whose kernel has a fixed sparsity pattern.

    Mirrors `flax.nnx.Linear` (float32 only). The dense kernel is drawn with
    `kernel_init` and restricted to a uniformly random pattern with exactly
    `round(sparsity * in_features * out_features)` zeros; only the nonzeros
    are stored and trained. Forward and backward cost O(batch x nnz).

    Attributes:
      values: `nnx.Param` `[nnz]`, the nonzeros grouped by output feature.
      bias: `nnx.Param` `[out_features]`, or None.
      pattern: `SparsityPatternVar` holding the `SparsityPattern`.
      use_bias: whether the layer adds a bias.
    """

    def __init__(self, in_features: int, out_features: int, *,
                 sparsity: Optional[float] = None, use_bias: bool = True,
                 kernel_init: Initializer = nnx.initializers.lecun_normal(),
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 pattern: Optional[SparsityPattern] = None, rngs: nnx.Rngs):
        """Initialises the layer.

        Args:
          in_features: the number of input features.
          out_features: the number of output features.
          sparsity: fraction of the kernel's entries that are zero, in [0, 1];
            0.9 when neither it nor `pattern` is given.
          use_bias: whether to add a bias.
          kernel_init: initializer of the dense kernel the values are taken from.
          bias_init: initializer of the bias.
          pattern: a fixed `SparsityPattern` of shape `(in_features,
            out_features)` to use instead of a random one (then leave
            `sparsity` unset).
          rngs: the rng streams; 'params' draws the pattern, kernel and bias.
        """
        where = "nnx.SparseDense"
        shape = (_checks.check_features(where, "in_features", in_features),
                 _checks.check_features(where, "out_features", out_features))
        if pattern is None:
            sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
            sparsity = _checks.check_sparsity(where, sparsity)
            pattern = random_pattern(where, shape, sparsity, rngs.params())
        else:
            if sparsity is not None:
                raise ValueError(f"{where}: give sparsity or pattern, not both "
                                 "(the pattern fixes the sparsity)")
            if not isinstance(pattern, SparsityPattern):
                raise TypeError(f"{where}: pattern must be a SparsityPattern, "
                                f"got {type(pattern).__name__}")
            if pattern.shape != shape:
                raise ValueError(f"{where}: pattern must have shape {shape} "
                                 f"(in_features, out_features), got {pattern.shape}")
        self.pattern = SparsityPatternVar(pattern)
        self.values = nnx.Param(init_values(where, kernel_init, rngs.params(), pattern))
        self.use_bias = bool(use_bias)
        if self.use_bias:
            bias = bias_init(rngs.params(), (shape[1],), jnp.float32)
            _checks.check_float32(where, "bias_init(...) result", bias)
            _checks.check_shape(where, "bias_init(...) result", bias, (shape[1],))
            self.bias = nnx.Param(bias)
        else:
            self.bias = nnx.data(None)

    # -- facts ----------------------------------------------------------------
    @property
    def weight(self) -> SparseWeight:
        """The sparse kernel: the current values on the layer's pattern."""
        return SparseWeight(self.values[...], self.pattern.get_value())

    @property
    def in_features(self) -> int:
        return self.pattern.get_value().in_features

    @property
    def out_features(self) -> int:
        return self.pattern.get_value().out_features

    @property
    def nnz(self) -> int:
        """The number of stored (trainable) kernel entries."""
        return self.pattern.get_value().nnz

    @property
    def sparsity(self) -> float:
        """The fraction of the kernel's entries that are structurally zero."""
        return self.pattern.get_value().sparsity

    def __call__(self, inputs: Any) -> Array:
        """Applies the layer.

        Args:
          inputs: float32 `[..., in_features]`.

        Returns:
          float32 `[..., out_features]`.
        """
        bias = None if self.bias is None else self.bias[...]
        return sparse_linear(inputs, self.weight, bias)

    def __nnx_repr__(self):
        # One line of facts instead of the arrays; also used when nested in a model.
        yield reprlib.Object(type=type(self), same_line=True)
        yield reprlib.Attr("in_features", self.in_features)
        yield reprlib.Attr("out_features", self.out_features)
        yield reprlib.Attr("sparsity", f"{self.sparsity:.4g}", use_raw_value=True)
        yield reprlib.Attr("nnz", self.nnz)
        yield reprlib.Attr("use_bias", self.use_bias)

    # -- conversions ----------------------------------------------------------
    @classmethod
    def from_dense(cls, layer_or_kernel: Any, bias: Optional[Any] = None, *,
                   mask: Optional[Any] = None) -> "SparseDense":
        """A `SparseDense` holding the nonzeros of a dense layer or kernel.

        Draws no random numbers.

        Args:
          layer_or_kernel: an `nnx.Linear` (its bias is kept) or a float32
            `(in_features, out_features)` kernel.
          bias: optional float32 `[out_features]`; only with a kernel array.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Entries outside the mask are dropped.

        Returns:
          The layer; `use_bias` is whether a bias was given.
        """
        where = "nnx.SparseDense.from_dense"
        kernel_name, bias_name = "kernel", "bias"
        if isinstance(layer_or_kernel, nnx.Linear):
            if bias is not None:
                raise ValueError(f"{where}: bias must be None when an nnx.Linear is given "
                                 "(its own bias is kept)")
            kernel = layer_or_kernel.kernel[...]
            bias = None if layer_or_kernel.bias is None else layer_or_kernel.bias[...]
            kernel_name, bias_name = "layer.kernel", "layer.bias"
        else:
            kernel = layer_or_kernel
        kernel, pattern, bias = check_dense(where, kernel, bias, mask, kernel_name, bias_name)
        return cls(*pattern.shape, use_bias=bias is not None, kernel_init=_constant(kernel),
                   bias_init=_constant(bias), pattern=pattern, rngs=nnx.Rngs(0))

    def to_dense(self) -> nnx.Linear:
        """The equivalent `nnx.Linear`, with the pruned entries as exact zeros.

        Draws no random numbers.
        """
        bias = None if self.bias is None else self.bias[...]
        return nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias,
                          kernel_init=_constant(self.weight.to_dense()),
                          bias_init=_constant(bias), rngs=nnx.Rngs(0))
