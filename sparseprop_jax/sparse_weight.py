"""The sparse weight type: trainable float32 values on a fixed nonzero pattern.

A `SparseWeight` stands for a dense kernel of Flax's orientation: a linear
kernel `(in_features, out_features)` or a convolution kernel HWIO
`(kh, kw, in, out)`. Patterns work on the kernel's matrix view, all leading
dims flattened (C order) into `in_features` rows, the last dim the
`out_features` columns. Nonzeros are stored grouped by output feature (the
compressed sparse columns of that matrix; the rows of the `out x in` weight the
forward pass multiplies with). `SparsityPattern` also
keeps the same nonzeros grouped by input feature, with a permutation into the
values, for the input gradient; both orders are computed once, when the
pattern is made, never per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparseprop_jax import _checks

Array = jax.Array


@jax.tree_util.register_pytree_node_class
class SparsityPattern:
    """The fixed nonzero pattern of a kernel whose matrix view is `(in_features, out_features)`.

    Attributes:
      indptr: int32 `[out_features + 1]`; the nonzeros of output feature `j`
        are entries `indptr[j]:indptr[j + 1]` of the values.
      indices: int32 `[nnz]`; the input feature of each entry, ascending
        within each output feature.
      t_indptr: int32 `[in_features + 1]`; the same nonzeros grouped by input
        feature.
      t_indices: int32 `[nnz]`; output feature of each entry in that grouping.
      t_perm: int32 `[nnz]`; position in the values of each entry of that
        grouping.
      shape: the dense kernel shape (static); its matrix view flattens all
        leading dims into `in_features`.

    Build patterns with the class methods, which validate their input; the
    constructor itself trusts its arguments (it also runs on traced arrays).
    """

    # The pattern's arrays, in pytree (and FFI operand) order.
    FIELDS = ("indptr", "indices", "t_indptr", "t_indices", "t_perm")
    #: Key of the kernel shape among the stored arrays (`to_arrays`).
    SHAPE_KEY = "shape"

    def __init__(self, indptr, indices, t_indptr, t_indices, t_perm, shape):
        self.indptr = indptr
        self.indices = indices
        self.t_indptr = t_indptr
        self.t_indices = t_indices
        self.t_perm = t_perm
        self.shape = tuple(int(d) for d in shape)

    # -- pytree -------------------------------------------------------------
    def tree_flatten(self):
        return tuple(getattr(self, f) for f in self.FIELDS), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        return cls(*children, shape=shape)

    # -- facts --------------------------------------------------------------
    @property
    def in_features(self) -> int:
        """Rows of the matrix view: the product of all but the last kernel dim."""
        return math.prod(self.shape[:-1])

    @property
    def out_features(self) -> int:
        return self.shape[-1]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    @property
    def nnz(self) -> int:
        return int(np.shape(self.indices)[-1])

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def output_index(self) -> Array:
        """Output feature of each entry, in value order (traceable)."""
        if not isinstance(self.indptr, jax.core.Tracer):
            # Eagerly in NumPy: no XLA compilation per pattern shape.
            counts = np.diff(np.asarray(self.indptr))
            return jnp.asarray(np.repeat(np.arange(self.out_features, dtype=np.int32), counts))
        counts = jnp.diff(jnp.asarray(self.indptr))
        return jnp.repeat(jnp.arange(self.out_features, dtype=jnp.int32), counts,
                          total_repeat_length=self.nnz)

    def mask(self) -> np.ndarray:
        """The pattern as a dense boolean NumPy array of the kernel's shape."""
        mask = np.zeros(self.matrix_shape, dtype=bool)
        mask[np.asarray(self.indices), np.asarray(self.output_index())] = True
        return mask.reshape(self.shape)

    def check(self, where: str) -> None:
        """Static checks of the arrays (works on tracers): int32, lengths fit the shape."""
        n_in, n_out = self.matrix_shape
        expected = {"indptr": (n_out + 1,), "indices": (self.nnz,), "t_indptr": (n_in + 1,),
                    "t_indices": (self.nnz,), "t_perm": (self.nnz,)}
        for name, shape in expected.items():
            array = getattr(self, name)
            # The array's own dtype: jnp.result_type would call an int64 NumPy
            # array int32 (without x64), and the call would then wrap its values.
            dtype = getattr(array, "dtype", None) or np.asarray(array).dtype
            if dtype != np.int32:
                raise TypeError(f"{where}: weight.pattern.{name} must be int32, got {dtype}")
            _checks.check_shape(where, f"weight.pattern.{name}", array, shape)

    # -- stored form --------------------------------------------------------
    def to_arrays(self) -> dict[str, Any]:
        """The pattern as plain int32 arrays: its one stored form (Linen variables, checkpoints).

        `from_arrays` is the inverse. The kernel shape is stored with the
        arrays, because their lengths give only the matrix view (a
        convolution's window is lost in it).

        Returns:
          The five arrays of `FIELDS` by name, and `SHAPE_KEY` ("shape"): the
          kernel shape as int32 `[ndim]`.
        """
        arrays = {f: getattr(self, f) for f in self.FIELDS}
        arrays[self.SHAPE_KEY] = jnp.asarray(np.asarray(self.shape, dtype=np.int32))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping, where: str = "SparsityPattern.from_arrays", *,
                    window: Optional[tuple[int, ...]] = None) -> "SparsityPattern":
        """The pattern of arrays made by `to_arrays`, validated (traceable).

        The kernel shape must be static (it is the pattern's pytree aux data
        and fixes array shapes downstream), so it is read from the stored
        "shape" array's values. Under `jax.jit` or `jax.eval_shape` those
        values are unknown: Linen hands every variable to `apply` as a tracer,
        and a tracer keeps only its shape and dtype (a collection holds
        arrays alone, and orbax cannot save the zero-size array that could
        carry the kernel shape as its own shape). A traced shape is therefore
        rebuilt from what tracing keeps: the number of dims (the stored
        array's length), the matrix view (the index pointers' lengths) and
        `window`, the dims before the last two, which only the caller knows
        (a convolution layer's `kernel_size`); a 2-D kernel needs none.

        Args:
          arrays: what `to_arrays` gave, e.g. one layer's entry of a Linen
            pattern collection or of a checkpoint.
          where: names the caller in error messages.
          window: the kernel's dims before its last two, for a traced shape
            of more than 2 dims. A concrete stored shape is taken as it is:
            compare the result's `shape` with the one you expect.

        Returns:
          The pattern. Concrete arrays of another integer dtype are converted
          to int32 where every value fits (e.g. from a hand-made checkpoint).

        Raises:
          ValueError: a key is missing (patterns stored without their kernel
            shape need it added), or the shape does not fit the index pointers.
          TypeError: an array does not hold integers, or is traced and not
            int32; or the shape is traced, has more than 2 dims and no
            `window` is given.
        """
        keys = cls.FIELDS + (cls.SHAPE_KEY,)
        if not isinstance(arrays, Mapping):
            raise TypeError(f"{where}: a stored sparsity pattern must be a mapping of the arrays "
                            f"{list(keys)}, got {type(arrays).__name__}")
        missing = [k for k in keys if k not in arrays]
        if missing == [cls.SHAPE_KEY]:
            raise ValueError(
                f"{where}: the stored sparsity pattern lacks its kernel shape {cls.SHAPE_KEY!r} "
                "(patterns stored by older versions, e.g. in Linen SparseDense/SparseConv "
                f"variables, lack it): add {cls.SHAPE_KEY!r}: np.array(kernel_shape, np.int32), "
                "with kernel_shape (in, out) or (kh, kw, in, out), or make the variables anew")
        if missing:
            raise ValueError(f"{where}: the stored sparsity pattern lacks {missing}; a pattern is "
                             f"stored as the arrays {list(keys)}")
        fields = {f: _stored_int32(where, f, arrays[f]) for f in keys}
        for name in (cls.SHAPE_KEY, "indptr", "t_indptr"):
            if np.ndim(fields[name]) != 1:
                raise ValueError(f"{where}: the stored pattern's {name} must be 1-D, got shape "
                                 f"{np.shape(fields[name])}")
        # The matrix view (in, out) is static: the index pointers' lengths.
        rows, cols = np.shape(fields["t_indptr"])[0] - 1, np.shape(fields["indptr"])[0] - 1
        stored = fields.pop(cls.SHAPE_KEY)
        if isinstance(stored, jax.core.Tracer):
            ndim = np.shape(stored)[0]
            if window is None and ndim != 2:
                raise TypeError(
                    f"{where}: the stored kernel shape is traced (under jit), so its values are "
                    f"unknown; pass window= its first {ndim - 2} dims (a convolution's "
                    "kernel_size), or read the pattern outside jit")
            window = () if window is None else tuple(window)
            size = math.prod(window)
            if len(window) != ndim - 2 or size < 1 or rows % size:
                raise ValueError(f"{where}: window {window} does not fit the stored pattern, of "
                                 f"{ndim} dims with a matrix view (in, out) of {(rows, cols)}")
            shape = window + (rows // size, cols)
        else:
            shape = tuple(int(d) for d in np.asarray(stored))
        shape = _kernel_shape(where, shape, "the stored pattern's shape")
        if (math.prod(shape[:-1]), shape[-1]) != (rows, cols):
            raise ValueError(f"{where}: the stored pattern's index pointers give a matrix view "
                             f"(in, out) of {(rows, cols)}, which does not fit its kernel shape "
                             f"{shape}")
        return cls(*(fields[f] for f in cls.FIELDS), shape=shape)

    def __repr__(self) -> str:
        return (f"SparsityPattern(shape={self.shape}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.4f})")

    # -- constructors -------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: Any) -> "SparsityPattern":
        """Pattern of the True entries of a boolean mask of the kernel's shape.

        The mask is `(in_features, out_features)` for a linear kernel, or has
        more leading dims (e.g. HWIO) that the pattern flattens.
        """
        where = "SparsityPattern.from_mask"
        mask = _checks.concrete(where, "mask", mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"{where}: mask must be boolean, got {mask.dtype}")
        shape = _kernel_shape(where, mask.shape, "mask.shape")
        # Row-major nonzeros of the transposed matrix view come sorted by
        # output, then input feature.
        out_idx, in_idx = np.nonzero(mask.reshape(-1, shape[-1]).T)
        return cls._from_sorted_coords(in_idx, out_idx, shape)

    @classmethod
    def from_csc(cls, indptr: Any, indices: Any, shape: tuple[int, int]) -> "SparsityPattern":
        """Pattern from the compressed sparse columns of the kernel.

        Args:
          indptr: `[out_features + 1]` non-decreasing, from 0 to nnz.
          indices: `[nnz]` input features; strictly increasing within a column.
          shape: the kernel shape, `(in_features, out_features)` or with more
            leading dims, which the input-feature index runs over flattened.
        """
        where = "SparsityPattern.from_csc"
        shape = _kernel_shape(where, shape, "shape")
        n_in, n_out = math.prod(shape[:-1]), shape[-1]
        indptr = _checks.concrete(where, "indptr", indptr)
        indices = _checks.concrete(where, "indices", indices)
        for name, arr in (("indptr", indptr), ("indices", indices)):
            if arr.ndim != 1:
                raise ValueError(f"{where}: {name} must be 1-D, got shape {arr.shape}")
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"{where}: {name} must hold integers, got {arr.dtype}")
        if indptr.shape != (n_out + 1,):
            raise ValueError(f"{where}: indptr must have shape ({n_out + 1},) "
                             f"(out_features + 1), got {indptr.shape}")
        indptr = indptr.astype(np.int64)
        indices = indices.astype(np.int64)
        if indptr[0] != 0 or indptr[-1] != indices.size:
            raise ValueError(f"{where}: indptr must start at 0 and end at len(indices)="
                             f"{indices.size}, got {indptr[0]} and {indptr[-1]}")
        steps = np.diff(indptr)
        if np.any(steps < 0):
            raise ValueError(f"{where}: indptr must be non-decreasing; it decreases after "
                             f"column {int(np.argmax(steps < 0))}")
        if indices.size and (indices.min() < 0 or indices.max() >= n_in):
            bad = int(np.argmax((indices < 0) | (indices >= n_in)))
            raise ValueError(f"{where}: indices must lie in [0, {n_in}) (in_features); "
                             f"indices[{bad}] = {indices[bad]}")
        out_idx = np.repeat(np.arange(n_out), steps)
        # Within a column the next index must be strictly larger.
        same_col = out_idx[1:] == out_idx[:-1]
        not_increasing = same_col & (indices[1:] <= indices[:-1])
        if np.any(not_increasing):
            p = int(np.argmax(not_increasing)) + 1
            kind = "duplicate" if indices[p] == indices[p - 1] else "unsorted"
            raise ValueError(f"{where}: {kind} indices in column {out_idx[p]}: indices must be "
                             f"strictly increasing within a column (entry {p})")
        return cls._from_sorted_coords(indices, out_idx, shape)

    @classmethod
    def random(cls, shape: tuple[int, ...], sparsity: float, key: Array) -> "SparsityPattern":
        """A uniformly random pattern with exactly `round(sparsity * size)` zeros."""
        where = "SparsityPattern.random"
        shape = _kernel_shape(where, shape, "shape")
        sparsity = _checks.check_sparsity(where, sparsity)
        size = math.prod(shape)
        nnz = size - int(round(sparsity * size))
        # The nnz smallest of `size` uniform draws: a uniform subset of exactly nnz
        # entries. (jax.random.choice without replacement permutes all `size`
        # entries, which takes close to a minute for a 4096 x 4096 kernel.)
        draws = np.asarray(jax.random.uniform(key, (size,)))
        mask = np.zeros(size, dtype=bool)
        if nnz:
            mask[np.argpartition(draws, nnz - 1)[:nnz]] = True
        return cls.from_mask(mask.reshape(shape))

    @classmethod
    def _from_sorted_coords(cls, in_idx, out_idx, shape) -> "SparsityPattern":
        """Builds both orders from coordinates sorted by (output, input) feature."""
        n_in, n_out = math.prod(shape[:-1]), shape[-1]
        indptr = np.zeros(n_out + 1, dtype=np.int64)
        np.cumsum(np.bincount(out_idx, minlength=n_out), out=indptr[1:])
        t_perm = np.lexsort((out_idx, in_idx))  # by input feature, then output feature
        t_indptr = np.zeros(n_in + 1, dtype=np.int64)
        np.cumsum(np.bincount(in_idx, minlength=n_in), out=t_indptr[1:])
        if indptr[-1] > np.iinfo(np.int32).max:
            raise ValueError("sparse pattern has more than 2**31 - 1 nonzeros")
        i32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.int32))  # noqa: E731
        return cls(i32(indptr), i32(in_idx), i32(t_indptr), i32(np.asarray(out_idx)[t_perm]),
                   i32(t_perm), shape)


