"""The kernels give the same results on one CPU (a one-thread pool) as on all of them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    if sys.argv[1] == "one-cpu":
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import jax, jax.numpy as jnp
    import sparseprop_jax as sp
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((300, 200)) * (rng.random((300, 200)) < 0.1)).astype(np.float32)
    w = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((64, 300)).astype(np.float32)
    grads = jax.jit(jax.grad(lambda x, v: jnp.sum(jnp.sin(sp.sparse_linear(x, w.with_values(v)))),
                             argnums=(0, 1)))(x, w.values)
    ck = rng.standard_normal((3, 3, 16, 24)) * (rng.random((3, 3, 16, 24)) < 0.2)
    ck = ck.astype(np.float32)
    cw = sp.SparseWeight.from_dense(ck)
    cx = rng.standard_normal((8, 12, 12, 16)).astype(np.float32)
    conv_grads = {}
    for variant in ("batch", "width"):
        conv_grads[variant] = jax.jit(jax.grad(lambda x, v: jnp.sum(jnp.sin(sp.sparse_conv2d(
            x, cw.with_values(v), strides=2, variant=variant))), argnums=(0, 1)))(cx, cw.values)
    np.savez(sys.argv[2], dx=grads[0], dv=grads[1], y=sp.sparse_linear(x, w),
             conv_b_dx=conv_grads["batch"][0], conv_b_dv=conv_grads["batch"][1],
             conv_w_dx=conv_grads["width"][0], conv_w_dv=conv_grads["width"][1])
""")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_single_cpu_pool_matches_all_cpus(tmp_path):
    results = {}
    for mode in ("one-cpu", "all-cpus"):
        out = tmp_path / f"{mode}.npz"
        # cwd away from the checkout: `python -c` would import the source tree.
        subprocess.run([sys.executable, "-c", SCRIPT, mode, str(out)], check=True, timeout=300,
                       cwd=tmp_path)
        results[mode] = np.load(out)
    for key in ("y", "dx", "dv", "conv_b_dx", "conv_b_dv", "conv_w_dx", "conv_w_dv"):
        np.testing.assert_array_equal(results["one-cpu"][key], results["all-cpus"][key])


def test_concurrent_calls_from_python_threads_give_the_same_results(rng):
    # Several Python threads dispatch jitted sparse ops at once; each result
    # must equal the one computed alone (the kernels' results do not depend
    # on how calls interleave on XLA's pool).
    import concurrent.futures

    import jax
    import jax.numpy as jnp

    import sparseprop_jax as sp
    from conftest import random_kernel

    linear = sp.SparseWeight.from_dense(random_kernel(rng, 200, 150, 0.9))
    conv = sp.SparseWeight.from_dense(random_kernel(rng, 3 * 3 * 8, 12, 0.8).reshape(3, 3, 8, 12))

    @jax.jit
    def step(x, cx, lv, cv):
        def loss(x, cx, lv, cv):
            return (jnp.sum(jnp.sin(sp.sparse_linear(x, linear.with_values(lv))))
                    + jnp.sum(jnp.sin(sp.sparse_conv2d(cx, conv.with_values(cv), strides=2))))
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, cx, lv, cv)

    inputs = [(rng.standard_normal((70, 200)).astype(np.float32),
               rng.standard_normal((4, 9, 9, 8)).astype(np.float32),
               np.asarray(linear.values) * (1 + k), np.asarray(conv.values) * (1 - k / 10))
              for k in range(6)]
    expected = [jax.block_until_ready(step(*args)) for args in inputs]

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(inputs) * 5) % len(inputs)
        for k in order:
            got = step(*inputs[k])
            for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected[k])):
                np.testing.assert_array_equal(g, e)
        return len(order)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(worker, range(4))) == 4 * 5 * len(inputs)
