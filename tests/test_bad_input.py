"""Every misuse gives a clear error naming the argument, before or inside C++."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparseprop_jax as sp
from conftest import random_kernel, tasks_per_call
from sparseprop_jax import _ffi, _targets


@pytest.fixture
def weight(rng):
    return sp.SparseWeight.from_dense(random_kernel(rng, 8, 5, 0.5))


def test_input_feature_mismatch(weight):
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        sp.sparse_linear(jnp.ones((3, 7)), weight)
    with pytest.raises(ValueError, match=r"x must have shape"):
        sp.sparse_linear(jnp.float32(1.0), weight)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.int32])
def test_unsupported_input_dtype(weight, dtype):
    with pytest.raises(TypeError, match=r"x must be float32 or bfloat16 \(supported dtypes: "
                                        r"float32, bfloat16\)"):
        sp.sparse_linear(np.ones((3, 8), dtype), weight)


def test_unsupported_values_and_bias(weight):
    with pytest.raises(TypeError, match="values must be float32 or bfloat16"):
        sp.sparse_linear(jnp.ones((3, 8)), sp.SparseWeight(weight.values.astype(jnp.float16),
                                                           weight.pattern))
    with pytest.raises(ValueError, match=r"weight.values must have shape \(20,\)"):
        sp.sparse_linear(jnp.ones((3, 8)), sp.SparseWeight(weight.values[:-1], weight.pattern))
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        sp.sparse_linear(jnp.ones((3, 8)), weight, jnp.ones(4))
    with pytest.raises(TypeError, match="bias must be float32 or bfloat16"):
        sp.sparse_linear(jnp.ones((3, 8)), weight, jnp.ones(5, jnp.float16))
    with pytest.raises(TypeError, match="weight must be a SparseWeight"):
        sp.sparse_linear(jnp.ones((3, 8)), jnp.ones((8, 5)))
    with pytest.raises(ValueError, match="values must have shape"):
        weight.with_values(jnp.ones(3))


def test_kernel_must_be_float32_with_matching_mask(rng):
    with pytest.raises(ValueError, match="kernel.shape must have at least 2 dims"):
        sp.SparseWeight.from_dense(np.ones(4, np.float32))
    conv_weight = sp.SparseWeight.from_dense(random_kernel(rng, 9, 4, 0.5).reshape(3, 3, 1, 4))
    with pytest.raises(ValueError, match=r"weight must be a 2-D \(in_features, out_features\)"):
        sp.sparse_linear(jnp.ones((2, 9)), conv_weight)
    with pytest.raises(TypeError, match="kernel must be float32"):
        sp.SparseWeight.from_dense(np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        sp.SparseWeight.from_dense(np.ones((2, 3), np.float32), mask=np.ones((3, 2), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        sp.SparsityPattern.from_mask(np.ones((2, 3)))


def test_bad_csc_patterns():
    ok = dict(indptr=[0, 2, 3], indices=[0, 2, 1], shape=(3, 2))
    sp.SparsityPattern.from_csc(**ok)
    cases = [
        (dict(ok, indices=[0, 3, 1]), r"indices must lie in \[0, 3\)"),
        (dict(ok, indices=[0, -1, 1]), r"indices must lie in \[0, 3\)"),
        (dict(ok, indices=[2, 0, 1]), "unsorted indices in column 0"),
        (dict(ok, indices=[1, 1, 1]), "duplicate indices in column 0"),
        (dict(ok, indptr=[0, 3, 2, 3], shape=(3, 3)), "indptr must be non-decreasing"),
        (dict(ok, indptr=[1, 2, 3]), "indptr must start at 0 and end at len"),
        (dict(ok, indptr=[0, 2]), r"indptr must have shape \(3,\)"),
        (dict(ok, indices=[[0, 2, 1]]), "indices must be 1-D"),
        (dict(ok, shape=(0, 2)), r"shape\[0\] must be a positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sp.SparsityPattern.from_csc(**kwargs)
    with pytest.raises(ValueError, match=r"values must have shape \(3,\)"):
        sp.SparseWeight.from_csc(np.ones(2, np.float32), **ok)


def test_bad_sparsity():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
            sp.SparsityPattern.random((3, 3), bad, jax.random.key(0))


def test_patterns_are_not_built_under_tracing():
    with pytest.raises(TypeError, match="must be a concrete array"):
        jax.jit(lambda k: sp.SparseWeight.from_dense(k))(jnp.ones((3, 3)))


def _tampered(weight, **arrays):
    """A pattern whose arrays bypass the Python constructors' validation."""
    p = weight.pattern
    fields = dict(indptr=p.indptr, indices=p.indices, t_indptr=p.t_indptr,
                  t_indices=p.t_indices, t_perm=p.t_perm)
    fields.update({k: jnp.asarray(v, jnp.int32) for k, v in arrays.items()})
    return sp.SparseWeight(weight.values, sp.SparsityPattern(**fields, shape=p.shape))


