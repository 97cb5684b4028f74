"""Flax NNX `SparseDense` and `SparseConv`: drop-ins for `flax.nnx.Linear` and
`flax.nnx.Conv` (2-D) with a sparse kernel.

The trainable values and bias are `nnx.Param`s; the fixed nonzero pattern is
a `SparsityPatternVar`, state that is split, merged, jitted and checkpointed
with the module but never trained, so `nnx.Optimizer(model, tx, wrt=nnx.Param)`
keeps optimizer state for the nonzeros only::

    layer = SparseDense(784, 256, sparsity=0.9, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)

Mixed precision works as in `nnx.Linear`/`nnx.Conv`: `param_dtype` is the
dtype the values and bias are stored (and trained) in, `dtype` the one a call
computes in, float32 or bfloat16 each::

    layer = SparseDense(784, 256, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))

Build layers outside `jit`/`nnx.eval_shape`: the pattern is drawn eagerly,
because its number of nonzeros fixes array shapes.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import reprlib
from flax.nnx.nn import dtypes

from sparseprop_jax import _checks
from sparseprop_jax import norm_pool
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax._layer_helpers import (CONV_DIMS, Initializer, apply_conv, check_dense,
                                           check_dtype_arg, conv_config, dtype_name, init_bias,
                                           init_values, layer_pattern)
from sparseprop_jax.pooling import max_pool
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

Array = jax.Array


class SparsityPatternVar(nnx.Variable):
    """Holds a layer's `SparsityPattern`: module state that is never trained.

    Read it with `.get_value()`. Not an `nnx.Param`, so optimizers built with
    `wrt=nnx.Param` and `nnx.grad` leave it alone.
    """


def _constant(array: Any) -> Initializer:
    """An initializer that returns `array` (in the dtype asked for), to build a layer from
    given weights."""
    return lambda key, shape, dtype=None: array if dtype is None else jnp.asarray(array, dtype)


class _SparseKernelLayer(nnx.Module):
    """What SparseDense and SparseConv share: values on a fixed pattern, an optional bias."""

    values: nnx.Param
    pattern: SparsityPatternVar

    @property
    def weight(self) -> SparseWeight:
        """The sparse kernel: the current values on the layer's pattern."""
        return SparseWeight(self.values[...], self.pattern.get_value())

    @property
    def nnz(self) -> int:
        """The number of stored (trainable) kernel entries."""
        return self.pattern.get_value().nnz

    @property
    def sparsity(self) -> float:
        """The fraction of the kernel's entries that are structurally zero."""
        return self.pattern.get_value().sparsity

    def _bias_value(self) -> Optional[Array]:
        return None if self.bias is None else self.bias[...]

    def _init_params(self, where: str, pattern: SparsityPattern, use_bias: bool,
                     kernel_init: Initializer, bias_init: Initializer, dtype: Any,
                     param_dtype: Any, rngs: nnx.Rngs) -> None:
        """Sets the pattern, the parameters (in `param_dtype`, checked by the caller) and
        the dtypes, drawing the values' key, then the bias'."""
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.pattern = SparsityPatternVar(pattern)
        self.values = nnx.Param(init_values(where, kernel_init, rngs.params(), pattern,
                                            param_dtype))
        self.use_bias = bool(use_bias)
        if self.use_bias:
            self.bias = nnx.Param(init_bias(where, bias_init, rngs.params(),
                                            pattern.out_features, param_dtype))
        else:
            self.bias = nnx.data(None)

    def _promoted(self, where: str, inputs: Any) -> tuple[Any, SparseWeight, Optional[Array]]:
        """Inputs, weight and bias in the computation dtype, as `nnx.Linear` promotes them.

        The casts are outside the ops' custom_vjp, so each gradient comes back in
        its own dtype (the parameters' in `param_dtype`).
        """
        # Named here: the promotion would otherwise fail first, with JAX's message.
        inputs = _checks.as_array(where, "inputs", inputs)
        inputs, values, bias = dtypes.promote_dtype(
            (inputs, self.values[...], self._bias_value()), dtype=self.dtype)
        return inputs, SparseWeight(values, self.pattern.get_value()), bias

    def _repr_dtypes(self):
        # Only when not the defaults, so the usual float32 layer's line stays short.
        if self.dtype is not None:
            yield reprlib.Attr("dtype", dtype_name(self.dtype), use_raw_value=True)
        if jnp.dtype(self.param_dtype) != jnp.float32:
            yield reprlib.Attr("param_dtype", dtype_name(self.param_dtype), use_raw_value=True)

    @staticmethod
    def _dense_dtypes(where: str, layer: Any, kernel: Any, dtype: Any,
                      param_dtype: Any) -> tuple[Any, Any]:
        """`from_dense`'s dtype and param_dtype: the dense layer's, or for a kernel array
        the arguments (param_dtype defaulting to the kernel's dtype)."""
        if layer is not None:
            for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
                if value is not None:
                    raise ValueError(f"{where}: {name} must be None when an "
                                     f"nnx.{type(layer).__name__} is given (its own {name} is "
                                     "kept)")
            return layer.dtype, layer.param_dtype
        return dtype, kernel.dtype if param_dtype is None else param_dtype


