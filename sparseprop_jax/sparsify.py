"""Sparsify and densify whole Flax models.

`sparsify` prunes the `Linear`/`Dense` and `Conv` layers of a model by weight
magnitude and swaps them for sparse ones; `densify` swaps them back, zeros in
place. For `flax.nnx` models the swap is module surgery; for `flax.linen`
models it is a new variables tree (values and patterns instead of kernels)
that the unchanged module runs sparsely under `sparse_apply`::

    # nnx: the layers are replaced in place
    model, report = sparsify(model, 0.9, distribution="erk", skip=["stem", "head"])
    print(report)

    # linen: new variables, applied through sparse_apply
    variables, report = sparsify(module, 0.9, variables=variables, inputs=x)
    y = sparse_apply(module)(variables, x)

Layers the distribution gives less than `min_sparsity`, or that are slower
sparse than dense on the model's real input shapes (`only_where_faster=True`),
stay dense and unpruned. A layer that already has exact zeros keeps them:
pruning only adds zeros. Layers that are already sparse (`SparseDense`,
`SparseConv`, or sparse linen variables) are pruned further in place.
The convolutions that stay dense compute with
`sparseprop_jax.conv_general_dilated` unless `keep_flax_ops=True` (for
linen, an argument of `sparse_apply`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseprop_jax import _checks
from sparseprop_jax import _model_walk as ml
from sparseprop_jax import dense_conv
from sparseprop_jax.conv import sparse_conv2d
from sparseprop_jax.distribution import (check_distribution, check_target_sparsity,
                                         magnitude_masks)
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax.nnx import SparseConv, SparseDense
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

PATTERN_COLLECTION = ml.PATTERN_COLLECTION

#: Decisions in a `LayerReport`.
SPARSE = "sparse"
SKIPPED = "dense (skipped)"
SKIPPED_SPARSE = "sparse (skipped)"
BELOW_MIN = "dense (below min_sparsity)"
DENSE_FASTER = "dense (faster)"


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What `sparsify` did with one layer.

    Attributes:
      name: the layer's path, '/'-joined.
      layer_type: e.g. "nnx.Linear", "linen.Conv".
      shape: the kernel shape.
      sparsity: the sparsity the distribution gives the layer (what it has if
        the decision is "sparse"; skipped layers: their current zeros).
      nnz: the kernel entries kept at that sparsity.
      dense_ms: milliseconds of a dense forward + backward pass on the
        layer's input shape (None unless `only_where_faster`).
      sparse_ms: the same for the sparse layer (None unless `only_where_faster`).
      decision: "sparse", "dense (skipped)", "dense (below min_sparsity)",
        "dense (faster)", or "sparse (skipped)" (an already sparse layer left
        as it was).
    """

    name: str
    layer_type: str
    shape: tuple
    sparsity: float
    nnz: int
    dense_ms: Optional[float]
    sparse_ms: Optional[float]
    decision: str

    @property
    def is_sparse(self) -> bool:
        return self.decision.startswith(SPARSE)