@pytest.mark.parametrize("case, message", [
    ("index_out_of_range", "index 1000 at entry 0 is outside"),
    ("negative_index", "index -1 at entry 0 is outside"),
    ("indptr_decreasing", "row pointers decrease"),
    ("indptr_wrong_end", "row pointers must run from 0 to nnz"),
    ("perm_out_of_range", "transposed permutation entry 0"),
    ("t_index_out_of_range", "transposed pattern index"),
])
def test_cpp_handlers_reject_corrupt_patterns(weight, case, message):
    p = weight.pattern
    indices, indptr = np.asarray(p.indices).copy(), np.asarray(p.indptr).copy()
    perm, t_indices = np.asarray(p.t_perm).copy(), np.asarray(p.t_indices).copy()
    if case == "index_out_of_range":
        indices[0] = 1000
    elif case == "negative_index":
        indices[0] = -1
    elif case == "indptr_decreasing":
        indptr[1], indptr[2] = indptr[2], indptr[1] - 1
    elif case == "indptr_wrong_end":
        indptr[-1] -= 1
    elif case == "perm_out_of_range":
        perm[0] = 99999
    elif case == "t_index_out_of_range":
        t_indices[0] = 77
    bad = _tampered(weight, indices=indices, indptr=indptr, t_perm=perm, t_indices=t_indices)
    x = jnp.ones((4, 8))

    def loss(x, values):
        return jnp.sum(sp.sparse_linear(x, bad.with_values(values)))

    # Forward corruption fails in the forward pass, the rest in the backward.
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bad.values))
    # The interpreter survives and a good call still works.
    assert sp.sparse_linear(x, weight).shape == (4, 5)


def test_cpp_handlers_check_the_saved_xt_layout(weight):
    # x^T, which the forward saves for the backward, is [in, batch]: the
    # handlers reject it, as a result or an operand, in any other shape.
    p = weight.pattern
    x = jnp.ones((4, 8))
    with pytest.raises(Exception, match="x\\^T output features"):
        jax.block_until_ready(_ffi.call(_targets.LINEAR_FORWARD_AND_XT, ((4, 5), (4, 8)), x,
                                        weight.values, p.indptr, p.indices))
    dy = jnp.ones((4, 5))
    with pytest.raises(Exception, match="x\\^T batch size"):
        jax.block_until_ready(_ffi.call(
            _targets.LINEAR_BACKWARD, ((4, 8), (weight.values.shape[0],)), dy, x, weight.values,
            p.indptr, p.indices, p.t_indptr, p.t_indices, p.t_perm))
    # Over three batch tiles, split by tiles (1 task) and by rows (3 tasks).
    x = np.random.default_rng(0).standard_normal((150, 8)).astype(np.float32)
    for tasks in (1, 3):
        with tasks_per_call(tasks):
            y, xt = jax.block_until_ready(_ffi.call(
                _targets.LINEAR_FORWARD_AND_XT, ((150, 5), (8, 150)), x, weight.values, p.indptr,
                p.indices))
        np.testing.assert_array_equal(xt, x.T)
        np.testing.assert_array_equal(y, sp.sparse_linear(x, weight))


