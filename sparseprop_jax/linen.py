"""Flax Linen `SparseDense`: a drop-in for `flax.linen.Dense` with a sparse kernel.

The trainable values (and bias) live in the `params` collection, so optax on
`variables['params']` trains only them. The fixed nonzero pattern lives in its
own collection, `PATTERN_COLLECTION`, as plain int32 arrays (so the variables
serialize like any Linen variables). That collection is made by `init` and
must be passed to every `apply`; it is never mutable::

    model = SparseDense(features=256, sparsity=0.9)
    variables = model.init(jax.random.key(0), x)
    y = model.apply({'params': params, PATTERN_COLLECTION: variables[PATTERN_COLLECTION]}, x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparseprop_jax import _checks
from sparseprop_jax._layers import (DEFAULT_SPARSITY, Initializer, check_dense, init_values,
                                    random_pattern)
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array

#: Name of the Linen collection that holds each layer's sparsity pattern.
PATTERN_COLLECTION = "sparsity_pattern"



# -- the Linen layer ----------------------------------------------------------
class SparseDense(nn.Module):
    """A linear layer `y = x @ kernel + bias` whose kernel has a fixed sparsity pattern.

    Mirrors `flax.linen.Dense` (float32 only). At `init`, the input's last
    dimension gives `in_features`; a dense kernel is drawn with `kernel_init`
    and restricted to a uniformly random pattern with exactly
    `round(sparsity * in_features * features)` zeros, drawn with the 'params' rng.

    Variables: `params` holds `values` `[nnz]` (and `bias` `[features]`);
    `PATTERN_COLLECTION` holds the pattern's int32 arrays. Pass both to
    `apply`; never make the pattern collection mutable. Initialise outside
    `jax.jit` (the number of nonzeros fixes array shapes).

    Attributes:
      features: the number of output features.
      use_bias: whether to add a bias.
      sparsity: fraction of the kernel's entries that are zero, in [0, 1]
        (used at init only; with `variables_from_dense` the pattern decides).
      kernel_init: initializer of the dense kernel the values are drawn from.
      bias_init: initializer of the bias.
    """

    features: int
    use_bias: bool = True
    sparsity: float = DEFAULT_SPARSITY
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def __post_init__(self):
        # Fail when the layer is declared, not at its first call.
        _checks.check_features("linen.SparseDense", "features", self.features)
        _checks.check_sparsity("linen.SparseDense", self.sparsity)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Any) -> Array:
        """Applies the layer.

        Args:
          inputs: float32 `[..., in_features]`.

        Returns:
          float32 `[..., features]`.
        """
        where = "linen.SparseDense"
        inputs = jnp.asarray(inputs)
        if inputs.ndim < 1:
            raise ValueError(f"{where}: inputs must have shape [..., in_features], got a scalar")
        pattern = self._pattern(where, inputs.shape[-1])
        if pattern.out_features != self.features:
            raise ValueError(f"{where}: features={self.features} does not match the pattern in "
                             f"the variables, whose shape is {pattern.shape} (in, out)")
        values = self.param("values", lambda key: init_values(where, self.kernel_init, key,
                                                               pattern))
        bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
                if self.use_bias else None)
        return sparse_linear(inputs, SparseWeight(values, pattern), bias)

    def _pattern(self, where: str, in_features: int) -> SparsityPattern:
        """The pattern from `PATTERN_COLLECTION`, drawn (and stored) at init."""
        if all(self.has_variable(PATTERN_COLLECTION, f) for f in SparsityPattern.FIELDS):
            return _pattern_from_arrays(
                {f: self.get_variable(PATTERN_COLLECTION, f) for f in SparsityPattern.FIELDS})
        if not self.is_initializing():
            raise ValueError(
                f"{where}: the variables passed to apply must include the {PATTERN_COLLECTION!r} "
                f"collection made by init, e.g. model.apply({{'params': params, "
                f"{PATTERN_COLLECTION!r}: variables[{PATTERN_COLLECTION!r}]}}, x)")
        pattern = random_pattern(where, (in_features, self.features), self.sparsity,
                                  self.make_rng("params"))
        for field in SparsityPattern.FIELDS:
            self.put_variable(PATTERN_COLLECTION, field, getattr(pattern, field))
        return pattern

    # -- conversions ----------------------------------------------------------
    @staticmethod
    def variables_from_dense(kernel_or_variables: Any, bias: Optional[Any] = None, *,
                             mask: Optional[Any] = None) -> dict:
        """The variables of a `SparseDense` holding a dense kernel's nonzeros.

        Args:
          kernel_or_variables: a float32 `(in_features, out_features)` kernel, or
            the variables of a `flax.linen.Dense` (`{'params': {'kernel', 'bias'}}`),
            whose bias is then used.
          bias: optional float32 `[out_features]`; only with a kernel array.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Entries outside the mask are dropped.

        Returns:
          `{'params': {'values', 'bias'?}, PATTERN_COLLECTION: {...}}`, to use
          with `SparseDense(features=out_features, use_bias=bias is not None)`.
        """
        where = "linen.SparseDense.variables_from_dense"
        kernel_name = "kernel"
        if isinstance(kernel_or_variables, Mapping):
            if bias is not None:
                raise ValueError(f"{where}: bias must be None when Dense variables are given "
                                 "(their own bias is used)")
            params = kernel_or_variables.get("params")
            if not isinstance(params, Mapping) or "kernel" not in params:
                raise ValueError(f"{where}: kernel_or_variables must be a 2-D kernel or Dense "
                                 "variables {'params': {'kernel': ..., 'bias': ...}}, got keys "
                                 f"{list(kernel_or_variables)}")
            kernel, bias = params["kernel"], params.get("bias")
            kernel_name = "variables['params']['kernel']"
        else:
            kernel = kernel_or_variables
        kernel, pattern, bias = check_dense(where, kernel, bias, mask, kernel_name=kernel_name)
        params = {"values": SparseWeight.gather(kernel, pattern).values}
        if bias is not None:
            params["bias"] = bias
        return {"params": params,
                PATTERN_COLLECTION: {f: getattr(pattern, f) for f in SparsityPattern.FIELDS}}

    @staticmethod
    def to_dense_variables(variables: Mapping) -> dict:
        """The variables of the equivalent `flax.linen.Dense`, zeros in place.

        Args:
          variables: one `SparseDense`'s variables, with `params` and
            `PATTERN_COLLECTION`.

        Returns:
          `{'params': {'kernel': (in, out) array, 'bias'?: [out] array}}`.
        """
        weight = SparseDense.weight(variables)
        params = {"kernel": weight.to_dense()}
        if "bias" in variables["params"]:
            params["bias"] = variables["params"]["bias"]
        return {"params": params}

    @staticmethod
    def weight(variables: Mapping) -> SparseWeight:
        """The `SparseWeight` (values on their pattern) of one layer's variables."""
        where = "linen.SparseDense.weight"
        for collection in ("params", PATTERN_COLLECTION):
            if collection not in variables:
                raise ValueError(f"{where}: variables must include the {collection!r} collection, "
                                 f"got {list(variables)}")
        arrays = variables[PATTERN_COLLECTION]
        missing = [f for f in SparsityPattern.FIELDS if f not in arrays]
        if missing:
            raise ValueError(f"{where}: variables[{PATTERN_COLLECTION!r}] lacks {missing}")
        return SparseWeight(variables["params"]["values"], _pattern_from_arrays(arrays))


def _pattern_from_arrays(arrays: Mapping) -> SparsityPattern:
    """Rebuilds a pattern from its stored arrays (traceable: the shape is static).

    The kernel shape follows from the lengths of the two index pointers.
    """
    shape = (np.shape(arrays["t_indptr"])[0] - 1, np.shape(arrays["indptr"])[0] - 1)
    return SparsityPattern(*(arrays[f] for f in SparsityPattern.FIELDS), shape=shape)