class SparsifyReport(tuple):
    """The `LayerReport`s of a `sparsify` or `prune` call, in the order the model's layers
    are listed (for nnx, `nnx.iter_modules`'s, by attribute name), which need not be the
    order of the forward pass.

    A tuple of `LayerReport`; `str(report)` (or `print(report)`) is a table.
    """

    def __new__(cls, layers: Sequence[LayerReport] = ()):
        return super().__new__(cls, tuple(layers))

    def __getitem__(self, key):
        if isinstance(key, str):
            for layer in self:
                if layer.name == key:
                    return layer
            raise KeyError(f"no layer named {key!r}; layers: {[r.name for r in self]}")
        return super().__getitem__(key)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the kernels of the sparse layers."""
        sparse = [r for r in self if r.is_sparse]
        size = sum(int(np.prod(r.shape)) for r in sparse)
        return 1.0 - sum(r.nnz for r in sparse) / size if size else 0.0

    def __str__(self) -> str:
        def ms(v):
            return "-" if v is None else f"{v:.3f}"
        header = ("layer", "type", "shape", "sparsity", "nnz", "dense ms", "sparse ms",
                  "decision")
        rows = [(r.name, r.layer_type, "x".join(str(d) for d in r.shape), f"{r.sparsity:.4f}",
                 str(r.nnz), ms(r.dense_ms), ms(r.sparse_ms), r.decision) for r in self]
        widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
        right = {3, 4, 5, 6}

        def line(row):
            return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        lines = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
        n_sparse = sum(r.is_sparse for r in self)
        lines.append(f"{n_sparse} of {len(self)} layers sparse; sparsity of the sparse layers "
                     f"{self.sparsity:.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparsifyReport({len(self)} layers)\n{self}"


# -- timing -------------------------------------------------------------------
def _train_pass(fn: Callable) -> Callable:
    """Forward and backward (input and weight gradients) of `fn(x, w)`, jitted."""
    def loss(x, w, ct):
        return jnp.vdot(fn(x, w), ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _median_ms(fn: Callable, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def _time_layer(layer: ml.Layer, mask: np.ndarray, repeats: int = 5,
                dense_conv_fn: Callable = jax.lax.conv_general_dilated) -> tuple[float, float]:
    """Milliseconds of a dense and a sparse forward + backward pass of one layer.

    Args:
      layer: the layer, with its `input_shape` set.
      mask: the pattern the sparse layer would have.
      repeats: timed runs after one warm-up run; the median is returned.
      dense_conv_fn: what a conv layer computes with if it stays dense.

    Returns:
      `(dense_ms, sparse_ms)`.
    """
    rng = np.random.default_rng(0)
    shape = layer.input_shape
    if layer.kind == "conv":
        if len(shape) == 3:
            shape = (1,) + tuple(shape)
        elif len(shape) > 4:
            shape = (int(np.prod(shape[:-3])),) + tuple(shape[-3:])
    x = jnp.asarray(rng.standard_normal(shape).astype(_checks.DEFAULT_DTYPE))
    kernel = jnp.asarray(np.where(mask, layer.kernel, 0).astype(_checks.DEFAULT_DTYPE))
    weight = SparseWeight.from_dense(kernel, mask)
    pattern = weight.pattern
    if layer.kind == "dense":
        def dense(x, k):
            return x @ k

        def sparse(x, v):
            return sparse_linear(x, SparseWeight(v, pattern))
    else:
        def dense(x, k):
            return dense_conv_fn(x, k, layer.strides, layer.padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def sparse(x, v):
            return sparse_conv2d(x, SparseWeight(v, pattern), None, layer.strides, layer.padding)
    ct = jnp.asarray(rng.standard_normal(jax.eval_shape(dense, x, kernel).shape)
                     .astype(_checks.DEFAULT_DTYPE))
    dense_ms = _median_ms(_train_pass(dense), (x, kernel, ct), repeats)
    sparse_ms = _median_ms(_train_pass(sparse), (x, weight.values, ct), repeats)
    return dense_ms, sparse_ms


# -- planning -----------------------------------------------------------------
@dataclasses.dataclass
class _Step:
    layer: ml.Layer
    mask: Optional[np.ndarray]  # the new pattern if the layer ends up sparse
    report: LayerReport


def _plan(where: str, layers: list[ml.Layer], sparsity: Any, distribution: str, skip: Any,
          min_sparsity: Any, only_where_faster: bool, repeats: int,
          keep_flax_ops: bool) -> list[_Step]:
    sparsity = check_target_sparsity(where, sparsity)
    distribution = check_distribution(where, distribution)
    min_sparsity = _checks.check_sparsity(where, min_sparsity)
    skipped = ml.match_skip(where, layers, skip)
    for layer in layers:
        if layer.name not in skipped and layer.error:
            raise ValueError(f"{where}: layer {layer.name!r} ({layer.type_name}) cannot be made "
                             f"sparse: {layer.error}; add it to skip to keep it dense")
    active = [layer for layer in layers if layer.name not in skipped]
    masks = magnitude_masks([layer.kernel for layer in active], sparsity, distribution,
                            [layer.eligible for layer in active])
    mask_of = {layer.name: mask for layer, mask in zip(active, masks)}
    steps = []
    for layer in layers:
        if layer.name in skipped:
            nnz = layer.pattern.nnz if layer.sparse else int(np.count_nonzero(layer.kernel))
            steps.append(_Step(layer, None, LayerReport(
                layer.name, layer.type_name, layer.shape, 1.0 - nnz / layer.size, nnz,
                None, None, SKIPPED_SPARSE if layer.sparse else SKIPPED)))
            continue
        mask = mask_of[layer.name]
        nnz = int(np.count_nonzero(mask))
        layer_sparsity = 1.0 - nnz / layer.size
        dense_ms = sparse_ms = None
        if layer.sparse:
            decision = SPARSE
        elif layer_sparsity < min_sparsity:
            decision = BELOW_MIN
        elif only_where_faster:
            if layer.input_shape is None:
                raise ValueError(f"{where}: layer {layer.name!r} was not called by the model on "
                                 "the example inputs, so it cannot be timed (skip it, or give "
                                 "inputs that reach it)")
            dense_ms, sparse_ms = _time_layer(layer, mask, repeats,
                                              _dense_conv_fn(layer, keep_flax_ops))
            decision = SPARSE if sparse_ms < dense_ms else DENSE_FASTER
        else:
            decision = SPARSE
        steps.append(_Step(layer, mask if decision == SPARSE else None, LayerReport(
            layer.name, layer.type_name, layer.shape, layer_sparsity, nnz, dense_ms, sparse_ms,
            decision)))
    return steps


def _value_positions(pattern: SparsityPattern, mask: np.ndarray) -> np.ndarray:
    """Positions, in a layer's values, of the entries of `pattern` that `mask` keeps."""
    matrix = mask.reshape(pattern.matrix_shape)
    keep = matrix[np.asarray(pattern.indices), np.asarray(pattern.output_index())]
    return np.flatnonzero(keep)