def test_cpp_feature_major_handlers_check_shapes(weight):
    # x, y and their gradients are [groups, features, n]: the handlers reject
    # groups or columns that disagree, and features that disagree with the pattern.
    p = weight.pattern
    nnz = weight.values.shape[0]
    x = jnp.ones((2, 8, 3))
    with pytest.raises(Exception, match="x columns"):
        jax.block_until_ready(_ffi.call(_targets.LINEAR_FEATURE_MAJOR_FORWARD, (2, 5, 4), x,
                                        weight.values, p.indptr, p.indices))
    with pytest.raises(Exception, match="x groups"):
        jax.block_until_ready(_ffi.call(_targets.LINEAR_FEATURE_MAJOR_FORWARD, (1, 5, 3), x,
                                        weight.values, p.indptr, p.indices))
    with pytest.raises(Exception, match="pattern"):
        jax.block_until_ready(_ffi.call(_targets.LINEAR_FEATURE_MAJOR_FORWARD, (2, 6, 3), x,
                                        weight.values, p.indptr, p.indices))
    dy = jnp.ones((2, 5, 3))
    with pytest.raises(Exception, match="x features"):
        jax.block_until_ready(_ffi.call(
            _targets.LINEAR_FEATURE_MAJOR_BACKWARD, ((2, 8, 3), (nnz,)), dy, jnp.ones((2, 7, 3)),
            weight.values, p.indptr, p.indices, p.t_indptr, p.t_indices, p.t_perm))
    with pytest.raises(Exception, match="dx columns"):
        jax.block_until_ready(_ffi.call(
            _targets.LINEAR_FEATURE_MAJOR_INPUT_GRAD, (2, 8, 4), dy, weight.values, p.indptr,
            p.indices, p.t_indptr, p.t_indices, p.t_perm))
    with pytest.raises(Exception, match="dvalues output length"):
        jax.block_until_ready(_ffi.call(
            _targets.LINEAR_FEATURE_MAJOR_WEIGHT_GRAD, (nnz + 1,), dy, x, p.indptr, p.indices))


# -- every corruption of a pattern leaf --------------------------------------------
def _corruptions(pattern):
    """(leaf name, SparseWeight pattern) for every in-range change of one entry of one leaf."""
    bounds = {"indptr": pattern.nnz + 1, "indices": pattern.in_features,
              "t_indptr": pattern.nnz + 1, "t_indices": pattern.out_features,
              "t_perm": pattern.nnz}
    for name in pattern.FIELDS:
        leaf = np.asarray(getattr(pattern, name))
        for i in range(leaf.size):
            for value in range(bounds[name]):
                if value == leaf[i]:
                    continue
                bad = leaf.copy()
                bad[i] = value
                fields = {f: getattr(pattern, f) for f in pattern.FIELDS}
                fields[name] = jnp.asarray(bad)
                yield name, sp.SparsityPattern(**fields, shape=pattern.shape)


def _linear_reference(x, kernel):
    return x @ kernel


def _linear_feature_major_reference(x, kernel):
    return jnp.einsum("gin,io->gon", x, kernel, precision=jax.lax.Precision.HIGHEST)


def _conv_reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


