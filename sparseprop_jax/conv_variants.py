"""Which variant of the sparse convolution runs a call.

The variants differ in which dimensions the SIMD lanes run over:

- "batch": the batch is the minor dimension and a tap covers a whole output
  row x batch in one contiguous run (layout rows, C, s, W, N);
- "width": the output width is the contiguous dimension, one run per output
  row of one image (layout N, C, rows, s, W).

`sparse_conv2d(..., variant=...)` takes a variant by name, "auto" (the rule of
`auto_variant`) or "measure" (both timed once per geometry, the faster kept).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from sparseprop_jax import _checks, _targets
from sparseprop_jax.runtime import simd_path
from sparseprop_jax.sparse_weight import SparseWeight

if TYPE_CHECKING:
    from sparseprop_jax.conv import ConvGeometry

#: The variants, each a pair of FFI targets (see _targets.py).
VARIANTS = _targets.CONV_VARIANTS
#: What `sparse_conv2d` and the conv layers accept.
CHOICES = ("auto", "measure") + VARIANTS


def choose(requested: str, geometry: "ConvGeometry", nnz: int) -> str:
    """The variant that runs a call of this geometry and nnz (`requested` one of CHOICES)."""
    if requested in VARIANTS:
        return requested
    if requested == "measure":
        # Needs only static facts (shapes, nnz), so it also works while tracing.
        return measured_variant(geometry, nnz)
    return auto_variant(geometry)


def auto_variant(geometry: "ConvGeometry") -> str:
    """The variant "auto" runs: always "batch".

    Per nonzero and output row, the batch variant streams one run of wo x n
    floats and the width variant n runs of wo, so the batch variant never
    needs more vector operations (at batch 1 they tie, and either can be
    faster: that is what "measure" is for).
    """
    del geometry  # the rule needs no geometry today; the benchmark asks through it
    return "batch"


_MEASURED: dict[tuple, str] = {}


def measured_variant(geometry: "ConvGeometry", nnz: int) -> str:
    """Times forward + backward of every variant once per geometry; caches the fastest."""
    g = geometry
    key = (g.n, g.h, g.w, g.kernel_shape, g.stride, g.pads, nnz, simd_path())
    if key not in _MEASURED:
        # Evaluate eagerly even when called while tracing an enclosing jit.
        with jax.ensure_compile_time_eval():
            _MEASURED[key] = _fastest(g, nnz)
    return _MEASURED[key]


def _fastest(g: "ConvGeometry", nnz: int) -> str:
    """The fastest variant for forward + backward on random data of this geometry and nnz."""
    from sparseprop_jax.conv import conv_op  # conv imports this module

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((g.n, g.h, g.w, g.kernel_shape[2]))
                    .astype(_checks.DEFAULT_DTYPE))
    weight = SparseWeight.random(g.kernel_shape, 1.0 - nnz / np.prod(g.kernel_shape),
                                 jax.random.key(0))
    p = weight.pattern
    times = {}
    for variant in VARIANTS:
        geometry = dataclasses.replace(g, variant=variant)

        def loss(x, values, geometry=geometry):
            y = conv_op(geometry, x, values, p.indptr, p.indices, p.t_indptr, p.t_indices,
                        p.t_perm)
            return jnp.sum(y)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(step(x, weight.values))  # compile
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(step(x, weight.values))
            samples.append(time.perf_counter() - start)
        times[variant] = min(samples)
    return min(times, key=times.get)
