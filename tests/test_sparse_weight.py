"""SparseWeight and SparsityPattern: constructors, conversions, pytree behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from jax.experimental import sparse as jsparse

import sparseprop_jax as sp
from conftest import random_kernel


def test_from_dense_keeps_exact_zeros_and_round_trips(rng):
    kernel = random_kernel(rng, 23, 11, 0.7)
    weight = sp.SparseWeight.from_dense(kernel)
    assert weight.shape == (23, 11)
    assert weight.nnz == np.count_nonzero(kernel)
    np.testing.assert_array_equal(weight.to_dense(), kernel)
    np.testing.assert_array_equal(weight.pattern.mask(), kernel != 0)


def test_explicit_mask_selects_entries(rng):
    kernel = rng.standard_normal((6, 4)).astype(np.float32)
    mask = rng.random((6, 4)) < 0.5
    weight = sp.SparseWeight.from_dense(kernel, mask=mask)
    np.testing.assert_array_equal(weight.to_dense(), np.where(mask, kernel, 0))
    assert weight.nnz == mask.sum()


def test_transposed_order_is_consistent(rng):
    kernel = random_kernel(rng, 17, 9, 0.6)
    p = sp.SparseWeight.from_dense(kernel).pattern
    in_idx, out_idx = np.asarray(p.indices), np.asarray(p.output_index())
    t_in = np.repeat(np.arange(17), np.diff(np.asarray(p.t_indptr)))
    perm = np.asarray(p.t_perm)
    np.testing.assert_array_equal(in_idx[perm], t_in)
    np.testing.assert_array_equal(out_idx[perm], np.asarray(p.t_indices))
    assert sorted(perm.tolist()) == list(range(p.nnz))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.9, 0.999, 1.0])
def test_random_pattern_has_exact_sparsity(sparsity):
    p = sp.SparsityPattern.random((40, 25), sparsity, jax.random.key(1))
    assert p.nnz == 1000 - round(sparsity * 1000)
    w = sp.SparseWeight.random((40, 25), sparsity, jax.random.key(2))
    assert w.nnz == p.nnz and w.values.dtype == jnp.float32


def test_from_scipy_and_back(rng):
    kernel = random_kernel(rng, 12, 8, 0.5)
    for fmt in ("csr", "csc", "coo"):
        weight = sp.SparseWeight.from_scipy(scipy.sparse.csr_matrix(kernel).asformat(fmt))
        np.testing.assert_array_equal(weight.to_dense(), kernel)
    np.testing.assert_array_equal(weight.to_scipy().toarray(), kernel)


def test_from_scipy_keeps_explicit_zeros_and_sums_duplicates():
    coo = scipy.sparse.coo_array(
        (np.array([0.0, 1.0, 2.0], np.float32), (np.array([0, 1, 1]), np.array([0, 2, 2]))),
        shape=(3, 3))
    weight = sp.SparseWeight.from_scipy(coo)
    assert weight.nnz == 2  # the explicit zero stays in the pattern
    np.testing.assert_array_equal(weight.to_dense()[1, 2], 3.0)


def test_from_jax_sparse(rng):
    kernel = random_kernel(rng, 10, 7, 0.6)
    for matrix in (jsparse.BCOO.fromdense(kernel), jsparse.BCSR.fromdense(kernel),
                   jsparse.BCOO.fromdense(kernel, nse=60)):  # with padding entries
        weight = sp.SparseWeight.from_jax_sparse(matrix)
        np.testing.assert_array_equal(weight.to_dense(), kernel)
        assert weight.nnz == np.count_nonzero(kernel)


def test_is_a_pytree_usable_under_jit(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 8, 5, 0.5))
    leaves, treedef = jax.tree_util.tree_flatten(weight)
    assert len(leaves) == 6  # values + five pattern arrays
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.shape == weight.shape
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(sp.sparse_linear)(x, weight),
                               sp.sparse_linear(x, weight), rtol=1e-6)
    np.testing.assert_array_equal(jax.jit(lambda w: w.to_dense())(weight), weight.to_dense())


def test_repr_shows_shape_nnz_sparsity(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 10, 10, 0.9))
    assert repr(weight) == "SparseWeight(shape=(10, 10), nnz=10, sparsity=0.9000)"
    assert "nnz=10" in repr(weight.pattern)


def test_stored_arrays_round_trip_eagerly_and_under_jit():
    pattern = sp.SparsityPattern.random((3, 3, 2, 4), 0.6, jax.random.key(0))
    arrays = pattern.to_arrays()
    assert set(arrays) == set(sp.SparsityPattern.FIELDS) | {"shape"}
    assert arrays["shape"].dtype == jnp.int32 and arrays["shape"].tolist() == [3, 3, 2, 4]
    back = sp.SparsityPattern.from_arrays(arrays)
    assert back.shape == (3, 3, 2, 4)
    np.testing.assert_array_equal(back.mask(), pattern.mask())
    wide = dict(arrays, indices=np.asarray(arrays["indices"], np.int64))  # as a checkpoint may
    assert sp.SparsityPattern.from_arrays(wide).indices.dtype == jnp.int32
    # Under jit the shape's values are traced: the window gives the dims the
    # index pointers cannot; a 2-D kernel needs none.
    seen = {}

    def read(arrays, **kwargs):
        seen["shape"] = sp.SparsityPattern.from_arrays(arrays, **kwargs).shape
        return arrays["indices"]
    jax.jit(lambda a: read(a, window=(3, 3)))(arrays)
    assert seen["shape"] == (3, 3, 2, 4)
    jax.jit(read)(sp.SparsityPattern.random((5, 4), 0.5, jax.random.key(1)).to_arrays())
    assert seen["shape"] == (5, 4)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.pop("shape"), ValueError, "lacks its kernel shape 'shape'"),
    (lambda a: a.pop("t_perm"), ValueError, r"lacks \['t_perm'\]"),
    (lambda a: a.update(shape=np.array([2, 3, 2, 4], np.int32)), ValueError,
     r"matrix view \(in, out\) of \(18, 4\), which does not fit its kernel shape \(2, 3, 2, 4\)"),
    (lambda a: a.update(indices=np.zeros(3, np.float32)), TypeError, "must hold integers"),
])
def test_stored_arrays_are_validated(change, error, match):
    arrays = sp.SparsityPattern.random((3, 3, 2, 4), 0.6, jax.random.key(0)).to_arrays()
    change(arrays)
    with pytest.raises(error, match=match):
        sp.SparsityPattern.from_arrays(arrays)


def test_traced_stored_shape_needs_the_window():
    arrays = sp.SparsityPattern.random((3, 3, 2, 4), 0.6, jax.random.key(0)).to_arrays()
    with pytest.raises(TypeError, match="the stored kernel shape is traced"):
        jax.jit(lambda a: sp.SparsityPattern.from_arrays(a).indptr)(arrays)
    with pytest.raises(ValueError, match=r"window \(4, 4\) does not fit"):
        jax.jit(lambda a: sp.SparsityPattern.from_arrays(a, window=(4, 4)).indptr)(arrays)