class SparseDense(_SparseKernelLayer):
    """A linear layer `y = x @ kernel + bias` whose kernel has a fixed sparsity pattern.

    Mirrors `flax.nnx.Linear`, with its `dtype` and `param_dtype` (float32 or
    bfloat16). The dense kernel is drawn with `kernel_init` and restricted to
    a uniformly random pattern with exactly
    `round(sparsity * in_features * out_features)` zeros; only the nonzeros
    are stored and trained. Forward and backward cost O(batch x nnz).

    Attributes:
      values: `nnx.Param` `[nnz]`, the nonzeros grouped by output feature.
      bias: `nnx.Param` `[out_features]`, or None.
      pattern: `SparsityPatternVar` holding the `SparsityPattern`.
      use_bias: whether the layer adds a bias.
      dtype: the computation dtype, or None to infer it from the inputs and
        parameters.
      param_dtype: the dtype of `values` and `bias`.
    """

    def __init__(self, in_features: int, out_features: int, *,
                 sparsity: Optional[float] = None, use_bias: bool = True,
                 dtype: Optional[Any] = None, param_dtype: Any = jnp.float32,
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
          dtype: the dtype of the computation, float32 or bfloat16; None (the
            default) infers it from the inputs and parameters, as flax's
            `promote_dtype` does (bfloat16 with float32 gives float32).
          param_dtype: the dtype the values and bias are created and stored
            in, float32 (the default) or bfloat16.
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
        # Checked before a pattern is drawn: a bad dtype fails fast, whatever the sizes.
        dtype = check_dtype_arg(where, "dtype", dtype, optional=True)
        param_dtype = check_dtype_arg(where, "param_dtype", param_dtype)
        pattern = layer_pattern(where, shape, sparsity, pattern, rngs.params)
        self._init_params(where, pattern, use_bias, kernel_init, bias_init, dtype, param_dtype,
                          rngs)

    # -- facts ----------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.pattern.get_value().in_features

    @property
    def out_features(self) -> int:
        return self.pattern.get_value().out_features

    def __call__(self, inputs: Any, *, feature_axis: int = -1) -> Array:
        """Applies the layer.

        Inputs, values and bias are cast to `dtype` (when None, to their
        common dtype) before the product, as `nnx.Linear` does.

        Args:
          inputs: `[..., in_features]`, or with `feature_axis`, in_features
            along that axis.
          feature_axis: the axis of `inputs` the kernel contracts; the output
            has out_features in its place. A token-mixing layer on
            `[batch, tokens, dim]` is `layer(x, feature_axis=-2)`: no
            transposes (see `sparse_linear`).

        Returns:
          `[..., out_features]` in the computation dtype, or the shape of
          `inputs` with out_features at `feature_axis`.
        """
        inputs, weight, bias = self._promoted("nnx.SparseDense", inputs)
        return sparse_linear(inputs, weight, bias, feature_axis=feature_axis)

    def __nnx_repr__(self):
        # One line of facts instead of the arrays; also used when nested in a model.
        yield reprlib.Object(type=type(self), same_line=True)
        yield reprlib.Attr("in_features", self.in_features)
        yield reprlib.Attr("out_features", self.out_features)
        yield reprlib.Attr("sparsity", f"{self.sparsity:.4g}", use_raw_value=True)
        yield reprlib.Attr("nnz", self.nnz)
        yield reprlib.Attr("use_bias", self.use_bias)
        yield from self._repr_dtypes()

    # -- conversions ----------------------------------------------------------
    @classmethod
    def from_dense(cls, layer_or_kernel: Any, bias: Optional[Any] = None, *,
                   mask: Optional[Any] = None, dtype: Optional[Any] = None,
                   param_dtype: Optional[Any] = None) -> "SparseDense":
        """A `SparseDense` holding the nonzeros of a dense layer or kernel.

        Draws no random numbers.

        Args:
          layer_or_kernel: an `nnx.Linear` (its bias, `dtype` and
            `param_dtype` are kept) or an `(in_features, out_features)` kernel
            (float32 or bfloat16).
          bias: optional `[out_features]`; only with a kernel array.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Entries outside the mask are dropped.
          dtype: the layer's computation dtype; only with a kernel array.
          param_dtype: the dtype the values and bias are stored in; only with
            a kernel array, whose dtype it defaults to.

        Returns:
          The layer; `use_bias` is whether a bias was given.
        """
        where = "nnx.SparseDense.from_dense"
        kernel_name, bias_name = "kernel", "bias"
        layer = None
        if isinstance(layer_or_kernel, nnx.Linear):
            layer = layer_or_kernel
            if bias is not None:
                raise ValueError(f"{where}: bias must be None when an nnx.Linear is given "
                                 "(its own bias is kept)")
            kernel = layer.kernel[...]
            bias = None if layer.bias is None else layer.bias[...]
            kernel_name, bias_name = "layer.kernel", "layer.bias"
        else:
            kernel = layer_or_kernel
        kernel, pattern, bias = check_dense(where, kernel, bias, mask, kernel_name, bias_name)
        dtype, param_dtype = cls._dense_dtypes(where, layer, kernel, dtype, param_dtype)
        return cls(*pattern.shape, use_bias=bias is not None, dtype=dtype,
                   param_dtype=param_dtype, kernel_init=_constant(kernel),
                   bias_init=_constant(bias), pattern=pattern, rngs=nnx.Rngs(0))

    def to_dense(self) -> nnx.Linear:
        """The equivalent `nnx.Linear`, with the pruned entries as exact zeros and the
        same `dtype` and `param_dtype`.

        Draws no random numbers.
        """
        bias = self._bias_value()
        return nnx.Linear(self.in_features, self.out_features, use_bias=self.use_bias,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=_constant(self.weight.to_dense()),
                          bias_init=_constant(bias), rngs=nnx.Rngs(0))


class SparseConv(_SparseKernelLayer):
    """A 2-D convolution (NHWC input, HWIO kernel) whose kernel has a fixed sparsity pattern.

    Mirrors `flax.nnx.Conv` for 2-D windows, with its `dtype` and
    `param_dtype` (float32 or bfloat16). The dense kernel
    `(kh, kw, in_features, out_features)` is drawn with `kernel_init` and
    restricted to a uniformly random pattern with exactly
    `round(sparsity * kh * kw * in_features * out_features)` zeros; only the
    nonzeros are stored and trained. Runs `sparse_conv2d`: forward and backward
    cost O(batch x output pixels x nnz).

    Not supported (ValueError): dilation, feature groups, unequal strides,
    'CIRCULAR'/'REFLECT'/'CAUSAL' padding, 1-D or 3-D windows.

    Attributes:
      values: `nnx.Param` `[nnz]`, the nonzeros grouped by output feature.
      bias: `nnx.Param` `[out_features]`, or None.
      pattern: `SparsityPatternVar` holding the `SparsityPattern` (HWIO shape).
      strides: `(s, s)`.
      padding: "SAME", "VALID" or `((top, bottom), (left, right))`.
      conv_variant: the `sparse_conv2d` variant ("auto", "measure",
        "batch" or "width").
      use_bias: whether the layer adds a bias.
      dtype: the computation dtype, or None to infer it from the inputs and
        parameters.
      param_dtype: the dtype of `values` and `bias`.
    """

    # As in nnx.Conv, padding and everything after it are keyword-only.
    def __init__(self, in_features: int, out_features: int, kernel_size: Any,
                 strides: Any = 1, *, padding: Any = "SAME", input_dilation: Any = 1,
                 kernel_dilation: Any = 1, feature_group_count: int = 1,
                 use_bias: bool = True, dtype: Optional[Any] = None,
                 param_dtype: Any = jnp.float32, sparsity: Optional[float] = None,
                 kernel_init: Initializer = nnx.initializers.lecun_normal(),
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 pattern: Optional[SparsityPattern] = None, conv_variant: str = "auto",
                 rngs: nnx.Rngs):
        """Initialises the layer.

        Args:
          in_features: the number of input channels.
          out_features: the number of output channels.
          kernel_size: the window `(kh, kw)` (an int, which flax reads as a
            1-D window, is refused).
          strides: an int or an equal pair `(s, s)`.
          padding: "SAME", "VALID", an int, or `((top, bottom), (left,
            right))` (each element may be one int for both sides).
          input_dilation, kernel_dilation, feature_group_count: as in
            `flax.nnx.Conv`; only 1 is supported.
          use_bias: whether to add a bias.
          dtype: the dtype of the computation, float32 or bfloat16; None (the
            default) infers it from the inputs and parameters, as flax's
            `promote_dtype` does (bfloat16 with float32 gives float32).
          param_dtype: the dtype the values and bias are created and stored
            in, float32 (the default) or bfloat16.
          sparsity: fraction of the kernel's entries that are zero, in [0, 1];
            0.9 when neither it nor `pattern` is given.
          kernel_init: initializer of the dense HWIO kernel the values are taken from.
          bias_init: initializer of the bias.
          pattern: a fixed `SparsityPattern` of shape `(kh, kw, in_features,
            out_features)` to use instead of a random one (then leave
            `sparsity` unset).
          conv_variant: the `variant` argument of `sparse_conv2d` ("auto",
            "measure", "batch" or "width").
          rngs: the rng streams; 'params' draws the pattern, kernel and bias.
        """
        where = "nnx.SparseConv"
        in_features = _checks.check_features(where, "in_features", in_features)
        out_features = _checks.check_features(where, "out_features", out_features)
        kernel_size, self.strides, self.padding = conv_config(
            where, kernel_size, strides, padding, input_dilation=input_dilation,
            kernel_dilation=kernel_dilation, feature_group_count=feature_group_count,
            conv_variant=conv_variant)
        self.conv_variant = conv_variant
        # Checked before a pattern is drawn: a bad dtype fails fast, whatever the sizes.
        dtype = check_dtype_arg(where, "dtype", dtype, optional=True)
        param_dtype = check_dtype_arg(where, "param_dtype", param_dtype)
        shape = kernel_size + (in_features, out_features)
        pattern = layer_pattern(where, shape, sparsity, pattern, rngs.params, CONV_DIMS)
        self._init_params(where, pattern, use_bias, kernel_init, bias_init, dtype, param_dtype,
                          rngs)

    # -- facts ----------------------------------------------------------------
    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """The dense kernel's shape `(kh, kw, in_features, out_features)`."""
        return self.pattern.get_value().shape

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.kernel_shape[:2]

    @property
    def in_features(self) -> int:
        return self.kernel_shape[2]

    @property
    def out_features(self) -> int:
        return self.kernel_shape[3]

    def __call__(self, inputs: Any) -> Array:
        """Applies the layer.

        Inputs, values and bias are cast to `dtype` (when None, to their
        common dtype) before the convolution, as `nnx.Conv` does.

        Args:
          inputs: `[N, H, W, in_features]`; also `[H, W, in_features]`
            (unbatched) or with several batch dims, as `flax.nnx.Conv` takes.

        Returns:
          `[N, H_out, W_out, out_features]` in the computation dtype (same
          batch dims as `inputs`).
        """
        inputs, weight, bias = self._promoted("nnx.SparseConv", inputs)
        return apply_conv("nnx.SparseConv", inputs, weight, bias, self.strides, self.padding,
                          self.conv_variant)

    def __nnx_repr__(self):
        # One line of facts instead of the arrays; also used when nested in a model.
        yield reprlib.Object(type=type(self), same_line=True)
        yield reprlib.Attr("in_features", self.in_features)
        yield reprlib.Attr("out_features", self.out_features)
        yield reprlib.Attr("kernel_size", self.kernel_size)
        yield reprlib.Attr("strides", self.strides)
        yield reprlib.Attr("padding", self.padding)
        yield reprlib.Attr("sparsity", f"{self.sparsity:.4g}", use_raw_value=True)
        yield reprlib.Attr("nnz", self.nnz)
        yield reprlib.Attr("use_bias", self.use_bias)
        yield from self._repr_dtypes()

    # -- conversions ----------------------------------------------------------
    @classmethod
    def from_dense(cls, conv_or_kernel: Any, bias: Optional[Any] = None, *,
                   mask: Optional[Any] = None, strides: Any = None, padding: Any = None,
                   dtype: Optional[Any] = None, param_dtype: Optional[Any] = None,
                   conv_variant: str = "auto") -> "SparseConv":
        """A `SparseConv` holding the nonzeros of a dense conv layer or HWIO kernel.

        Draws no random numbers.

        Args:
          conv_or_kernel: an `nnx.Conv` (its bias, strides, padding, `dtype`
            and `param_dtype` are kept; its `mask`, if any, is applied to the
            kernel first) or a `(kh, kw, in_features, out_features)` kernel
            (float32 or bfloat16).
          bias: optional `[out_features]`; only with a kernel array.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Entries outside the mask are dropped.
          strides, padding: only with a kernel array; default 1 and "SAME".
          dtype: the layer's computation dtype; only with a kernel array.
          param_dtype: the dtype the values and bias are stored in; only with
            a kernel array, whose dtype it defaults to.
          conv_variant: the `variant` argument of `sparse_conv2d`.

        Returns:
          The layer; `use_bias` is whether a bias was given.
        """
        where = "nnx.SparseConv.from_dense"
        kernel_name, bias_name = "kernel", "bias"
        conv = None
        if isinstance(conv_or_kernel, nnx.Conv):
            conv = conv_or_kernel
            for name, value in (("bias", bias), ("strides", strides), ("padding", padding)):
                if value is not None:
                    raise ValueError(f"{where}: {name} must be None when an nnx.Conv is given "
                                     f"(its own {name} is kept)")
            _, strides, padding = conv_config(
                where, conv.kernel_size, conv.strides, conv.padding,
                input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
                feature_group_count=conv.feature_group_count, conv_variant=conv_variant,
                prefix="conv.")
            kernel = conv.kernel[...]
            if conv.mask is not None:
                kernel = kernel * conv.mask
            bias = None if conv.bias is None else conv.bias[...]
            kernel_name, bias_name = "conv.kernel", "conv.bias"
        else:
            kernel = conv_or_kernel
            strides = 1 if strides is None else strides
            padding = "SAME" if padding is None else padding
        kernel, pattern, bias = check_dense(where, kernel, bias, mask, kernel_name, bias_name,
                                            dims=CONV_DIMS)
        dtype, param_dtype = cls._dense_dtypes(where, conv, kernel, dtype, param_dtype)
        kh, kw, n_in, n_out = pattern.shape
        return cls(n_in, n_out, (kh, kw), strides, padding=padding, use_bias=bias is not None,
                   dtype=dtype, param_dtype=param_dtype, kernel_init=_constant(kernel),
                   bias_init=_constant(bias), pattern=pattern, conv_variant=conv_variant,
                   rngs=nnx.Rngs(0))

    def to_dense(self) -> nnx.Conv:
        """The equivalent `nnx.Conv`, with the pruned entries as exact zeros and the same
        `dtype` and `param_dtype`.

        Draws no random numbers.
        """
        bias = self._bias_value()
        return nnx.Conv(self.in_features, self.out_features, self.kernel_size, self.strides,
                        padding=self.padding, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=_constant(self.weight.to_dense()),
                        bias_init=_constant(bias), rngs=nnx.Rngs(0))


def batch_norm_relu_max_pool(bn: nnx.BatchNorm, x: Array, window_shape, strides=None,
                             padding="VALID", *, use_running_average: Optional[bool] = None
                             ) -> Array:
    """`max_pool(nnx.relu(bn(x, use_running_average)), window_shape, strides, padding)`.

    The same values, gradients and running-average updates of `bn` (an
    `nnx.BatchNorm`), with the backward of
    `sparseprop_jax.norm_pool.batch_norm_relu_max_pool`: two C++ passes where
    XLA's CPU backend runs a strided pad per window tap. It applies in
    training mode to a 4-D float32 `x` with `bn`'s default features axis
    (-1), `axis_name`, `dtype` and `use_fast_variance`; any other call runs
    the three ops as written above.
    """
    if not isinstance(bn, nnx.BatchNorm):
        raise TypeError(f"batch_norm_relu_max_pool: bn must be an nnx.BatchNorm, got "
                        f"{type(bn).__name__}")
    running = bn.use_running_average if use_running_average is None else use_running_average
    x = _checks.as_array("batch_norm_relu_max_pool", "x", x)
    default = (nnx.BatchNorm.__init__.__kwdefaults__ or {}).get("promote_dtype")
    default_promote = getattr(bn, "promote_dtype", default) is default
    fused = (running is False and x.ndim == 4 and x.dtype == jax.numpy.float32
             and bn.axis in (-1, 3) and bn.axis_name is None and bn.dtype in (None, "float32",
                                                                              jax.numpy.float32)
             and bn.use_fast_variance and default_promote
             and bn.mean[...].dtype == jax.numpy.float32)
    if not fused:
        return max_pool(nnx.relu(bn(x, use_running_average=running)), window_shape, strides,
                        padding)
    ones = jax.numpy.ones(x.shape[-1:], x.dtype)
    scale = bn.scale[...] if bn.scale is not None else ones
    bias = bn.bias[...] if bn.bias is not None else jax.numpy.zeros_like(ones)
    y, mean, var = norm_pool.batch_norm_relu_max_pool(
        x, scale.astype(x.dtype), bias.astype(x.dtype), window_shape, strides, padding,
        epsilon=bn.epsilon)
    bn.mean[...] = bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean
    bn.var[...] = bn.momentum * bn.var[...] + (1 - bn.momentum) * var
    return y