# A move tells how one leaf shaped like a new parameter follows from the old one:
# {new parameter path: (old parameter path, function of the old leaf)}.
Moves = dict


def _gather_fn(pattern: SparsityPattern) -> Callable:
    return lambda kernel: SparseWeight.gather(jnp.asarray(kernel), pattern).values


def _take_fn(positions: np.ndarray) -> Callable:
    return lambda values: jnp.asarray(values)[positions]


def _dense_conv_fn(layer: ml.Layer, keep_flax_ops: bool) -> Callable:
    """What a conv layer computes with if it stays dense."""
    module = layer.module
    if not keep_flax_ops and ml.computes_with_lax_conv(module):
        return dense_conv.conv_general_dilated
    if getattr(module, "conv_general_dilated_cls", None) is not None:
        return module.conv_general_dilated_cls()
    return getattr(module, "conv_general_dilated", None) or jax.lax.conv_general_dilated


def _fast_dense_conv(layer: ml.Layer) -> None:
    """Gives an nnx conv that stays dense the fast dense convolution, unless it has its own."""
    if isinstance(layer.module, nnx.Conv) and ml.computes_with_lax_conv(layer.module):
        layer.module.conv_general_dilated = dense_conv.conv_general_dilated


def _apply_nnx(model: Any, steps: list[_Step], conv_variant: str,
               keep_flax_ops: bool) -> tuple[Any, Moves]:
    """Swaps or re-packs the nnx layers the plan makes sparse; returns the model and moves."""
    replacements, moves = {}, {}
    for step in steps:
        layer, mask = step.layer, step.mask
        if mask is None:
            if not keep_flax_ops and not layer.sparse:
                _fast_dense_conv(layer)
            continue
        new_path, module = ml.norm_path(layer.path) + ("values",), layer.module
        if layer.sparse:
            if int(np.count_nonzero(mask)) == layer.pattern.nnz:
                continue
            positions = _value_positions(layer.pattern, mask)
            module.values.set_value(jnp.asarray(module.values[...])[positions])
            module.pattern.set_value(SparsityPattern.from_mask(mask))
            moves[new_path] = (new_path, _take_fn(positions))
            continue
        if layer.kind == "dense":
            new = SparseDense.from_dense(module, mask=mask)
        else:
            new = SparseConv.from_dense(module, mask=mask, conv_variant=conv_variant)
        replacements[id(module)] = new
        old_path = ml.norm_path(layer.path) + ("kernel",)
        moves[new_path] = (old_path, _gather_fn(new.pattern.get_value()))
    if replacements:
        model = ml.nnx_replace(model, replacements)
    return model, moves


