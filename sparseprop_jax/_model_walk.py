"""Finding the kernel layers of a Flax model, and swapping them (nnx) or their variables (linen).

A `Layer` describes one `Linear`/`Dense` or `Conv` layer (dense or already
sparse) by its path in the model: its kernel as a dense NumPy array, which
entries may stay (its nonzeros, or its pattern), its convolution settings and
the input shape it was called with. `sparsify`, `prune`, the mask interop and
the checkpoints all work on these records.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseprop_jax import _checks, dense_conv
from sparseprop_jax import linen as sp_linen
from sparseprop_jax import nnx as sp_nnx
from sparseprop_jax._layer_helpers import apply_conv, conv_config
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

PATTERN_COLLECTION = sp_linen.PATTERN_COLLECTION

NNX_DENSE = (nnx.Linear, nnx.Conv)
NNX_SPARSE = (sp_nnx.SparseDense, sp_nnx.SparseConv)
LINEN_TYPES = (nn.Dense, nn.Conv, sp_linen.SparseDense, sp_linen.SparseConv)


@dataclasses.dataclass
class Layer:
    """One kernel layer of a model.

    Attributes:
      path: its path in the model (nnx) or its scope path (linen).
      name: the path joined with '/', as printed and matched by skip patterns.
      kind: "dense" (a linear layer) or "conv".
      type_name: e.g. "nnx.Linear", "linen.Conv", "nnx.SparseDense".
      shape: the kernel shape `(in, out)` or `(kh, kw, in, out)`.
      kernel: the dense kernel (pruned entries as zeros), or None if unsupported.
      eligible: boolean, the entries that may stay: the nonzeros of a dense
        kernel, the pattern of a sparse one.
      pattern: the current pattern of a sparse layer, else None.
      module: the nnx module, or the (bound) linen module seen while tracing.
      strides, padding: the parsed convolution settings (conv only).
      input_shape: the shape of the layer's input, when the model was traced.
      error: why the layer cannot be made sparse, or None.
    """

    path: tuple
    name: str
    kind: str
    type_name: str
    shape: tuple
    kernel: Optional[np.ndarray]
    eligible: Optional[np.ndarray]
    pattern: Optional[SparsityPattern]
    module: Any
    strides: Any = None
    padding: Any = None
    input_shape: Optional[tuple] = None
    error: Optional[str] = None

    @property
    def sparse(self) -> bool:
        return self.pattern is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def path_name(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def norm_path(path: Sequence[Any]) -> tuple:
    """A path with every key as a str (nnx list indices are ints, state keys may be str)."""
    return tuple(str(p) for p in path)


def match_skip(where: str, layers: Sequence[Layer], skip: Any) -> set[str]:
    """The names of the layers matched by `skip`, a glob pattern or a list of them.

    A pattern matches a layer whose '/'-joined path it matches (fnmatch), or
    whose path ends with '/' + the match ("head" matches "head" and
    "classifier/head"). A pattern that matches no layer is an error.
    """
    if skip is None:
        return set()
    if isinstance(skip, str):
        skip = (skip,)
    try:
        patterns = list(skip)
    except TypeError:
        raise TypeError(f"{where}: skip must be a layer name pattern or a list of them, "
                        f"got {skip!r}") from None
    skipped: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{where}: skip must hold layer name patterns (str), "
                            f"got {pattern!r}")
        hits = {layer.name for layer in layers
                if fnmatch.fnmatchcase(layer.name, pattern)
                or fnmatch.fnmatchcase(layer.name, "*/" + pattern)}
        if not hits:
            names = ", ".join(repr(layer.name) for layer in layers) or "none"
            raise ValueError(f"{where}: skip pattern {pattern!r} matches no Linear/Dense or "
                             f"Conv layer of the model; its layers are: {names}")
        skipped |= hits
    return skipped


# -- nnx ----------------------------------------------------------------------
def _conv_error(where: str, kernel_size, strides, padding, **kwargs):
    """(strides, padding, None), or (None, None, reason) for an unsupported conv."""
    try:
        _, strides, padding = conv_config(where, kernel_size, 1 if strides is None else strides,
                                          padding, **kwargs)
    except ValueError as err:
        return None, None, str(err).split(": ", 1)[-1]
    return strides, padding, None


def _dtype_error(kernel: np.ndarray) -> Optional[str]:
    if not _checks.is_supported_dtype(kernel.dtype):
        return (f"its kernel is {kernel.dtype} (only {' or '.join(_checks.SUPPORTED_DTYPES)} "
                "is supported)")
    return None


def nnx_layer(path: tuple, module: Any) -> Optional[Layer]:
    """The `Layer` record of an nnx module, or None if it has no kernel we handle."""
    name = path_name(path)
    if isinstance(module, NNX_SPARSE):
        pattern = module.pattern.get_value()
        weight = module.weight
        kind = "dense" if isinstance(module, sp_nnx.SparseDense) else "conv"
        return Layer(path, name, kind, f"nnx.{type(module).__name__}", pattern.shape,
                     np.asarray(weight.to_dense()), pattern.mask(), pattern, module,
                     getattr(module, "strides", None), getattr(module, "padding", None))
    if isinstance(module, nnx.Linear):
        kernel = np.asarray(module.kernel[...])
        return Layer(path, name, "dense", "nnx.Linear", kernel.shape, kernel, kernel != 0, None,
                     module, error=_dtype_error(kernel))
    if isinstance(module, nnx.Conv):
        kernel = np.asarray(module.kernel[...])
        if module.mask is not None:
            kernel = kernel * np.asarray(module.mask, dtype=kernel.dtype)
        strides, padding, error = _conv_error(
            "nnx.Conv", module.kernel_size, module.strides, module.padding,
            input_dilation=module.input_dilation, kernel_dilation=module.kernel_dilation,
            feature_group_count=module.feature_group_count)
        return Layer(path, name, "conv", "nnx.Conv", kernel.shape, kernel, kernel != 0, None,
                     module, strides, padding, error=error or _dtype_error(kernel))
    return None


def nnx_layers(model: Any) -> list[Layer]:
    """The kernel layers of an nnx model, in the order `nnx.iter_modules` gives."""
    seen: set[int] = set()
    layers = []
    for path, module in nnx.iter_modules(model):
        if id(module) in seen:
            continue
        seen.add(id(module))
        layer = nnx_layer(tuple(path), module)
        if layer is not None:
            layers.append(layer)
    return layers


def nnx_replace(model: Any, replacements: Mapping[int, Any]) -> Any:
    """Replaces modules (by `id`) everywhere they are referenced in the model, in place.

    Returns the model, or the replacement of the model itself.
    """
    if id(model) in replacements:
        return replacements[id(model)]
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, (nnx.List, list)):
            for i in range(len(node)):
                if id(node[i]) in replacements:
                    node[i] = replacements[id(node[i])]
        elif isinstance(node, (nnx.Dict, dict)):
            for key in list(node.keys()):
                if id(node[key]) in replacements:
                    node[key] = replacements[id(node[key])]
        elif isinstance(node, nnx.Module):
            for key, value in list(vars(node).items()):
                if id(value) in replacements:
                    setattr(node, key, replacements[id(value)])
        elif isinstance(node, tuple) and any(id(v) in replacements for v in node):
            raise TypeError("a layer to replace sits in a tuple, which cannot be changed in "
                            "place; hold the layers in an nnx.List instead")
    return model


_PROBES: dict[str, tuple] = {}
_PROBE_IDS = itertools.count()


class _Probe(nnx.Module):
    """Stands in for a layer while tracing the model: notes the input's shape."""

    def __init__(self, layer: Any, key: str):
        self.layer = layer
        self.key = key

    def __call__(self, x, *args, **kwargs):
        _PROBES.setdefault(self.key, tuple(np.shape(x)))
        return self.layer(x, *args, **kwargs)


