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
    for kernel in ("batch", "width"):
        conv_grads[kernel] = jax.jit(jax.grad(lambda x, v: jnp.sum(jnp.sin(sp.sparse_conv2d(
            x, cw.with_values(v), strides=2, kernel=kernel))), argnums=(0, 1)))(cx, cw.values)
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