def _apply_linen(variables: Mapping, steps: list[_Step]) -> tuple[dict, Moves]:
    """New linen variables with the plan's sparse layers as values and patterns."""
    new = ml.to_dicts(variables)
    params = new.setdefault("params", {})
    patterns = new.setdefault(PATTERN_COLLECTION, {})
    moves = {}
    for step in steps:
        layer, mask = step.layer, step.mask
        if mask is None:
            continue
        path = tuple(layer.path)
        layer_params = ml.tree_get(params, path)
        if layer.sparse:
            if int(np.count_nonzero(mask)) == layer.pattern.nnz:
                continue
            positions = _value_positions(layer.pattern, mask)
            layer_params["values"] = jnp.asarray(layer_params["values"])[positions]
            moves[path + ("values",)] = (path + ("values",), _take_fn(positions))
        else:
            pattern = SparsityPattern.from_mask(mask)
            layer_params["values"] = SparseWeight.gather(jnp.asarray(layer.kernel),
                                                         pattern).values
            del layer_params["kernel"]
            moves[path + ("values",)] = (path + ("kernel",), _gather_fn(pattern))
        ml.tree_set(patterns, path, SparsityPattern.from_mask(mask).to_arrays())
    if not patterns:
        del new[PATTERN_COLLECTION]
    return new, moves


def _as_inputs(inputs: Any) -> tuple:
    if inputs is None:
        return ()
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _run(where: str, model: Any, sparsity: Any, *, distribution: str, skip: Any,
         min_sparsity: Any, only_where_faster: bool, inputs: Any, call_kwargs: Any,
         variables: Any, copy: bool, timing_repeats: int, conv_variant: str,
         keep_flax_ops: bool = False):
    """sparsify's body; also returns the moves, for optimizer state (see pruning)."""
    call_kwargs = dict(call_kwargs or {})
    inputs = _as_inputs(inputs)
    if isinstance(model, nn.Module):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(f"{where}: a linen module needs its variables "
                             "(variables={'params': ...}), as returned by module.init")
        if not inputs:
            raise ValueError(f"{where}: a linen module needs example inputs (inputs=x or a "
                             "tuple of arguments) to find its Dense and Conv layers")
        layers = ml.linen_layers(model, variables, inputs, call_kwargs)
        steps = _plan(where, layers, sparsity, distribution, skip, min_sparsity,
                      only_where_faster, timing_repeats, keep_flax_ops)
        new, moves = _apply_linen(variables, steps)
        return new, SparsifyReport([s.report for s in steps]), moves
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(f"{where}: variables is only for linen modules; an nnx model "
                             "holds its own state")
        if copy:
            model = nnx.clone(model)
        layers = ml.nnx_layers(model)
        if only_where_faster:
            if not inputs:
                raise ValueError(f"{where}: only_where_faster=True times the layers on the "
                                 "model's real input shapes: give example inputs (inputs=x)")
            ml.nnx_input_shapes(model, layers, inputs, call_kwargs)
        steps = _plan(where, layers, sparsity, distribution, skip, min_sparsity,
                      only_where_faster, timing_repeats, keep_flax_ops)
        model, moves = _apply_nnx(model, steps, conv_variant, keep_flax_ops)
        return model, SparsifyReport([s.report for s in steps]), moves
    raise TypeError(f"{where}: model must be a flax.nnx.Module or a flax.linen.Module (with "
                    f"variables=...), got {type(model).__name__}")


