"""Loads the compiled extension, registers its XLA FFI targets with JAX, and issues the calls.

The targets are declared in `_targets.py`; at import the extension's own
report of them is checked against those declarations, then each is
registered. Every custom call of the package goes through `call`, which also
makes the
calls work when the batch is split across devices:

- under `shard_map` the results are declared varying over the manual mesh axes
  their operands vary over (a result declared invariant would make JAX
  all-reduce its cotangent behind our back: silently wrong gradients);
- under `jit` with sharded inputs each call is a `custom_partitioning` op, so
  XLA runs it on every device's batch shard instead of gathering the batch
  (an opaque custom call is otherwise replicated), and a weight gradient is
  the sum of per-shard partial sums, all-reduced once; with the batch split
  over explicit mesh axes, whose split the types already show, a `shard_map`
  does the same.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

try:
    from sparseprop_jax import _sparseprop_jax_ffi as _ext
except ImportError as err:  # e.g. importing the source tree instead of the install
    raise ImportError(
        "sparseprop_jax: the compiled extension _sparseprop_jax_ffi is missing. Install the "
        "package (`pip install .`, or the editable developer install in the README) and do not "
        "run Python from a folder where the source package shadows the installed one."
    ) from err

from sparseprop_jax import _targets  # noqa: E402
from sparseprop_jax._targets import SUM, Dim, Target  # noqa: E402


def _register_targets() -> None:
    reported = _ext.targets()
    _targets.check(reported)
    for name, entry in reported.items():
        jax.ffi.register_ffi_target(name, entry["capsule"], platform="cpu")


_register_targets()


def _simd_path_from_environment() -> None:
    """SPARSEPROP_JAX_SIMD=<path>|auto picks the SIMD path at import.

    <path> is one of the paths `runtime.known_simd_paths()` lists.

    A name that is unknown, or a path this CPU cannot run, warns and keeps the
    best supported path: the import itself does not fail.
    """
    name = os.environ.get("SPARSEPROP_JAX_SIMD", "")
    if not name:
        return
    allowed = ["auto"] + list(_ext.supported_simd_paths())
    if name in allowed:
        _ext.set_simd_path(name)
        return
    warnings.warn(f"SPARSEPROP_JAX_SIMD={name!r} is not one of {allowed} ('auto' or a path "
                  f"this CPU runs); using the best supported path, {_ext.simd_path()!r}",
                  RuntimeWarning, stacklevel=2)


_simd_path_from_environment()


# vmap: batched operands get their vmap dims in front and unbatched ones size-1
# dims there; the handlers loop over those leading dims, broadcasting size 1.
_VMAP_METHOD = "expand_dims"

def _axis(ndim: int, dim: Dim) -> Optional[int]:
    return None if dim is None or dim == SUM else dim % ndim


def _spec(ndim: int, dim: Dim, axes) -> PartitionSpec:
    """Replicated, except `dim` split over the mesh axes `axes`."""
    spec: list = [None] * ndim
    if _axis(ndim, dim) is not None:
        spec[_axis(ndim, dim)] = axes
    return PartitionSpec(*spec)


def _axes_tuple(axes) -> tuple:
    return () if axes is None else tuple(axes) if isinstance(axes, tuple) else (axes,)


def _batch_axes(shardings, ndims, dims):
    """The mesh axes the batch is split over: those of the first batched operand's batch dim."""
    for sharding, ndim, dim in zip(shardings, ndims, dims):
        if _axis(ndim, dim) is not None:
            spec = tuple(getattr(sharding, "spec", ()))
            axes = spec[_axis(ndim, dim)] if _axis(ndim, dim) < len(spec) else None
            return axes or None
    return None