@jax.tree_util.register_pytree_node_class
class SparseWeight:
    """Float32 values on a fixed `SparsityPattern`: a sparse `(in, out)` kernel.

    A JAX pytree whose leaves are the values (the only trainable leaf) and the
    pattern's int32 arrays. To differentiate or optimise, take `.values`.
    """

    def __init__(self, values: Any, pattern: SparsityPattern):
        self.values = values
        self.pattern = pattern

    def tree_flatten(self):
        return (self.values, self.pattern), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pattern.shape

    @property
    def nnz(self) -> int:
        return self.pattern.nnz

    @property
    def sparsity(self) -> float:
        return self.pattern.sparsity

    @property
    def dtype(self):
        return jnp.result_type(self.values)

    def __repr__(self) -> str:
        return f"SparseWeight(shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.4f})"

    def check(self, where: str) -> None:
        """Static checks (works on tracers): float32 values matching the pattern's arrays."""
        _check_values(where, self.values, self.pattern, name="weight.values")
        self.pattern.check(where)

    def with_values(self, values: Any) -> "SparseWeight":
        """The same pattern with new values (checked for shape and dtype)."""
        _check_values("SparseWeight.with_values", values, self.pattern)
        return SparseWeight(values, self.pattern)

    def to_dense(self) -> Array:
        """The dense kernel, of the pattern's shape (traceable)."""
        p = self.pattern
        dense = jnp.zeros(p.matrix_shape, dtype=self.dtype)
        return dense.at[jnp.asarray(p.indices), p.output_index()].set(self.values).reshape(p.shape)

    def to_scipy(self):
        """The kernel's matrix view as a `scipy.sparse.csc_array` `(in, out)`."""
        import scipy.sparse

        p = self.pattern
        return scipy.sparse.csc_array(
            (np.asarray(self.values), np.asarray(p.indices), np.asarray(p.indptr)),
            shape=p.matrix_shape)

    # -- constructors -------------------------------------------------------
    @classmethod
    def from_dense(cls, kernel: Any, mask: Optional[Any] = None) -> "SparseWeight":
        """From a dense kernel: `(in_features, out_features)`, or HWIO for a convolution.

        Args:
          kernel: the dense kernel, float32, at least 2-D.
          mask: optional boolean array of the kernel's shape choosing the
            nonzeros; without it, the kernel's exact zeros define the pattern.
            Kernel entries outside the mask are dropped.
        """
        where = "SparseWeight.from_dense"
        kernel = _checks.concrete(where, "kernel", kernel)
        _kernel_shape(where, kernel.shape, "kernel.shape")
        _checks.check_dtype(where, "kernel", kernel)
        if mask is None:
            mask = kernel != 0
        else:
            mask = _checks.concrete(where, "mask", mask)
            _checks.check_shape(where, "mask", mask, kernel.shape)
        return cls.gather(kernel, SparsityPattern.from_mask(mask))

    @classmethod
    def gather(cls, kernel: Any, pattern: SparsityPattern) -> "SparseWeight":
        """The entries of a dense kernel of the pattern's shape that lie on it (traceable)."""
        _checks.check_shape("SparseWeight.gather", "kernel", kernel, pattern.shape)
        arrays = (kernel, pattern.indices, pattern.indptr)
        if not any(isinstance(a, jax.core.Tracer) for a in arrays):
            # Eagerly in NumPy: no XLA compilation per pattern shape.
            matrix = np.asarray(kernel).reshape(pattern.matrix_shape)
            rows = np.asarray(pattern.indices)
            cols = np.asarray(pattern.output_index())
            return cls(jnp.asarray(matrix[rows, cols]), pattern)
        matrix = jnp.asarray(kernel).reshape(pattern.matrix_shape)
        values = matrix[jnp.asarray(pattern.indices), pattern.output_index()]
        return cls(values, pattern)

    @classmethod
    def from_csc(cls, values: Any, indptr: Any, indices: Any,
                 shape: tuple[int, int]) -> "SparseWeight":
        """From the compressed sparse columns of the `(in, out)` kernel.

        See `SparsityPattern.from_csc`; `values[p]` belongs to entry `p`.
        """
        pattern = SparsityPattern.from_csc(indptr, indices, shape)
        values = jnp.asarray(_checks.concrete("SparseWeight.from_csc", "values", values))
        _check_values("SparseWeight.from_csc", values, pattern)
        return cls(values, pattern)

    @classmethod
    def from_scipy(cls, matrix: Any) -> "SparseWeight":
        """From a `scipy.sparse` matrix or array of shape `(in, out)`.

        Stored entries define the pattern (explicit zeros included); duplicate
        entries are summed, as scipy does.
        """
        import scipy.sparse

        where = "SparseWeight.from_scipy"
        if not scipy.sparse.issparse(matrix):
            raise TypeError(f"{where}: matrix must be a scipy.sparse matrix, got {type(matrix)}")
        csc = scipy.sparse.csc_array(matrix, copy=True)
        csc.sum_duplicates()  # also sorts indices
        return cls.from_csc(csc.data.astype(_checks.DEFAULT_DTYPE), csc.indptr, csc.indices,
                            csc.shape)

    @classmethod
    def from_jax_sparse(cls, matrix: Any) -> "SparseWeight":
        """From a `jax.experimental.sparse` BCOO or BCSR matrix of shape `(in, out)`.

        Stored entries define the pattern; out-of-range padding entries are
        dropped and duplicates summed.
        """
        import scipy.sparse
        from jax.experimental import sparse as jsparse

        where = "SparseWeight.from_jax_sparse"
        if not isinstance(matrix, (jsparse.BCOO, jsparse.BCSR)):
            raise TypeError(f"{where}: matrix must be a BCOO or BCSR matrix, got {type(matrix)}")
        if matrix.n_batch or matrix.n_dense or len(matrix.shape) != 2:
            raise ValueError(f"{where}: only 2-D matrices without batch or dense dims are "
                             f"supported, got n_batch={matrix.n_batch}, n_dense={matrix.n_dense}")
        if isinstance(matrix, jsparse.BCSR):
            matrix = matrix.to_bcoo()
        data = _checks.concrete(where, "data", matrix.data)
        rows, cols = _checks.concrete(where, "indices", matrix.indices).T
        keep = (rows < matrix.shape[0]) & (cols < matrix.shape[1])
        coo = scipy.sparse.coo_array((data[keep], (rows[keep], cols[keep])), shape=matrix.shape)
        return cls.from_scipy(coo)

    @classmethod
    def random(cls, shape: tuple[int, ...], sparsity: float, key: Array,
               init=jax.nn.initializers.lecun_normal()) -> "SparseWeight":
        """Values from `init` on a uniformly random pattern of the given sparsity."""
        mask_key, init_key = jax.random.split(key)
        pattern = SparsityPattern.random(shape, sparsity, mask_key)
        return cls.gather(init(init_key, pattern.shape, _checks.DEFAULT_DTYPE), pattern)