def nnx_input_shapes(model: Any, layers: Sequence[Layer], inputs: tuple,
                     call_kwargs: Mapping) -> None:
    """Sets each layer's `input_shape` by tracing `model(*inputs, **call_kwargs)` (no FLOPs).

    The model is traced with `nnx.eval_shape`, so its state (batch statistics,
    rng counts) is left as it was.
    """
    token = next(_PROBE_IDS)
    probes = {id(layer.module): _Probe(layer.module, f"{token}:{i}")
              for i, layer in enumerate(layers)}
    model = nnx_replace(model, probes)
    try:
        nnx.eval_shape(lambda m: m(*inputs, **call_kwargs), model)
    finally:
        nnx_replace(model, {id(p): layer.module for p, layer in zip(probes.values(), layers)})
        shapes = {key: _PROBES.pop(key) for key in list(_PROBES) if key.startswith(f"{token}:")}
    for i, layer in enumerate(layers):
        layer.input_shape = shapes.get(f"{token}:{i}")


# -- linen --------------------------------------------------------------------
def tree_get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def tree_set(tree: dict, path: Sequence[str], value: Any) -> None:
    """Sets `tree[path[0]]...[path[-1]] = value` in a tree of plain dicts, creating dicts.

    An empty path (the root module of a linen model) replaces the tree's contents.
    """
    if not path:
        tree.clear()
        tree.update(value)
        return
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def tree_delete(tree: dict, path: Sequence[str]) -> None:
    """Deletes the entry at `path` and the dicts it leaves empty (an empty path: everything)."""
    if not path:
        tree.clear()
        return
    parents = [tree]
    for key in path[:-1]:
        parents.append(parents[-1][key])
    del parents[-1][path[-1]]
    for parent, key in zip(reversed(parents[:-1]), reversed(path[:-1])):
        if parent[key]:
            break
        del parent[key]


