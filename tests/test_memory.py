"""Memory the kernels keep between calls stays bounded, and can be released."""

from __future__ import annotations

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparseprop_jax as sp
from conftest import random_kernel

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="reads the resident set size from /proc")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _steps(rng):
    """A jitted forward + backward of a fixed linear and a fixed conv layer, and its inputs."""
    linear = sp.SparseWeight.from_dense(random_kernel(rng, 512, 384, 0.9))
    conv = sp.SparseWeight.from_dense(random_kernel(rng, 3 * 3 * 16, 16, 0.9)
                                      .reshape(3, 3, 16, 16))
    x = jnp.asarray(rng.standard_normal((130, 512)).astype(np.float32))  # three batch tiles
    cx = jnp.asarray(rng.standard_normal((8, 14, 14, 16)).astype(np.float32))

    @jax.jit
    def step(x, cx, lv, cv):
        def loss(x, cx, lv, cv):
            return (jnp.sum(jnp.sin(sp.sparse_linear(x, linear.with_values(lv))))
                    + jnp.sum(jnp.sin(sp.sparse_conv2d(cx, conv.with_values(cv)))))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, cx, lv, cv)

    return step, (x, cx, linear.values, conv.values)


def _cached_bytes_once_released(timeout: float = 2.0) -> int:
    """cached_memory_bytes() once a finished call's buffers are back in the cache.

    A call's results can be ready a moment before its tasks, on XLA's threads,
    drop the buffers they hold (under load, long enough to read 0 between).
    """
    deadline = time.monotonic() + timeout
    while sp.cached_memory_bytes() == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    return sp.cached_memory_bytes()


def test_resident_memory_stays_flat_over_many_steps(rng):
    step, args = _steps(rng)
    for _ in range(200):  # warm-up: compilation, XLA's and the kernels' buffers
        jax.block_until_ready(step(*args))
    before = _rss_bytes()
    for _ in range(2000):
        out = step(*args)
    jax.block_until_ready(out)
    grown = _rss_bytes() - before
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 2000 steps"


def test_cached_memory_is_released_on_request_and_after_idle(rng):
    step, args = _steps(rng)
    jax.block_until_ready(step(*args))
    assert _cached_bytes_once_released() > 0  # the layouts' buffers, kept for the next step
    sp.release_cached_memory()
    assert sp.cached_memory_bytes() == 0
    first = jax.block_until_ready(step(*args))  # allocates again, same results
    for a, b in zip(first, jax.block_until_ready(step(*args))):
        np.testing.assert_array_equal(a, b)
    cached = _cached_bytes_once_released()
    assert cached > 0
    # A buffer that no call reuses for 10 seconds goes at the next call.
    time.sleep(10.5)
    tiny = sp.SparseWeight.from_dense(np.eye(3, 2, dtype=np.float32))
    jax.block_until_ready(sp.sparse_linear(np.ones((1, 3), np.float32), tiny))
    assert sp.cached_memory_bytes() < cached


def test_buffers_in_use_at_release_are_freed_when_their_call_ends(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 2048, 2048, 0.9))
    x = jnp.asarray(rng.standard_normal((4096, 2048)).astype(np.float32))
    step = jax.jit(jax.grad(  # the backward lays activations out in scratch
        lambda x, v: jnp.sum(jnp.sin(sp.sparse_linear(x, weight.with_values(v)))), (0, 1)))
    expected = jax.block_until_ready(step(x, weight.values))
    for _ in range(5):  # retried only if the call ends before it is seen holding the buffers
        jax.block_until_ready(step(x, weight.values))
        assert _cached_bytes_once_released() > 0
        results = []
        call = threading.Thread(
            target=lambda: results.append(jax.block_until_ready(step(x, weight.values))))
        call.start()
        while call.is_alive() and sp.cached_memory_bytes() > 0:
            time.sleep(0.0005)  # until the call has taken the kept buffers
        holding = call.is_alive()
        sp.release_cached_memory()
        call.join()
        for a, b in zip(results[0], expected):
            np.testing.assert_array_equal(a, b)
        if holding:
            assert sp.cached_memory_bytes() == 0  # freed when the call ended, not kept
            return
    pytest.fail("the call never held its buffers long enough to release them during it")