# -- the call -----------------------------------------------------------------
def call(target: Target, shapes, *operands: jax.Array, **attrs):
    """One FFI call of `target`; `shapes` is one result shape or a tuple of them.

    Every custom call of the package goes through here, so how results are
    declared (shape, dtype, vmap rule, sharding) lives in one place. The
    call's floating dtype is its floating operands' (they must agree), one of
    the dtypes the target is built for (`target.dtypes`).
    """
    multiple = bool(shapes) and isinstance(shapes[0], tuple)
    shapes = tuple(tuple(s) for s in shapes) if multiple else (tuple(shapes),)
    expected = (len(target.operands), len(target.results), set(target.attrs))
    if (len(operands), len(shapes), set(attrs)) != expected:
        raise TypeError(f"{target.name} takes operands {[a.name for a in target.operands]}, "
                        f"{len(target.results)} result(s) and attributes {list(target.attrs)}; "
                        f"got {len(operands)} operands, {len(shapes)} result shape(s) and "
                        f"attributes {sorted(attrs)}")
    floats = {jax.numpy.dtype(jax.typeof(op).dtype).name
              for op, a in zip(operands, target.operands) if a.dtype == _targets.FLOAT}
    if len(floats) != 1 or not floats <= set(_targets.SUPPORTED_DTYPES):
        raise TypeError(f"{target.name}: the floating operands must share one dtype of "
                        f"{_targets.SUPPORTED_DTYPES}, got {sorted(floats)}")
    dtype = floats.pop()
    if dtype not in target.dtypes:
        raise TypeError(f"{target.name} is built for {list(target.dtypes)}, not {dtype}")
    name = target.name_for(dtype)
    types = tuple(zip(shapes, target.result_dtypes(dtype)))
    avals = [jax.typeof(op) for op in operands]
    varying = frozenset().union(*(a.mat.varying for a in avals))
    dims = target.batch_dims
    if varying:
        # Inside shard_map: the results vary over every manual axis an operand
        # varies over. Operands are made varying alike (jax needs them to match).
        mesh = next(a.sharding.mesh for a in avals if a.mat.varying)
        operands = match_vma(*operands)
        kind = jax.sharding.ManualAxisType(varying=varying)
        results = tuple(jax.ShapeDtypeStruct(s, t, manual_axis_type=kind,
                                             sharding=NamedSharding(mesh, PartitionSpec()))
                        for s, t in types)
        out = _ffi_call(name, results, operands, attrs)
    elif not any(isinstance(op, jax.core.Tracer) for op in operands):
        # Eager calls run on concrete arrays: nothing to partition.
        out = _ffi_call(name, _results(types, avals, dims), operands, attrs)
    elif (split := _explicit_split(avals, dims)) is not None:
        out = _shard_mapped(target, shapes, attrs, avals, *split)(*operands)
    else:
        out = _partitioned(target, name, types, attrs, [a.ndim for a in avals])(*operands)
    return tuple(out) if multiple else out[0]


def _ffi_call(name: str, results, operands, attrs):
    return jax.ffi.ffi_call(name, tuple(results),
                            vmap_method=_VMAP_METHOD)(*operands, **attrs)


def _results(types, avals, dims) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The result types ((shape, dtype) each); with explicit mesh axes
    (`jax.sharding.AxisType.Explicit`) they carry the batch sharding of the
    operands, so the op needs no resharding."""
    plain = tuple(jax.ShapeDtypeStruct(s, t) for s, t in types)
    in_dims, out_dims = dims
    mesh = next((a.sharding.mesh for a in avals
                 if getattr(a, "sharding", None) is not None and not a.sharding.mesh.empty),
                None)
    if mesh is None:
        return plain
    axes = _batch_axes([a.sharding for a in avals], [a.ndim for a in avals], in_dims)
    return tuple(jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, _spec(len(s), d, axes)))
                 for (s, t), d in zip(types, out_dims))


def match_vma(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """`arrays`, each `lax.pcast` to vary over every manual mesh axis any of them varies over.

    Inside `shard_map`, a weight the caller passes replicated is invariant while
    the activations vary over the batch axis. Making the weight varying before
    the `custom_vjp` lets its gradient come back varying (a per-device partial
    sum); the transpose of the pcast then all-reduces it, once, just as JAX
    does for `x @ w` with a dense `w`. Outside `shard_map`: `arrays` unchanged.
    """
    avals = [jax.typeof(a) for a in arrays]
    varying = frozenset().union(*(a.mat.varying for a in avals))
    out = []
    for array, aval in zip(arrays, avals):
        missing = tuple(sorted(varying - aval.mat.varying, key=str))
        out.append(jax.lax.pcast(array, missing, to="varying") if missing else array)
    return tuple(out)


# -- partitioning under jit -------------------------------------------------------
def _local_shapes(shapes, out_dims, shards):
    """The result shapes of one shard: the batch dims divided by `shards`."""
    local = []
    for s, d in zip(shapes, out_dims):
        s = list(s)
        if _axis(len(s), d) is not None:
            s[_axis(len(s), d)] //= shards
        local.append(tuple(s))
    return local


def _local_types(types, out_dims, shards):
    """(shape, dtype) of one shard's results."""
    shapes = _local_shapes([s for s, _ in types], out_dims, shards)
    return [jax.ShapeDtypeStruct(s, t) for s, (_, t) in zip(shapes, types)]


def _explicit_split(avals, dims):
    """(mesh, axis names, shards) when the batch is split evenly over explicit mesh axes.

    Explicit axes are part of the operands' types, so the split is known while
    tracing; auto axes are not (they read as replicated) and are left to
    `_partitioned`. None when the batch is not split that way.
    """
    in_dims = dims[0]
    mesh = next((a.sharding.mesh for a in avals
                 if getattr(a, "sharding", None) is not None and not a.sharding.mesh.empty),
                None)
    if mesh is None:
        return None
    names = _axes_tuple(_batch_axes([a.sharding for a in avals], [a.ndim for a in avals],
                                    in_dims))
    shards = int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))
    batch = next(a.shape[_axis(a.ndim, d)] for a, d in zip(avals, in_dims)
                 if _axis(a.ndim, d) is not None)
    if shards <= 1 or batch % shards:
        return None
    return mesh, names, shards


