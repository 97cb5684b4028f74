"""Shared fixtures: random sparse kernels and the dense float64 reference."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparseprop_jax as sp


@contextlib.contextmanager
def tasks_per_call(n: int):
    """Runs the body with every kernel call split into `n` tasks (`sp.set_tasks_per_call`).

    Block on the body's results inside it: dispatch is asynchronous, and a
    call still queued when the body ends runs with the setting restored.
    """
    previous = sp.tasks_per_call()
    sp.set_tasks_per_call(n)
    try:
        yield
    finally:
        sp.set_tasks_per_call(previous)


def random_kernel(rng: np.random.Generator, n_in: int, n_out: int, sparsity: float) -> np.ndarray:
    """A float32 (in, out) kernel with exactly round(sparsity * size) zeros."""
    size = n_in * n_out
    nnz = size - int(round(sparsity * size))
    kernel = np.zeros(size, dtype=np.float32)
    where = rng.choice(size, nnz, replace=False)
    # Values bounded away from zero, so the exact zeros are exactly the pattern.
    kernel[where] = rng.uniform(0.5, 1.5, nnz) * rng.choice([-1, 1], nnz)
    return kernel.reshape(n_in, n_out)


def dense_reference(x, kernel, bias, dy):
    """Output and gradients of y = x @ kernel + bias in float64, for cotangent dy."""
    x, kernel, dy = (np.asarray(a, np.float64) for a in (x, kernel, dy))
    y = x @ kernel + (0.0 if bias is None else np.asarray(bias, np.float64))
    x2, dy2 = x.reshape(-1, kernel.shape[0]), dy.reshape(-1, kernel.shape[1])
    return y, (dy @ kernel.T), (x2.T @ dy2), dy2.sum(0)


def assert_close(actual, expected, scale_terms: int = 1):
    """float32 against a float64 reference: error grows with the summed terms."""
    expected = np.asarray(expected)
    tol = 1e-5 * np.sqrt(max(scale_terms, 1)) * (1.0 + np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=tol)


def _linear_value_and_grads(weight, x, bias, dy, feature_axis):
    """Output and (dx, dense dkernel, dbias) of sparse_linear for cotangent dy, jitted."""

    def loss(x, values, bias):
        y = sp.sparse_linear(x, weight.with_values(values), bias, feature_axis=feature_axis)
        return jnp.vdot(y, dy), y

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    (dx, dvalues, dbias), y = grad_fn(x, weight.values, bias)
    return y, dx, weight.with_values(dvalues).to_dense(), dbias


def check_linear_against_dense(kernel, x, rng, feature_axis: int = -1):
    """sparse_linear's output and three gradients against the float64 reference, every path.

    `x` holds the in_features along `feature_axis`.
    """
    n_in, n_out = kernel.shape
    weight = sp.SparseWeight.from_dense(kernel)
    bias = rng.standard_normal(n_out).astype(np.float32)
    out_shape = list(x.shape)
    out_shape[feature_axis] = n_out
    dy = rng.standard_normal(out_shape).astype(np.float32)
    y_ref, dx_ref, dk_ref, db_ref = dense_reference(
        np.moveaxis(x, feature_axis, -1), kernel, bias, np.moveaxis(dy, feature_axis, -1))
    batch = x.size // n_in
    for path in sp.runtime.distinct_simd_paths():
        with sp.use_simd_path(path):  # results ready before the path is restored
            y, dx, dk, db = jax.block_until_ready(
                _linear_value_and_grads(weight, x, bias, dy, feature_axis))
        assert y.shape == tuple(out_shape)
        assert_close(y, np.moveaxis(y_ref, -1, feature_axis), n_in)
        assert_close(dx, np.moveaxis(dx_ref, -1, feature_axis), n_out)
        # The weight gradient exists only on the pattern; elsewhere it is exactly 0.
        assert_close(dk, dk_ref * (kernel != 0), batch)
        assert np.all(np.asarray(dk)[kernel == 0] == 0)
        assert_close(db, db_ref, batch)


@pytest.fixture(params=sp.runtime.distinct_simd_paths())
def simd_path(request):
    """Runs a test once per kernel path this CPU supports with float32 routines of its own,
    scalar included."""
    with sp.use_simd_path(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)