def to_dicts(tree: Any) -> Any:
    """Nested Mappings (FrozenDicts included) as plain dicts; leaves are kept."""
    if isinstance(tree, Mapping):
        return {k: to_dicts(v) for k, v in tree.items()}
    return tree


def is_pattern_entry(tree: Any) -> bool:
    """Whether `tree` is a stored pattern (`SparsityPattern.to_arrays`, or one lacking its shape,
    which `SparsityPattern.from_arrays` refuses with an explanation)."""
    return isinstance(tree, Mapping) and all(f in tree for f in SparsityPattern.FIELDS)


def _linen_kernel_shape(module: Any, x_shape: tuple) -> tuple:
    if isinstance(module, (nn.Dense, sp_linen.SparseDense)):
        return (int(x_shape[-1]), int(module.features))
    ks = module.kernel_size
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    return ks + (int(x_shape[-1]), int(module.features))


def _linen_conv_settings(module: Any):
    return _conv_error("linen.Conv", module.kernel_size, module.strides, module.padding,
                       input_dilation=module.input_dilation,
                       kernel_dilation=module.kernel_dilation,
                       feature_group_count=module.feature_group_count)


def _linen_where(module: Any) -> str:
    return f"sparse {type(module).__name__} {path_name(module.scope.path)!r}"


def _linen_pattern(where: str, arrays: Mapping, shape: tuple) -> SparsityPattern:
    """The stored pattern of a linen Dense/Conv layer whose kernel shape is `shape`."""
    pattern = SparsityPattern.from_arrays(arrays, where, window=shape[:-2])
    if pattern.shape != shape:
        raise ValueError(f"{where}: the pattern in the variables has kernel shape "
                         f"{pattern.shape}, which does not fit the layer's kernel shape {shape}")
    return pattern


def _linen_sparse_call(module: Any, x: Any) -> Any:
    """`module(x)` for an nn.Dense / nn.Conv whose variables hold sparse values."""
    where = _linen_where(module)
    x = jnp.asarray(x)
    pattern = _linen_pattern(where, module.variables[PATTERN_COLLECTION],
                             _linen_kernel_shape(module, x.shape))
    values = module.get_variable("params", "values")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    # The layer's own promotion to its dtype, as its dense call does.
    x, values, bias = module.promote_dtype(x, values, bias, dtype=module.dtype)
    weight = SparseWeight(values, pattern)
    if isinstance(module, nn.Dense):
        return sparse_linear(x, weight, bias)
    strides, padding, error = _linen_conv_settings(module)
    if error:
        raise ValueError(f"{where}: {error}")
    return apply_conv(where, x, weight, bias, strides, padding, "auto")