def _shard_mapped(target, shapes, attrs, avals, mesh, names, shards):
    """The call under `shard_map` over the explicit batch axes `names`.

    With explicit axes the split is known while tracing, so a `shard_map` runs
    the kernel on each shard (through `call`'s shard_map branch) and all-reduces
    the results that sum over the batch. `custom_partitioning` is not used
    here: on jax 0.12 its `psum` fails to compile under an explicit-axes mesh
    ("Unsupported reduction computation").
    """
    in_dims, out_dims = target.batch_dims
    local = _local_shapes(shapes, out_dims, shards)

    def shard(*operands):
        out = call(target, tuple(local), *operands, **attrs)
        return tuple(jax.lax.psum(o, names) if d == SUM else o for o, d in zip(out, out_dims))

    in_specs = tuple(_spec(a.ndim, d, names) for a, d in zip(avals, in_dims))
    out_specs = tuple(_spec(len(s), d, names) for s, d in zip(shapes, out_dims))
    return jax.shard_map(shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=frozenset(names))


def _partitioned(target, name, types, attrs, ndims):
    """The call as a custom_partitioning op (split over the batch) with a vmap rule."""
    dims = target.batch_dims
    in_dims, out_dims = dims
    shapes = [s for s, _ in types]

    def whole(*operands):
        avals = [jax.typeof(op) for op in operands]
        return tuple(_ffi_call(name, _results(types, avals, dims), operands, attrs))

    op = custom_partitioning(whole)

    def shardings(mesh, arg_shapes):
        ndims = [len(a.shape) for a in arg_shapes]
        axes = _batch_axes([a.sharding for a in arg_shapes], ndims, in_dims)
        names = _axes_tuple(axes)
        shards = int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))
        batch = next(a.shape[_axis(n, d)] for a, n, d in zip(arg_shapes, ndims, in_dims)
                     if _axis(n, d) is not None)
        if shards <= 1 or batch % shards:  # uneven shards: run the op whole
            axes, names, shards = None, (), 1
        args = tuple(NamedSharding(mesh, _spec(n, d, axes)) for n, d in zip(ndims, in_dims))
        results = tuple(NamedSharding(mesh, _spec(len(s), d, axes))
                        for s, d in zip(shapes, out_dims))
        return names, shards, args, results

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[3]

    def partition(mesh, arg_shapes, result_shape):
        names, shards, args, results = shardings(mesh, arg_shapes)
        local = _local_types(types, out_dims, shards)

        def shard(*operands):  # one device's shard: the kernel on its part of the batch
            out = _ffi_call(name, local, operands, attrs)
            return tuple(jax.lax.psum(o, names) if d == SUM and names else o
                         for o, d in zip(out, out_dims))
        return mesh, shard, results, args

    # Shardy reads sharding_rule; infer_sharding_from_operands serves only GSPMD (jax 0.10
    # with jax_use_shardy_partitioner off; jax 0.12 has no GSPMD and ignores it).
    op.def_partition(partition=partition,
                     infer_sharding_from_operands=infer_sharding_from_operands,
                     sharding_rule=_sharding_rule(shapes, dims, ndims))

    # custom_partitioning has no vmap rule: a vmapped call (also vmap of a jitted
    # function) runs the plain FFI call, whose vmap rule is `_VMAP_METHOD`.
    @jax.custom_batching.custom_vmap
    def run(*operands):
        return op(*operands)

    @run.def_vmap
    def _vmap_rule(axis_size, in_batched, *operands):
        def plain(*ops):
            return tuple(_ffi_call(name, [jax.ShapeDtypeStruct(s, t) for s, t in types], ops,
                                   attrs))
        in_axes = [0 if b else None for b in in_batched]
        return jax.vmap(plain, in_axes=in_axes)(*operands), (True,) * len(shapes)
    return run


def _sharding_rule(shapes, dims, ndims) -> str:
    """Shardy's einsum-like rule: factor `b` is the batch, every other dim its own factor."""
    in_dims, out_dims = dims
    letters = iter("acdefghijklmnopqrstuvwxyz")

    def factors(ndim, dim):
        return " ".join("b" if i == _axis(ndim, dim) else next(letters) for i in range(ndim))
    return (", ".join(factors(n, d) for n, d in zip(ndims, in_dims)) + " -> "
            + ", ".join(factors(len(s), d) for s, d in zip(shapes, out_dims)))
