"""Flax Linen `SparseDense` and `SparseConv`: drop-ins for `flax.linen.Dense` and
`flax.linen.Conv` (2-D) with a sparse kernel.

The trainable values (and bias) live in the `params` collection, so optax on
`variables['params']` trains only them. The fixed nonzero pattern lives in its
own collection, `PATTERN_COLLECTION`, as the plain int32 arrays of
`SparsityPattern.to_arrays` (its index arrays and its kernel shape, so the
variables serialize like any Linen variables and give back the full kernel).
That collection is made by `init` and must be passed to every `apply`; it is
never mutable::

    model = SparseDense(features=256, sparsity=0.9)
    variables = model.init(jax.random.key(0), x)
    y = model.apply({'params': params, PATTERN_COLLECTION: variables[PATTERN_COLLECTION]}, x)

Mixed precision works as in `nn.Dense`/`nn.Conv`: `param_dtype` is the dtype
the values and bias are stored (and trained) in, `dtype` the one a call
computes in, float32 or bfloat16 each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from sparseprop_jax import _checks
from sparseprop_jax._layer_helpers import (CONV_DIMS, DEFAULT_SPARSITY, DENSE_DIMS, Initializer,
                                           apply_conv, check_conv_inputs, check_dense,
                                           check_dtype_arg, conv_config, conv_kernel_size,
                                           init_values, random_pattern)
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax.norm_pool import batch_norm_relu_max_pool, normalize_relu
from sparseprop_jax.pooling import max_pool
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array

#: Name of the Linen collection that holds each layer's sparsity pattern.
PATTERN_COLLECTION = "sparsity_pattern"



# -- the Linen layer ----------------------------------------------------------
class SparseDense(nn.Module):
    """A linear layer `y = x @ kernel + bias` whose kernel has a fixed sparsity pattern.

    Mirrors `flax.linen.Dense`, with its `dtype` and `param_dtype` (float32
    or bfloat16). At `init`, the input's last
    dimension gives `in_features`; a dense kernel is drawn with `kernel_init`
    and restricted to a uniformly random pattern with exactly
    `round(sparsity * in_features * features)` zeros, drawn with the 'params' rng.

    Variables: `params` holds `values` `[nnz]` (and `bias` `[features]`);
    `PATTERN_COLLECTION` holds the pattern's int32 arrays and kernel shape
    (`SparsityPattern.to_arrays`). Pass both to
    `apply`; never make the pattern collection mutable. Initialise outside
    `jax.jit` (the number of nonzeros fixes array shapes).

    Attributes:
      features: the number of output features.
      use_bias: whether to add a bias.
      sparsity: fraction of the kernel's entries that are zero, in [0, 1]
        (used at init only; with `variables_from_dense` the pattern decides).
      kernel_init: initializer of the dense kernel the values are drawn from.
      bias_init: initializer of the bias.
      dtype: the dtype of the computation, float32 or bfloat16; None (the
        default) infers it from the inputs and parameters, as flax's
        `promote_dtype` does (bfloat16 with float32 gives float32).
      param_dtype: the dtype the values and bias are created in, float32
        (the default) or bfloat16.
    """

    features: int
    use_bias: bool = True
    sparsity: float = DEFAULT_SPARSITY
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    # Last, not in nn.Dense's places, so the fields before keep their positions.
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Fail when the layer is declared, not at its first call.
        _checks.check_features("linen.SparseDense", "features", self.features)
        _checks.check_sparsity("linen.SparseDense", self.sparsity)
        _check_dtypes("linen.SparseDense", self)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Any, *, feature_axis: int = -1) -> Array:
        """Applies the layer.

        Inputs, values and bias are cast to `dtype` (when None, to their
        common dtype) before the product, as `nn.Dense` does.

        Args:
          inputs: `[..., in_features]`, or with `feature_axis`, in_features
            along that axis.
          feature_axis: the axis of `inputs` the kernel contracts; the output
            has `features` in its place (see `sparse_linear`).

        Returns:
          `[..., features]` in the computation dtype, or the shape of `inputs`
          with `features` at `feature_axis`.
        """
        where = "linen.SparseDense"
        inputs = _checks.as_array(where, "inputs", inputs)
        if inputs.ndim < 1:
            raise ValueError(f"{where}: inputs must have shape [..., in_features], got a scalar")
        axis = _checks.check_axis(where, "feature_axis", feature_axis, inputs.ndim)
        pattern = _module_pattern(self, where, (inputs.shape[axis], self.features), self.sparsity,
                                  window=())
        if len(pattern.shape) != 2:
            raise ValueError(f"{where}: the pattern in the variables is for a kernel of shape "
                             f"{pattern.shape}, not a linear (in, out) one")
        if pattern.out_features != self.features:
            raise ValueError(f"{where}: features={self.features} does not match the pattern in "
                             f"the variables, whose shape is {pattern.shape} (in, out)")
        values, bias = _params(self, where, pattern)
        inputs, values, bias = promote_dtype(inputs, values, bias, dtype=self.dtype)
        return sparse_linear(inputs, SparseWeight(values, pattern), bias,
                             feature_axis=feature_axis)

    # -- conversions ----------------------------------------------------------
    @staticmethod
    def variables_from_dense(kernel_or_variables: Any, bias: Optional[Any] = None, *,
                             mask: Optional[Any] = None) -> dict:
        """The variables of a `SparseDense` holding a dense kernel's nonzeros.

        The values keep the kernel's dtype and the bias its own: a Dense's
        variables give a `SparseDense` with the Dense's `param_dtype` (give it
        the Dense's `dtype` too).

        Args:
          kernel_or_variables: an `(in_features, out_features)` kernel (float32
            or bfloat16), or the variables of a `flax.linen.Dense`
            (`{'params': {'kernel', 'bias'}}`), whose bias is then used.
          bias: optional `[out_features]`; only with a kernel array.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Entries outside the mask are dropped.

        Returns:
          `{'params': {'values', 'bias'?}, PATTERN_COLLECTION: {...}}`, to use
          with `SparseDense(features=out_features, use_bias=bias is not None)`.
        """
        return _variables_from_dense("linen.SparseDense.variables_from_dense", "Dense",
                                     kernel_or_variables, "kernel_or_variables", bias, mask,
                                     DENSE_DIMS)

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
        return _weight("linen.SparseDense.weight", variables)


class SparseConv(nn.Module):
    """A 2-D convolution (NHWC input, HWIO kernel) whose kernel has a fixed sparsity pattern.

    Mirrors `flax.linen.Conv` for 2-D windows, with its `dtype` and
    `param_dtype` (float32 or bfloat16). At `init`, the
    input's last dimension gives the input channels; a dense kernel
    `(kh, kw, in, features)` is drawn with `kernel_init` and restricted to a
    uniformly random pattern with exactly `round(sparsity * kh * kw * in *
    features)` zeros, drawn with the 'params' rng. Runs `sparse_conv2d`.

    Variables: as `SparseDense`'s: `params` holds `values` `[nnz]` (and `bias`
    `[features]`); `PATTERN_COLLECTION` holds the pattern's int32 arrays and
    its HWIO kernel shape. Pass both to `apply`; initialise outside `jax.jit`.

    Not supported (ValueError): dilation, feature groups, unequal strides,
    'CIRCULAR'/'REFLECT'/'CAUSAL' padding, 1-D or 3-D windows.

    Attributes:
      features: the number of output channels.
      kernel_size: the window `(kh, kw)` (an int, which flax reads as a 1-D
        window, is refused).
      strides: an int or an equal pair `(s, s)`.
      padding: "SAME", "VALID", an int, or `((top, bottom), (left, right))`.
      use_bias: whether to add a bias.
      sparsity: fraction of the kernel's entries that are zero, in [0, 1]
        (used at init only; with `variables_from_dense` the pattern decides).
      kernel_init: initializer of the dense HWIO kernel the values are drawn from.
      bias_init: initializer of the bias.
      conv_variant: the `variant` argument of `sparse_conv2d` ("auto",
        "measure", "batch" or "width").
      input_dilation, kernel_dilation, feature_group_count: as in
        `flax.linen.Conv`; only 1 is supported.
      dtype: the dtype of the computation, float32 or bfloat16; None (the
        default) infers it from the inputs and parameters, as flax's
        `promote_dtype` does (bfloat16 with float32 gives float32).
      param_dtype: the dtype the values and bias are created in, float32
        (the default) or bfloat16.
    """

    features: int
    kernel_size: Any
    strides: Any = 1
    padding: Any = "SAME"
    use_bias: bool = True
    sparsity: float = DEFAULT_SPARSITY
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    conv_variant: str = "auto"
    input_dilation: Any = 1
    kernel_dilation: Any = 1
    feature_group_count: int = 1
    # Last, not in nn.Conv's places, so the fields before keep their positions.
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Fail when the layer is declared, not at its first call.
        _checks.check_features("linen.SparseConv", "features", self.features)
        _checks.check_sparsity("linen.SparseConv", self.sparsity)
        self._config()
        _check_dtypes("linen.SparseConv", self)
        super().__post_init__()

    def _config(self):
        return conv_config("linen.SparseConv", self.kernel_size, self.strides, self.padding,
                           input_dilation=self.input_dilation,
                           kernel_dilation=self.kernel_dilation,
                           feature_group_count=self.feature_group_count,
                           conv_variant=self.conv_variant)

    @nn.compact
    def __call__(self, inputs: Any) -> Array:
        """Applies the layer.

        Inputs, values and bias are cast to `dtype` (when None, to their
        common dtype) before the convolution, as `nn.Conv` does.

        Args:
          inputs: `[N, H, W, in]`; also `[H, W, in]` (unbatched) or with
            several batch dims, as `flax.linen.Conv` takes.

        Returns:
          `[N, H_out, W_out, features]` in the computation dtype (same batch
          dims as `inputs`).
        """
        where = "linen.SparseConv"
        kernel_size, strides, padding = self._config()
        inputs = check_conv_inputs(where, inputs)
        shape = kernel_size + (inputs.shape[-1], self.features)
        pattern = _module_pattern(self, where, shape, self.sparsity, window=kernel_size)
        if pattern.out_features != self.features:
            raise ValueError(f"{where}: features={self.features} does not match the pattern in "
                             f"the variables, whose kernel shape is {pattern.shape} "
                             "(kh, kw, in, out)")
        if pattern.shape != shape:
            raise ValueError(
                f"{where}: kernel_size={kernel_size} with {inputs.shape[-1]} input channels "
                f"needs a pattern of {shape[0] * shape[1] * shape[2]} rows (kh * kw * in) and "
                f"kernel shape {shape}, but the pattern in the variables has kernel shape "
                f"{pattern.shape} (check kernel_size and the input's channels)")
        values, bias = _params(self, where, pattern)
        inputs, values, bias = promote_dtype(inputs, values, bias, dtype=self.dtype)
        return apply_conv(where, inputs, SparseWeight(values, pattern), bias, strides, padding,
                          self.conv_variant)

    # -- conversions ----------------------------------------------------------
    @staticmethod
    def variables_from_dense(kernel_or_conv_variables: Any, bias: Optional[Any] = None, *,
                             mask: Optional[Any] = None) -> dict:
        """The variables of a `SparseConv` holding a dense HWIO kernel's nonzeros.

        The values keep the kernel's dtype and the bias its own: a Conv's
        variables give a `SparseConv` with the Conv's `param_dtype` (give it
        the Conv's `dtype` too).

        Args:
          kernel_or_conv_variables: a `(kh, kw, in, out)` kernel (float32 or
            bfloat16), or the variables of a `flax.linen.Conv`
            (`{'params': {'kernel', 'bias'}}`), whose bias is then used.
          bias: optional `[out]`; only with a kernel array.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Entries outside the mask are dropped.

        Returns:
          `{'params': {'values', 'bias'?}, PATTERN_COLLECTION: {...}}`, to use
          with `SparseConv(features=out, kernel_size=(kh, kw), use_bias=bias is
          not None)` (and the strides and padding of your choice).
        """
        return _variables_from_dense("linen.SparseConv.variables_from_dense", "Conv",
                                     kernel_or_conv_variables, "kernel_or_conv_variables", bias,
                                     mask, CONV_DIMS)

    @staticmethod
    def to_dense_variables(variables: Mapping, kernel_size: Any = None) -> dict:
        """The variables of the equivalent `flax.linen.Conv`, zeros in place.

        Args:
          variables: one `SparseConv`'s variables, with `params` and
            `PATTERN_COLLECTION`.
          kernel_size: optional, see `weight`.

        Returns:
          `{'params': {'kernel': (kh, kw, in, out) array, 'bias'?: [out] array}}`.
        """
        weight = SparseConv.weight(variables, kernel_size)
        params = {"kernel": weight.to_dense()}
        if "bias" in variables["params"]:
            params["bias"] = variables["params"]["bias"]
        return {"params": params}

    @staticmethod
    def weight(variables: Mapping, kernel_size: Any = None) -> SparseWeight:
        """The `SparseWeight` (values on their HWIO pattern) of one layer's variables.

        Args:
          variables: one `SparseConv`'s variables, with `params` and
            `PATTERN_COLLECTION` (which stores the kernel shape).
          kernel_size: optional `(kh, kw)`; checked against the stored shape.
            Needed only under `jax.jit`, where the stored shape is traced
            (see `SparsityPattern.from_arrays`).
        """
        where = "linen.SparseConv.weight"
        window = None if kernel_size is None else conv_kernel_size(where, kernel_size)
        weight = _weight(where, variables, window)
        if window is not None and weight.shape[:2] != window:
            raise ValueError(f"{where}: kernel_size={window} does not fit the pattern in the "
                             f"variables, whose kernel shape is {weight.shape} (kh, kw, in, out)")
        return weight


class BatchNormReLUMaxPool(nn.Module):
    """`nn.max_pool(nn.relu(nn.BatchNorm(...)(x)), window_shape, strides, padding)` as one module.

    The fields of `flax.linen.BatchNorm` that it supports (features last,
    `use_fast_variance`, no `axis_name`), then the max pool's. Its variables
    are `nn.BatchNorm`'s, under the same names (`params`: `scale`, `bias`;
    `batch_stats`: `mean`, `var`), updated the same way; name it as the
    BatchNorm was named and a model's variables carry over. In training mode
    a 4-D float32 input runs `sparseprop_jax.batch_norm_relu_max_pool` (a C++
    backward); otherwise the three ops as written above.
    """

    window_shape: Sequence[int]
    strides: Optional[Sequence[int]] = None
    padding: Union[str, Sequence[tuple[int, int]]] = "VALID"
    use_running_average: Optional[bool] = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Array, use_running_average: Optional[bool] = None) -> Array:
        running = nn.merge_param("use_running_average", self.use_running_average,
                                 use_running_average)
        x = _checks.as_array("BatchNormReLUMaxPool", "x", x)
        shape = x.shape[-1:]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        scale = (self.param("scale", self.scale_init, shape, jnp.float32) if self.use_scale
                 else jnp.ones(shape, jnp.float32))
        bias = (self.param("bias", self.bias_init, shape, jnp.float32) if self.use_bias
                else jnp.zeros(shape, jnp.float32))
        if running:
            y = normalize_relu(x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon),
                               scale, bias)
            return max_pool(y, self.window_shape, self.strides, self.padding)
        y, mean, var = batch_norm_relu_max_pool(x, scale, bias, self.window_shape, self.strides,
                                                self.padding, epsilon=self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def _check_dtypes(where: str, module: nn.Module) -> None:
    check_dtype_arg(where, "dtype", module.dtype, optional=True)
    check_dtype_arg(where, "param_dtype", module.param_dtype)


def _params(module: nn.Module, where: str,
            pattern: SparsityPattern) -> tuple[Array, Optional[Array]]:
    """A sparse layer's values and bias, created in its `param_dtype` at init."""
    values = module.param("values", lambda key: init_values(where, module.kernel_init, key,
                                                            pattern, module.param_dtype))
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    return values, bias