def _is_sparse_linen(module: Any) -> bool:
    return (isinstance(module, (nn.Dense, nn.Conv)) and module.has_variable("params", "values")
            and module.has_variable(PATTERN_COLLECTION, "indptr"))


def computes_with_lax_conv(module: Any) -> bool:
    """Whether a Flax conv layer (nnx or linen) computes with `lax.conv_general_dilated`.

    False for a layer given a convolution function of its own.
    """
    if isinstance(module, nnx.Conv):
        return module.conv_general_dilated is jax.lax.conv_general_dilated
    if isinstance(module, nn.Conv):
        return (module.conv_general_dilated_cls is None
                and module.conv_general_dilated in (None, jax.lax.conv_general_dilated))
    return False


def linen_interceptor(record: Optional[Callable[[Any, tuple], None]] = None,
                      fast_dense_convs: bool = False):
    """A `flax.linen.intercept_methods` interceptor running sparse Dense/Conv layers.

    A `nn.Dense` or `nn.Conv` whose variables hold `values` (in `params`)
    and a pattern (in `PATTERN_COLLECTION`) instead of a kernel runs the sparse
    routines. With `fast_dense_convs`, a dense `nn.Conv` that computes with
    `lax.conv_general_dilated` runs with `sparseprop_jax.conv_general_dilated`
    instead. Every other call runs as usual. `record(module, input_shape)` is
    called for each call of a Dense/Conv (sparse or not) layer.
    """
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, LINEN_TYPES):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs.get("inputs")
        if record is not None:
            record(module, tuple(np.shape(x)))
        if _is_sparse_linen(module):
            return _linen_sparse_call(module, x)
        if (fast_dense_convs and computes_with_lax_conv(module)
                and module.has_variable("params", "kernel")):  # not while initialising
            # The same layer, unbound, with the fast function, on this layer's
            # variables; its own call no longer matches here.
            fast = module.clone(parent=None,
                                conv_general_dilated=dense_conv.conv_general_dilated)
            return fast.apply(module.variables, *args, **kwargs)
        return next_fun(*args, **kwargs)
    return interceptor


def linen_layers(module: nn.Module, variables: Mapping, inputs: tuple,
                 call_kwargs: Mapping) -> list[Layer]:
    """The Dense/Conv layers of a linen model, found by tracing `module.apply` (no FLOPs)."""
    seen: dict[tuple, tuple] = {}

    def record(mod, x_shape):
        path = tuple(mod.scope.path)
        if path not in seen:
            seen[path] = (mod, x_shape)

    with nn.intercept_methods(linen_interceptor(record)):
        jax.eval_shape(functools.partial(module.apply, **call_kwargs), variables, *inputs)
    params = variables.get("params", {})
    patterns = variables.get(PATTERN_COLLECTION, {})
    layers = []
    for path, (mod, x_shape) in seen.items():
        name = path_name(path)
        kind = "dense" if isinstance(mod, (nn.Dense, sp_linen.SparseDense)) else "conv"
        type_name = f"linen.{type(mod).__name__}"
        layer_params = tree_get(params, path)
        arrays = tree_get(patterns, path)
        shape = _linen_kernel_shape(mod, x_shape)
        strides = padding = error = None
        if kind == "conv":
            strides, padding, error = _linen_conv_settings(mod)
        if is_pattern_entry(arrays) and "values" in (layer_params or {}):
            pattern = _linen_pattern(_linen_where(mod), arrays, shape)
            kernel = np.asarray(SparseWeight(layer_params["values"], pattern).to_dense())
            layers.append(Layer(path, name, kind, type_name, shape, kernel, pattern.mask(),
                                pattern, mod, strides, padding, x_shape, error))
            continue
        kernel = np.asarray(layer_params["kernel"])
        if kind == "conv" and getattr(mod, "mask", None) is not None:
            kernel = kernel * np.asarray(mod.mask, dtype=kernel.dtype)
        layers.append(Layer(path, name, kind, type_name, kernel.shape, kernel, kernel != 0,
                            None, mod, strides, padding, x_shape,
                            error or _dtype_error(kernel)))
    return layers
