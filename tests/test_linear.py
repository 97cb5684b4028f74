"""sparse_linear against the dense reference: values and all three gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sparseprop_jax as sp
from conftest import (assert_close, check_linear_against_dense, dense_reference, random_kernel,
                      tasks_per_call)

SHAPES = [(1, 1), (1, 7), (7, 1), (7, 33), (33, 7), (33, 33), (4096, 7), (7, 4096)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
BATCHES = [1, 3, 17, 100]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_dense_over_shapes_sparsities_batches(shape, sparsity, rng):
    kernel = random_kernel(rng, *shape, sparsity)
    for batch in BATCHES:
        x = rng.standard_normal((batch, shape[0])).astype(np.float32)
        check_linear_against_dense(kernel, x, rng)


def test_large_activations(rng):
    # x, y, dx and the transposed operands of at least 4 MiB
    # (kStreamMinBytes in ffi_common.h): written with streaming stores on
    # the SIMD paths, except in the last, 12-wide batch tile.
    kernel = random_kernel(rng, 1024, 1024, 0.99)
    check_linear_against_dense(kernel, rng.standard_normal((1100, 1024)).astype(np.float32), rng)


def test_large_square_layer(rng):
    kernel = random_kernel(rng, 4096, 4096, 0.99)
    check_linear_against_dense(kernel, rng.standard_normal((17, 4096)).astype(np.float32), rng)


def test_empty_rows_and_columns(rng):
    kernel = random_kernel(rng, 40, 30, 0.5)
    kernel[[0, 13, 39], :] = 0  # input features nothing reads
    kernel[:, [0, 11, 29]] = 0  # output features that stay at the bias
    x = rng.standard_normal((37, 40)).astype(np.float32)
    check_linear_against_dense(kernel, x, rng)


def test_leading_dims_and_vector_input(rng):
    kernel = random_kernel(rng, 9, 5, 0.6)
    check_linear_against_dense(kernel, rng.standard_normal((2, 3, 4, 9)).astype(np.float32), rng)
    check_linear_against_dense(kernel, rng.standard_normal((9,)).astype(np.float32), rng)


def test_empty_batch(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 9, 5, 0.6))
    x = np.zeros((0, 9), np.float32)
    assert sp.sparse_linear(x, weight).shape == (0, 5)
    dvalues = jax.grad(lambda v: sp.sparse_linear(x, weight.with_values(v)).sum())(weight.values)
    np.testing.assert_array_equal(dvalues, np.zeros(weight.nnz))


def test_check_grads_numerically(simd_path, rng):
    kernel = random_kernel(rng, 13, 6, 0.5)
    weight = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((5, 13)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)

    def f(x, values, bias):
        return jnp.tanh(sp.sparse_linear(x, weight.with_values(values), bias))

    check_grads(f, (x, weight.values, bias), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_value_and_grad_and_remat_agree(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 20, 12, 0.8))
    x = rng.standard_normal((7, 20)).astype(np.float32)

    def loss(x, values):
        return jnp.sum(jnp.sin(sp.sparse_linear(x, weight.with_values(values))))

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, weight.values)
    remat_value, remat_grads = jax.jit(jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1)))(
        x, weight.values)
    np.testing.assert_allclose(value, remat_value, rtol=1e-6)
    for g, r in zip(grads, remat_grads):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)


def test_vmap_over_input(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 20, 12, 0.8))
    xs = rng.standard_normal((4, 3, 7, 20)).astype(np.float32)
    f = lambda x: sp.sparse_linear(x, weight)  # noqa: E731
    expected = np.stack([np.asarray(f(x)) for x in xs])
    np.testing.assert_allclose(jax.vmap(f)(xs), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.vmap(f))(xs), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(f, in_axes=1, out_axes=1))(xs), expected,
                               rtol=1e-6, atol=1e-6)

    # Gradients through vmap: per-example weight gradients summed by vmap's transpose.
    def loss(values, xs):
        w = weight.with_values(values)
        return jnp.sum(jax.vmap(lambda x: sp.sparse_linear(x, w))(xs) ** 2)

    direct = jax.grad(lambda v: jnp.sum(sp.sparse_linear(xs, weight.with_values(v)) ** 2))
    np.testing.assert_allclose(jax.grad(loss)(weight.values, xs), direct(weight.values),
                               rtol=1e-5, atol=1e-4)


def test_vmap_over_values(rng):
    kernel = random_kernel(rng, 20, 12, 0.8)
    weight = sp.SparseWeight.from_dense(kernel)
    stacked = np.stack([np.asarray(weight.values) * s for s in (1.0, -2.0, 0.5)])
    x = rng.standard_normal((7, 20)).astype(np.float32)
    f = lambda v: sp.sparse_linear(x, weight.with_values(v))  # noqa: E731
    np.testing.assert_allclose(jax.vmap(f)(stacked), np.stack([f(v) for v in stacked]),
                               rtol=1e-6, atol=1e-6)
    per_values_grad = jax.vmap(jax.grad(lambda v: jnp.sum(f(v) ** 2)))(stacked)
    expected = np.stack([jax.grad(lambda v: jnp.sum(f(v) ** 2))(v) for v in stacked])
    np.testing.assert_allclose(per_values_grad, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tasks", [2, 3])  # the forward split by tiles, and by rows
def test_vmap_over_values_with_shared_x_over_tiles(tasks, simd_path, rng):
    # One x for every slice of the values, three batch tiles: each slice's
    # saved x^T is transposed from the same x.
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 90, 40, 0.8))
    stacked = np.stack([np.asarray(weight.values) * s for s in (1.0, -2.0)])
    x = rng.standard_normal((150, 90)).astype(np.float32)

    def loss(v, x):
        return jnp.sum(jnp.sin(sp.sparse_linear(x, weight.with_values(v))))

    with tasks_per_call(tasks):
        got = jax.block_until_ready(
            jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(stacked, x))
    for v, dv, dx in zip(stacked, *got):
        kernel = np.asarray(weight.with_values(v).to_dense())
        dy = np.cos(x @ kernel)
        _, dx_ref, dk_ref, _ = dense_reference(x, kernel, None, dy)
        assert_close(dx, dx_ref, 40)
        assert_close(weight.with_values(dv).to_dense(), dk_ref * (kernel != 0), 150)


@pytest.mark.parametrize("sparsity", [0.9, 0.99])  # the weight gradient per tile, and not
def test_results_do_not_depend_on_task_split(sparsity, rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 300, 200, sparsity))
    # Three tiles of the batch: with 1 or 2 tasks the forward splits them over
    # the tasks, with 3 or more (too uneven) it splits the rows.
    x = rng.standard_normal((150, 300)).astype(np.float32)
    step = jax.jit(jax.grad(lambda x, v: jnp.sum(jnp.sin(
        sp.sparse_linear(x, weight.with_values(v)))), argnums=(0, 1)))
    reference = step(x, weight.values)
    for tasks in (1, 2, 3, 7, 64):
        with tasks_per_call(tasks):
            for got, want in zip(step(x, weight.values), reference):
                np.testing.assert_array_equal(got, want)


def test_vmapped_forward_split_by_tiles(rng):
    # Each vmap slice has its own x, and its tiles go to the tasks.
    kernel = random_kernel(rng, 300, 200, 0.9)
    weight = sp.SparseWeight.from_dense(kernel)
    xs = rng.standard_normal((3, 150, 300)).astype(np.float32)
    with tasks_per_call(2):
        ys = jax.block_until_ready(jax.vmap(lambda x: sp.sparse_linear(x, weight))(xs))
    for x, y in zip(xs, ys):
        assert_close(y, x @ kernel, 300)


@pytest.mark.parametrize("wrt", ["x", "values"])
def test_gradient_of_one_argument_matches_dense(wrt, simd_path, rng):
    # Only one operand is perturbed: forward keeps no unneeded residual and the
    # backward runs just the input-gradient or just the weight-gradient kernel.
    kernel = random_kernel(rng, 70, 45, 0.9)
    weight = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((19, 70)).astype(np.float32)
    dy = rng.standard_normal((19, 45)).astype(np.float32)
    _, dx_ref, dk_ref, _ = dense_reference(x, kernel, None, dy)

    def loss(x, values):
        return jnp.vdot(sp.sparse_linear(x, weight.with_values(values)), dy)

    if wrt == "x":
        assert_close(jax.jit(jax.grad(loss, argnums=0))(x, weight.values), dx_ref, 45)
    else:
        dvalues = jax.jit(jax.grad(loss, argnums=1))(x, weight.values)
        assert_close(weight.with_values(dvalues).to_dense(), dk_ref * (kernel != 0), 19)


def test_cotangent_of_unused_output_is_zero(rng):
    # A symbolic-zero cotangent (the output does not reach the loss) gives zero gradients.
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 20, 12, 0.8))
    x = rng.standard_normal((7, 20)).astype(np.float32)

    def loss(x, values):
        sp.sparse_linear(x, weight.with_values(values))
        return jnp.sum(x) + jnp.sum(values)

    dx, dvalues = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, weight.values)
    np.testing.assert_array_equal(dx, np.ones_like(x))
    np.testing.assert_array_equal(dvalues, np.ones_like(weight.values))


@pytest.mark.parametrize("jit", [False, True])
def test_nested_vmap_with_operands_batched_at_different_levels(jit, simd_path, rng):
    # Per-example gradients of an ensemble: x batched by the outer vmap, the
    # values by the inner one. The FFI call gets x as [2, 1, ...] and the
    # values as [1, 3, ...], which broadcast like jnp operands to [2, 3, ...].
    kernel = random_kernel(rng, 30, 20, 0.7)
    weight = sp.SparseWeight.from_dense(kernel)
    xs = rng.standard_normal((2, 70, 30)).astype(np.float32)  # two batch tiles each
    stacked = np.stack([np.asarray(weight.values) * s for s in (1.0, -2.0, 0.5)])

    def value_and_grads(x, values, op):
        def loss(x, values):
            w = weight.with_values(values)
            y = sp.sparse_linear(x, w) if op == "sparse" else x @ w.to_dense()
            return jnp.sum(jnp.sin(y))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, values)

    def nested(op):
        f = jax.vmap(jax.vmap(functools.partial(value_and_grads, op=op), in_axes=(None, 0)),
                     in_axes=(0, None))
        return jax.jit(f) if jit else f

    got = jax.block_until_ready(nested("sparse")(xs, stacked))
    want = nested("dense")(xs, stacked)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        assert_close(g, w, 70)
    # Three levels, with the middle one unbatched for both operands.
    triple = jax.vmap(jax.vmap(jax.vmap(lambda x, v: sp.sparse_linear(x, weight.with_values(v)),
                                        in_axes=(None, 0)), in_axes=(None, None), axis_size=2),
                      in_axes=(0, None))
    y = triple(xs[:, :5], stacked)
    assert y.shape == (2, 2, 3, 5, 20)
    for i in range(2):
        for k in range(3):
            assert_close(y[i, 1, k], xs[i, :5] @ np.asarray(weight.with_values(stacked[k])
                                                            .to_dense()), 30)


def test_stacks_that_do_not_broadcast_are_refused(rng):
    # The handlers check the leading dims against the result's themselves.
    from sparseprop_jax import _ffi, _targets
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 6, 4, 0.5))
    p = weight.pattern
    x = jnp.ones((2, 3, 5, 6))
    values = jnp.ones((3, 2, weight.nnz))  # [3, 2] against the result's [2, 3]
    with pytest.raises(Exception, match=r"values has leading \(vmap\) dims \[3, 2\], which do "
                                        r"not broadcast to the result's \[2, 3\]"):
        jax.block_until_ready(_ffi.call(_targets.LINEAR_FORWARD, (2, 3, 5, 4), x, values, p.indptr,
                                        p.indices))