def _check_values(where: str, values: Any, pattern: SparsityPattern, name: str = "values") -> None:
    _checks.check_dtype(where, name, values)
    if np.shape(values) != (pattern.nnz,):
        raise ValueError(f"{where}: {name} must have shape ({pattern.nnz},) to match the "
                         f"pattern's nnz, got {np.shape(values)}")


def _stored_int32(where: str, name: str, array: Any) -> Any:
    """A stored pattern array as int32: as it is if it is, converted if concrete and fitting."""
    dtype = getattr(array, "dtype", None)
    if isinstance(array, jax.core.Tracer):
        if dtype != np.int32:
            raise TypeError(f"{where}: the stored pattern's {name} must be int32, got {dtype}")
        return array
    if dtype == np.int32:
        return array
    return jnp.asarray(_checks.int32_indices(where, f"the stored pattern's {name}", array))


#: Patterns index input and output features with int32.
MAX_FEATURES = 2**31 - 1


def _kernel_shape(where: str, shape: Any, name: str) -> tuple[int, ...]:
    """Checks a kernel shape: at least 2-D, every dim a positive int, and in_features
    (the product of the leading dims) and out_features within int32 indices' reach."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"{where}: {name} must have at least 2 dims (..., in_features, "
                         f"out_features), got {shape!r}")
    shape = tuple(_checks.check_features(where, f"{name}[{i}]", d) for i, d in enumerate(shape))
    for what, size in (("in_features (the product of all but the last dim)",
                        math.prod(shape[:-1])), ("out_features (the last dim)", shape[-1])):
        if size > MAX_FEATURES:
            raise ValueError(f"{where}: {name}={shape!r} has {what} = {size}, more than the "
                             f"{MAX_FEATURES} that int32 pattern indices can address")
    return shape
