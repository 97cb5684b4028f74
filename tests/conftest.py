"""Shared fixtures: random sparse kernels and the dense float64 reference."""

from __future__ import annotations

import contextlib

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


@pytest.fixture(params=sp.supported_simd_paths())
def simd_path(request):
    """Runs a test once per kernel path this CPU supports, scalar included."""
    with sp.use_simd_path(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)