def _module_pattern(module: nn.Module, where: str, shape: tuple[int, ...], sparsity: float,
                    window: Optional[tuple[int, ...]] = None) -> SparsityPattern:
    """A layer's pattern from `PATTERN_COLLECTION`, or drawn (and stored) at init.

    `shape` is the kernel shape a new pattern is drawn with; `window` stands
    in for a stored shape that is traced (see `SparsityPattern.from_arrays`).
    The caller compares a stored pattern's shape with the one it expects.
    """
    stored = module.variables.get(PATTERN_COLLECTION, {})
    if all(f in stored for f in SparsityPattern.FIELDS):
        return SparsityPattern.from_arrays(stored, where, window=window)
    if not module.is_initializing():
        raise ValueError(
            f"{where}: the variables passed to apply must include the {PATTERN_COLLECTION!r} "
            f"collection made by init, e.g. model.apply({{'params': params, "
            f"{PATTERN_COLLECTION!r}: variables[{PATTERN_COLLECTION!r}]}}, x)")
    pattern = random_pattern(where, shape, sparsity, module.make_rng("params"))
    for key, array in pattern.to_arrays().items():
        module.put_variable(PATTERN_COLLECTION, key, array)
    return pattern


def _weight(where: str, variables: Mapping,
            window: Optional[tuple[int, ...]] = None) -> SparseWeight:
    """The `SparseWeight` of one layer's variables (`window`: see `SparsityPattern.from_arrays`)."""
    for collection in ("params", PATTERN_COLLECTION):
        if collection not in variables:
            raise ValueError(f"{where}: variables must include the {collection!r} collection, "
                             f"got {list(variables)}")
    pattern = SparsityPattern.from_arrays(variables[PATTERN_COLLECTION],
                                          f"{where}: variables[{PATTERN_COLLECTION!r}]",
                                          window=window)
    return SparseWeight(variables["params"]["values"], pattern)