def sparsify(model: Any, sparsity: float = 0.9, *, distribution: str = "uniform",
             skip: Any = (), min_sparsity: float = 0.0, only_where_faster: bool = False,
             inputs: Any = None, call_kwargs: Optional[Mapping] = None,
             variables: Optional[Mapping] = None, copy: bool = False, timing_repeats: int = 5,
             conv_variant: str = "auto",
             keep_flax_ops: bool = False) -> tuple[Any, SparsifyReport]:
    """Prunes a model's Linear/Dense and Conv layers by magnitude and makes them sparse.

    Args:
      model: a `flax.nnx.Module`, or a `flax.linen.Module` together with its
        `variables` and example `inputs`.
      sparsity: the target sparsity in [0, 1) (see `distribution`).
      distribution: "uniform" (every layer at `sparsity`), "global" (one
        magnitude threshold across the layers; the layers together reach
        `sparsity` to the weight) or "erk" (Erdos-Renyi-Kernel). Skipped
        layers do not count.
      skip: a layer name pattern or a list of them (fnmatch on the
        '/'-joined path, e.g. "stem", "head", "blocks/0/*"); those layers stay
        dense and unpruned. A pattern matching no layer is an error.
      min_sparsity: a layer the distribution gives less sparsity stays dense
        and unpruned (the SparseProp paper uses 0.8).
      only_where_faster: time each candidate layer dense (computed as it
        would be if kept dense: see `keep_flax_ops`) and sparse (forward +
        backward) on the input shape it gets from `inputs`, and keep it
        dense (unpruned) where dense is faster.
      inputs: example inputs (an array, or a tuple of positional arguments)
        for `model(*inputs)` / `module.apply(variables, *inputs)`; only
        shapes matter (the model is traced, not run).
      call_kwargs: keyword arguments of that call (e.g. `{"train": False}`,
        or `{"mutable": ["batch_stats"]}` for linen).
      variables: the linen variables (`module.init(...)`); linen only.
      copy: nnx only: sparsify a copy (`nnx.clone`) and leave `model` as it
        was; by default the layers are replaced in place.
      timing_repeats: timed runs per layer and implementation (median).
      conv_variant: the `conv_variant` of the new nnx `SparseConv` layers.
      keep_flax_ops: by default the `nnx.Conv` layers that stay dense
        (skipped, below `min_sparsity`, or faster dense) compute with
        `sparseprop_jax.conv_general_dilated` (C++ or XLA's forward, gradients
        as matrix products, several times faster than XLA's in a training
        step); True leaves them as they were. A layer given its own
        `conv_general_dilated` keeps it either way. Linen layers get the
        same from `sparse_apply`, whose `keep_flax_ops` this should match:
        here it only says how `only_where_faster` times a dense conv.

    Returns:
      `(model, report)` for nnx (the same model object unless `copy`, or
      unless `model` is itself a single layer); `(variables, report)` for
      linen: new variables holding `values` instead of `kernel` for each
      sparse layer and its pattern in the `PATTERN_COLLECTION` collection,
      to apply with `sparse_apply(module)(variables, ...)`. `print(report)`
      prints the per-layer table. The sparse layers keep the dense ones'
      `dtype` and `param_dtype`: new nnx layers take them from the layers
      they replace; linen values keep the kernel's dtype, and the unchanged
      module its `dtype`.

    Raises:
      ValueError: sparsity outside [0, 1), an unknown distribution, a skip
        pattern matching no layer, or a layer the sparse kernels cannot run
        (e.g. a dilated or grouped convolution, a kernel neither float32 nor
        bfloat16) that is not skipped.
      TypeError: `model` is not a Flax module.
    """
    model, report, _ = _run("sparsify", model, sparsity, distribution=distribution, skip=skip,
                            min_sparsity=min_sparsity, only_where_faster=only_where_faster,
                            inputs=inputs, call_kwargs=call_kwargs, variables=variables,
                            copy=copy, timing_repeats=timing_repeats, conv_variant=conv_variant,
                            keep_flax_ops=keep_flax_ops)
    return model, report


def densify(model: Any, *, copy: bool = False) -> Any:
    """Swaps sparse layers back for standard Flax layers, the pruned weights as exact zeros.

    Args:
      model: an nnx model (its `SparseDense`/`SparseConv` layers become
        `nnx.Linear`/`nnx.Conv`), or linen variables made by `sparsify` or
        `from_masks` (their sparse layers get their `kernel` back and the
        pattern collection is dropped). Variables of `linen.SparseDense` /
        `linen.SparseConv` modules are stored alike, so they become those of
        the equivalent `nn.Dense` / `nn.Conv` too.
      copy: nnx only: densify a copy and leave `model` as it was.

    Returns:
      The dense nnx model (the same object unless `copy`, or unless it is a
      single layer), or the dense linen variables, for plain `module.apply`.
    """
    where = "densify"
    if isinstance(model, nnx.Module):
        if copy:
            model = nnx.clone(model)
        replacements = {id(layer.module): layer.module.to_dense()
                        for layer in ml.nnx_layers(model) if layer.sparse}
        return ml.nnx_replace(model, replacements)
    if isinstance(model, Mapping):
        return _densify_linen(where, model)
    raise TypeError(f"{where}: model must be a flax.nnx.Module or linen variables (a Mapping), "
                    f"got {type(model).__name__}")


