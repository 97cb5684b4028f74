"""sparse_linear along an axis other than the last (the feature-major targets).

x is [groups, in, n] once its dims before and after the axis are merged; the
reference is the batch-major layer on the same data moved to the last axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparseprop_jax as sp
from conftest import (assert_close, check_linear_against_dense, dense_reference, random_kernel,
                      tasks_per_call)

SHAPES = [(1, 1), (7, 33), (33, 7), (64, 128)]
SPARSITIES = [0.0, 0.5, 0.95, 1.0]
# (groups, n): one group, one column, a tile and a bit (65), several tiles, no groups.
LAYOUTS = [(1, 1), (3, 5), (2, 65), (4, 130), (0, 9), (2, 0)]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_dense_over_shapes_sparsities_layouts(shape, sparsity, rng):
    kernel = random_kernel(rng, *shape, sparsity)
    for groups, n in LAYOUTS:
        x = rng.standard_normal((groups, shape[0], n)).astype(np.float32)
        check_linear_against_dense(kernel, x, rng, feature_axis=1)


@pytest.mark.parametrize("axis", [0, 1, 2, -2, -3])
def test_any_axis_of_four_dims(axis, rng):
    kernel = random_kernel(rng, 6, 5, 0.5)
    shape = [2, 3, 4, 7]
    shape[axis] = 6
    check_linear_against_dense(kernel, rng.standard_normal(shape).astype(np.float32), rng,
                               feature_axis=axis)


def test_same_as_swapaxes_around_the_last_axis(rng):
    # The token mixing of a Mixer: [batch, tokens, dim], along the tokens.
    w1 = sp.SparseWeight.from_dense(random_kernel(rng, 16, 24, 0.9))
    w2 = sp.SparseWeight.from_dense(random_kernel(rng, 24, 16, 0.9))
    x = rng.standard_normal((3, 16, 70)).astype(np.float32)

    def in_place(x, v1, v2):
        h = jax.nn.gelu(sp.sparse_linear(x, w1.with_values(v1), feature_axis=-2))
        return jnp.sum(jnp.sin(sp.sparse_linear(h, w2.with_values(v2), feature_axis=-2)))

    def swapped(x, v1, v2):
        t = functools.partial(jnp.swapaxes, axis1=-1, axis2=-2)
        h = jax.nn.gelu(sp.sparse_linear(t(x), w1.with_values(v1)))
        return jnp.sum(jnp.sin(t(sp.sparse_linear(h, w2.with_values(v2)))))

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
    got = jax.jit(grad(in_place))(x, w1.values, w2.values)
    want = jax.jit(grad(swapped))(x, w1.values, w2.values)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrt", ["x", "values"])
def test_gradient_of_one_argument(wrt, simd_path, rng):
    kernel = random_kernel(rng, 20, 12, 0.8)
    weight = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((3, 20, 70)).astype(np.float32)
    dy = rng.standard_normal((3, 12, 70)).astype(np.float32)
    _, dx_ref, dk_ref, _ = dense_reference(np.swapaxes(x, 1, 2), kernel, None,
                                           np.swapaxes(dy, 1, 2))

    def loss(x, values):
        return jnp.vdot(sp.sparse_linear(x, weight.with_values(values), feature_axis=1), dy)

    if wrt == "x":
        dx = jax.jit(jax.grad(loss, argnums=0))(x, weight.values)
        assert_close(dx, np.swapaxes(dx_ref, 1, 2), 12)
    else:
        dv = jax.jit(jax.grad(loss, argnums=1))(x, weight.values)
        assert_close(weight.with_values(dv).to_dense(), dk_ref * (kernel != 0), 210)


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_results_do_not_depend_on_task_split(sparsity, rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 40, 30, sparsity))
    # Two groups of three tiles: split over the units with few tasks, over
    # the rows with many.
    x = rng.standard_normal((2, 40, 150)).astype(np.float32)
    step = jax.jit(jax.grad(lambda x, v: jnp.sum(jnp.sin(
        sp.sparse_linear(x, weight.with_values(v), feature_axis=1))), argnums=(0, 1)))
    reference = step(x, weight.values)
    for tasks in (1, 2, 3, 7, 64):
        with tasks_per_call(tasks):
            for got, want in zip(jax.block_until_ready(step(x, weight.values)), reference):
                np.testing.assert_array_equal(got, want)


def test_vmap_over_input_and_values(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 20, 12, 0.8))
    xs = rng.standard_normal((4, 3, 20, 9)).astype(np.float32)
    f = lambda x, v: sp.sparse_linear(x, weight.with_values(v), feature_axis=1)  # noqa: E731
    expected = np.stack([np.asarray(f(x, weight.values)) for x in xs])
    np.testing.assert_allclose(jax.vmap(f, (0, None))(xs, weight.values), expected,
                               rtol=1e-6, atol=1e-6)
    stacked = np.stack([np.asarray(weight.values) * s for s in (1.0, -2.0)])
    per_values = jax.vmap(jax.grad(lambda v: jnp.sum(f(xs[0], v) ** 2)))(stacked)
    for v, g in zip(stacked, per_values):
        np.testing.assert_allclose(g, jax.grad(lambda v: jnp.sum(f(xs[0], v) ** 2))(v),
                                   rtol=1e-5, atol=1e-4)


def test_bad_feature_axis_is_named(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 6, 5, 0.5))
    x = jnp.ones((2, 6, 3))
    with pytest.raises(ValueError, match="feature_axis=3 is out of range"):
        sp.sparse_linear(x, weight, feature_axis=3)
    with pytest.raises(TypeError, match="feature_axis must be an int"):
        sp.sparse_linear(x, weight, feature_axis=1.0)
    with pytest.raises(ValueError, match="6 along feature_axis 0"):
        sp.sparse_linear(x, weight, feature_axis=0)


def test_nnx_and_linen_layers_along_an_axis(rng):
    from flax import linen as nn
    from flax import nnx

    from sparseprop_jax import linen as sp_linen
    from sparseprop_jax import nnx as sp_nnx

    x = rng.standard_normal((2, 6, 5)).astype(np.float32)
    layer = sp_nnx.SparseDense(6, 4, sparsity=0.5, rngs=nnx.Rngs(0))
    want = jnp.swapaxes(layer(jnp.swapaxes(x, 1, 2)), 1, 2)
    np.testing.assert_allclose(layer(x, feature_axis=1), want, rtol=1e-6, atol=1e-6)

    module = sp_linen.SparseDense(4, sparsity=0.5)
    variables = module.init(jax.random.key(0), x, feature_axis=1)
    assert variables["params"]["values"].shape == (12,)  # 6 x 4 at 50%
    got = module.apply(variables, x, feature_axis=1)
    want = jnp.swapaxes(module.apply(variables, jnp.swapaxes(x, 1, 2)), 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert isinstance(module, nn.Module)