def _variables_from_dense(where: str, layer: str, kernel_or_variables: Any, name: str,
                          bias: Any, mask: Any, dims: tuple[str, ...]) -> dict:
    """Sparse-layer variables from a dense kernel or a dense `layer`'s variables."""
    kernel_name = "kernel"
    if isinstance(kernel_or_variables, Mapping):
        if bias is not None:
            raise ValueError(f"{where}: bias must be None when {layer} variables are given "
                             "(their own bias is used)")
        params = kernel_or_variables.get("params")
        if not isinstance(params, Mapping) or "kernel" not in params:
            raise ValueError(f"{where}: {name} must be a {len(dims)}-D kernel or {layer} "
                             "variables {'params': {'kernel': ..., 'bias': ...}}, got keys "
                             f"{list(kernel_or_variables)}")
        kernel, bias = params["kernel"], params.get("bias")
        kernel_name = "variables['params']['kernel']"
    else:
        kernel = kernel_or_variables
    kernel, pattern, bias = check_dense(where, kernel, bias, mask, kernel_name=kernel_name,
                                        dims=dims)
    params = {"values": SparseWeight.gather(kernel, pattern).values}
    if bias is not None:
        params["bias"] = bias
    return {"params": params, PATTERN_COLLECTION: pattern.to_arrays()}