def _densify_linen(where: str, variables: Mapping) -> dict:
    new = ml.to_dicts(variables)
    patterns = new.get(PATTERN_COLLECTION, {})

    def walk(tree, path):
        if ml.is_pattern_entry(tree):
            yield path, tree
            return
        if isinstance(tree, Mapping):
            for key, sub in tree.items():
                yield from walk(sub, path + (key,))

    for path, arrays in list(walk(patterns, ())):
        layer_params = ml.tree_get(new.get("params", {}), path)
        if layer_params is None or "values" not in layer_params:
            raise ValueError(f"{where}: variables[{PATTERN_COLLECTION!r}] has a pattern at "
                             f"{ml.path_name(path)!r} but params has no values there")
        pattern = SparsityPattern.from_arrays(
            arrays, f"{where}: the pattern at {ml.path_name(path)!r}")
        layer_params["kernel"] = SparseWeight(jnp.asarray(layer_params.pop("values")),
                                              pattern).to_dense()
        ml.tree_delete(patterns, path)
    if PATTERN_COLLECTION in new and not new[PATTERN_COLLECTION]:
        del new[PATTERN_COLLECTION]
    return new


# -- linen: running sparse variables ------------------------------------------
@contextlib.contextmanager
def sparse_layers(*, keep_flax_ops: bool = False):
    """Context in which linen `nn.Dense`/`nn.Conv` layers with sparse variables run sparsely.

    Inside it, a `flax.linen.Dense` or `flax.linen.Conv` whose variables hold
    `values` (in `params`) and a pattern (in `PATTERN_COLLECTION`) instead of
    a `kernel` runs the sparse kernels. An `nn.Conv` that stays dense
    computes with `sparseprop_jax.conv_general_dilated` unless
    `keep_flax_ops=True` or it has a convolution function of its own. Every
    other layer runs as usual. It must be active while the model is traced
    (inside the jitted function); `sparse_apply` takes care of that.
    """
    with nn.intercept_methods(ml.linen_interceptor(fast_dense_convs=not keep_flax_ops)):
        yield


def sparse_apply(module_or_apply: Any, *, keep_flax_ops: bool = False) -> Callable:
    """`module.apply` that runs the sparse layers of variables made by `sparsify`.

    Args:
      module_or_apply: a `flax.linen.Module`, or its `apply` (or any
        function that applies it).
      keep_flax_ops: by default the `nn.Conv` layers that stay dense compute
        with `sparseprop_jax.conv_general_dilated` (as `sparsify` gives nnx
        convolutions); True leaves them to `lax.conv_general_dilated`. A
        layer given its own `conv_general_dilated` keeps it either way.

    Returns:
      A function with `module.apply`'s signature (`apply(variables, *args,
      **kwargs)`), usable under `jax.jit` and `jax.grad`. The sparse layers
      promote their inputs and parameters to the dense layer's `dtype` with
      its `promote_dtype`, as its own call does, and ignore its `precision`
      and `dot_general` settings; layers inside lifted transforms
      (`nn.scan`, `nn.vmap`) are not supported.
    """
    apply = module_or_apply.apply if isinstance(module_or_apply, nn.Module) else module_or_apply
    if not callable(apply):
        raise TypeError(f"sparse_apply: expected a linen Module or its apply function, "
                        f"got {type(module_or_apply).__name__}")

    @functools.wraps(apply)
    def sparse(*args, **kwargs):
        with sparse_layers(keep_flax_ops=keep_flax_ops):
            return apply(*args, **kwargs)
    return sparse


__all__ = ["LayerReport", "SparsifyReport", "densify", "sparse_apply", "sparse_layers",
           "sparsify"]
