"""`sparseprop_jax.max_pool` against `flax.nnx.max_pool`: values and gradients, exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparseprop_jax as sp

CASES = [
    # shape, window, strides, padding
    ((4, 9, 11, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd sizes
    ((3, 8, 8, 4), (2, 2), (2, 2), "VALID"),
    ((2, 7, 6, 3), (3, 2), None, "SAME"),
    ((2, 7, 6, 3), (3, 3), (2, 1), ((0, 2), (1, 0))),
    ((5, 10, 6), (4,), (3,), "SAME"),  # one window dim
    ((7, 7, 3), (3, 3), (2, 2), "VALID"),  # no batch dim
    ((2, 3, 6, 6, 2), (2, 3), (1, 2), "SAME"),  # two batch dims
    ((2, 5, 5, 4, 3), (2, 2, 2), (1, 2, 1), "VALID"),  # three window dims
    ((1, 1, 1, 3), (1, 1), (1, 1), "VALID"),
    ((2, 11, 10, 2), (2, 2), (3, 3), ((0, 1), (2, 0))),  # stride longer than the window
    ((1, 13, 13, 2), (12, 12), (1, 1), "VALID"),  # 144 taps: int32 tap numbers
    ((2, 5, 5, 3), (3, 3), (1, 1), ((2, 2), (2, 2))),  # corner windows mostly padding
]


def _both(x, window, strides, padding, ct):
    results = []
    for pool in (nnx.max_pool, sp.max_pool):
        def loss(x, pool=pool):
            return jnp.vdot(pool(x, window, strides, padding), ct)
        y = pool(x, window, strides, padding)
        results.append((y, jax.grad(loss)(x), jax.jit(jax.grad(loss))(x)))
    return results


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_matches_flax(shape, window, strides, padding, rng):
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    y = nnx.max_pool(x, window, strides, padding)
    ct = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    (y_ref, g_ref, gj_ref), (y_sp, g_sp, gj_sp) = _both(x, window, strides, padding, ct)
    np.testing.assert_array_equal(y_sp, y_ref)
    # Overlapping windows add their shares in another order: equal to rounding.
    np.testing.assert_allclose(g_sp, g_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gj_sp, gj_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window,strides,padding", [((3, 3), (2, 2), ((1, 1), (1, 1))),
                                                    ((2, 2), (1, 1), "SAME")])
def test_ties_go_where_flax_sends_them(window, strides, padding, rng):
    # Few distinct values and zeros after a ReLU: most windows tie.
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, (3, 8, 9, 4)), 0).astype(np.float32))
    y = nnx.max_pool(x, window, strides, padding)
    ct = jnp.asarray(rng.integers(1, 5, y.shape).astype(np.float32))  # exact sums
    (y_ref, g_ref, _), (y_sp, g_sp, gj_sp) = _both(x, window, strides, padding, ct)
    np.testing.assert_array_equal(y_sp, y_ref)
    np.testing.assert_array_equal(g_sp, g_ref)
    np.testing.assert_array_equal(gj_sp, g_ref)


def test_nan_and_inf_values():
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, 1, 1, 0] = np.nan
    x[0, 2, 2, 1] = -np.inf
    x[0, 3, 3, 1] = np.inf
    x = jnp.asarray(x)
    y_ref = nnx.max_pool(x, (2, 2), (2, 2), "VALID")
    y = sp.max_pool(x, (2, 2), (2, 2), "VALID")
    np.testing.assert_array_equal(y, y_ref)
    grad = jax.grad(lambda x: jnp.sum(sp.max_pool(x, (2, 2), (2, 2), "VALID")))(x)
    # Each window's gradient lands on exactly one input: the NaN, the inf, or the first 0.
    assert float(jnp.sum(grad)) == y.size
    assert grad[0, 1, 1, 0] == 1 and grad[0, 3, 3, 1] == 1


def test_jit_vmap_and_integer_inputs(rng):
    x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 3)).astype(np.float32))
    pool = lambda x: sp.max_pool(x, (2, 2), (2, 2), "VALID")  # noqa: E731
    np.testing.assert_array_equal(jax.vmap(pool)(x), jax.jit(pool)(x))
    ints = jnp.asarray(rng.integers(0, 9, (2, 6, 6, 3)), jnp.int32)
    np.testing.assert_array_equal(sp.max_pool(ints, (3, 3), (2, 2), "SAME"),
                                  nnx.max_pool(ints, (3, 3), (2, 2), "SAME"))


def test_gradient_under_vmap(rng):
    x = jnp.asarray(rng.standard_normal((3, 2, 7, 7, 4)).astype(np.float32))
    ct = jnp.asarray(rng.standard_normal((3, 2, 4, 4, 4)).astype(np.float32))

    def grad(x, ct):
        return jax.grad(lambda x: jnp.vdot(sp.max_pool(x, (3, 3), (2, 2), "SAME"), ct))(x)

    def grad_ref(x, ct):
        return jax.grad(lambda x: jnp.vdot(nnx.max_pool(x, (3, 3), (2, 2), "SAME"), ct))(x)

    np.testing.assert_allclose(jax.jit(jax.vmap(grad))(x, ct),
                               np.stack([grad_ref(a, b) for a, b in zip(x, ct)]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args,error,match", [
    (dict(padding="FULL"), ValueError, "padding must be 'SAME', 'VALID'"),
    (dict(padding=((1, 1),)), ValueError, "one \\(low, high\\) pair per window dim"),
    (dict(padding=((1, -1), (0, 0))), ValueError, "must not be negative"),
    (dict(window_shape=(0, 2)), ValueError, "window_shape must be 2 positive ints"),
    (dict(strides=(2,)), ValueError, "strides must be 2 positive ints"),
    (dict(window_shape=(9, 9)), ValueError, "does not fit"),
    (dict(window_shape=(2, 2, 2, 2, 2)), ValueError, "inputs must have the 5 window dims"),
    (dict(strides=2), TypeError, "strides must be a sequence of ints"),
])
def test_bad_arguments(args, error, match):
    kwargs = dict(window_shape=(2, 2), strides=None, padding="VALID") | args
    with pytest.raises(error, match=match):
        sp.max_pool(jnp.ones((1, 4, 4, 1)), **kwargs)