LAYERS = {
    # (op, dense reference, kernel shape, x shape); the linear layer at two
    # batch sizes: one tile of the batch (values gathered per block), and
    # several (gathered in a phase of their own).
    "linear": (sp.sparse_linear, _linear_reference, (5, 4), (3, 5)),
    "linear-tiles": (sp.sparse_linear, _linear_reference, (5, 4), (70, 5)),
    # Along the middle axis: two groups of a tile and a bit.
    "linear-feature-major": (functools.partial(sp.sparse_linear, feature_axis=1),
                             _linear_feature_major_reference, (5, 4), (2, 5, 70)),
    "conv-batch": (functools.partial(sp.sparse_conv2d, variant="batch"), _conv_reference,
                   (2, 2, 2, 3), (2, 4, 4, 2)),
    "conv-width": (functools.partial(sp.sparse_conv2d, variant="width"), _conv_reference,
                   (2, 2, 2, 3), (2, 4, 4, 2)),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_every_corrupted_pattern_leaf_fails_or_matches_to_dense(layer, simd_path, rng):
    # The pattern's arrays are pytree leaves that any tree map can change. For
    # every in-range change of one entry of one leaf, each call (the forward
    # alone, the gradient with respect to x, the values, or both) either
    # raises or gives exactly what the corrupted weight's to_dense() gives.
    op, reference, kernel_shape, x_shape = LAYERS[layer]
    kernel = random_kernel(rng, int(np.prod(kernel_shape[:-1])), kernel_shape[-1], 0.5)
    weight = sp.SparseWeight.from_dense(kernel.reshape(kernel_shape))
    x = rng.standard_normal(x_shape).astype(np.float32)

    def loss(x, values, pattern, dense):
        w = sp.SparseWeight(values, pattern)
        y = reference(x, w.to_dense()) if dense else op(x, w)
        return jnp.sum(jnp.sin(y))

    wrts = {"forward": None, "x": 0, "values": 1, "both": (0, 1)}
    calls = {wrt: jax.jit(jax.value_and_grad(loss, argnums=a) if a is not None else loss,
                          static_argnums=3) for wrt, a in wrts.items()}
    counts = {"error": 0, "match": 0}
    for name, pattern in _corruptions(weight.pattern):
        for wrt, call in calls.items():
            try:
                got = jax.block_until_ready(call(x, weight.values, pattern, False))
            except Exception as err:  # noqa: BLE001 - any clear error is what we want
                assert "sparseprop_jax" in str(err), (name, wrt, err)
                counts["error"] += 1
                continue
            want = call(x, weight.values, pattern, True)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{name} {wrt}")
            counts["match"] += 1
    assert counts["error"] > 0 and sum(counts.values()) > 100, counts


# -- messages that name the culprit ---------------------------------------------------
def test_non_arrays_are_named(weight):
    conv_weight = sp.SparseWeight.from_dense(random_kernel(np.random.default_rng(1), 18, 3, 0.5)
                                             .reshape(3, 3, 2, 3))
    for bad in (None, "abc", object()):
        with pytest.raises(TypeError, match="sparse_linear: x must be an array"):
            sp.sparse_linear(bad, weight)
        with pytest.raises(TypeError, match="sparse_conv2d: x must be an array"):
            sp.sparse_conv2d(bad, conv_weight)
    with pytest.raises(TypeError, match="sparse_linear: bias must be an array"):
        sp.sparse_linear(jnp.ones((3, 8)), weight, "abc")
    with pytest.raises(TypeError, match="sparse_conv2d: bias must be an array"):
        sp.sparse_conv2d(jnp.ones((1, 4, 4, 2)), conv_weight, object())


@pytest.mark.parametrize("n", [-1, 2**31, 2**40, 1.5, True, "2"])
def test_tasks_per_call_out_of_range(n):
    with pytest.raises(ValueError, match=r"set_tasks_per_call: n must be an int in \[0, "):
        sp.set_tasks_per_call(n)
    assert sp.tasks_per_call() == 0


def test_tasks_per_call_takes_numpy_ints():
    with tasks_per_call(np.int64(3)):
        assert sp.tasks_per_call() == 3


@pytest.mark.parametrize("value", ["bogus", "AVX2 ", "avx1024"])
def test_unknown_simd_path_in_the_environment_warns_and_falls_back(value, tmp_path):
    script = ("import warnings; warnings.simplefilter('error')\n"
              "try:\n    import sparseprop_jax\nexcept RuntimeWarning as w:\n    print(w)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "SPARSEPROP_JAX_SIMD": value},
                         cwd=tmp_path, timeout=120, check=True).stdout
    assert f"SPARSEPROP_JAX_SIMD={value!r} is not one of ['auto'" in out
    fallback = subprocess.run(
        [sys.executable, "-c", "import sparseprop_jax as sp; print(sp.simd_path())"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True,
        env={**os.environ, "SPARSEPROP_JAX_SIMD": value}).stdout.strip()
    assert fallback == sp.supported_simd_paths()[0]


@pytest.mark.parametrize("shape, what", [
    ((2**32, 2**32, 1), "in_features"),          # the product wraps in int64
    ((2**16, 2**15, 3), "in_features"),          # 2**31 input features
    ((3, 2**31), "out_features"),
])
def test_shapes_past_int32_indices_are_refused(shape, what):
    with pytest.raises(ValueError, match=f"has {what} .* more than the 2147483647"):
        sp.SparsityPattern.from_csc([0, 0], [], shape)
    with pytest.raises(ValueError, match=f"has {what}"):
        sp.SparsityPattern.random(shape, 1.0, jax.random.key(0))


def test_wide_pattern_indices_are_refused_not_wrapped(weight):
    from sparseprop_jax import _checks

    p = weight.pattern
    wide = np.asarray(p.indices, np.int64)
    with_wide = sp.SparseWeight(weight.values, sp.SparsityPattern(
        p.indptr, wide, p.t_indptr, p.t_indices, p.t_perm, p.shape))
    with pytest.raises(TypeError, match="weight.pattern.indices must be int32, got int64"):
        sp.sparse_linear(jnp.ones((2, 8)), with_wide)
    np.testing.assert_array_equal(_checks.int32_indices("w", "a", wide), p.indices)
    wide[0] = 2**32 + 1  # index 1 after wrapping to int32
    with pytest.raises(ValueError, match="a holds 4294967297, which does not fit the int32"):
        _checks.int32_indices("w", "a", wide)
