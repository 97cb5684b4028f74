"""Benchmark: bfloat16 against float32, sparse and dense, forward + backward.

For each linear shape (batch x in -> out) and sparsity it times, in one
process, interleaved, the f+b of `linear.py` (`value_and_grad` of
`vdot(y, ct)` with respect to x and the weight) four ways: `sparse_linear` in
float32 and in bfloat16, and XLA's dense `x @ kernel` in float32 and in
bfloat16. For each conv layer it does the same with `sparse_conv2d` and
`lax.conv_general_dilated`. bfloat16 here means every operand in bfloat16
(the products summed in float32), as a layer with `dtype=jnp.bfloat16`
computes.

"saved" is the floating-point part of what the forward keeps for the
backward (the residuals of `jax.vjp`: the input, or x^T, and a copy of the
values; the pattern's int32 arrays, which the layer holds anyway, left out):
the activation memory a training step holds per layer.

Before timing, the bfloat16 results are checked against the float32 ones
(within bfloat16's rounding), so a wrong result is never timed. Medians;
nothing asserts on speed. `python benchmarks/bfloat16.py --help` lists the
options.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _threads  # noqa: E402

if __name__ == "__main__":
    _threads.limit_from_argv()  # --threads N: before jax, which sizes its thread pool once

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _timing  # noqa: E402
from sparseprop_jax import SparseWeight, sparse_conv2d, sparse_linear  # noqa: E402

LINEAR_SHAPES = ((256, 768, 3072), (256, 3072, 768), (64, 4096, 4096), (128, 512, 256))
LINEAR_SPARSITIES = (0.9, 0.95, 0.99)
# (batch, height, width, in, out, stride) of ResNet18-like 3x3 layers.
CONV_LAYERS = ((32, 56, 56, 64, 64, 1), (32, 14, 14, 256, 256, 1))
CONV_SPARSITIES = (0.95,)
QUICK_LINEAR_SHAPES = ((128, 512, 256),)
QUICK_CONV_LAYERS = ((8, 14, 14, 64, 64, 1),)
DTYPES = (jnp.float32, jnp.bfloat16)
# A bfloat16 result against the float32 one: bfloat16 inputs and one rounding of the output.
TOLERANCE = 3e-2


def _fwdbwd(apply):
    """jit(value_and_grad) of vdot(apply(x, w), ct) with respect to x and w."""
    def loss(x, w, ct):
        return jnp.vdot(apply(x, w).astype(jnp.float32), ct)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _saved_bytes(apply, x, w) -> int:
    _, vjp = jax.vjp(apply, x, w)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp)
               if jnp.issubdtype(leaf.dtype, jnp.floating))


def _check(results, label):
    (v32, (dx32, dw32)), (v16, (dx16, dw16)) = results
    for name, a, b in (("dx", dx32, dx16), ("dw", dw32, dw16)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.abs(a - b).max(initial=0.0) / max(np.abs(a).max(initial=0.0), 1e-30)
        if err > TOLERANCE:
            raise SystemExit(f"{label}: bfloat16 {name} is off by {err:.3g} of its scale")


def _cases(label, kinds, x, ct):
    """Cases and saved bytes for each (kind, dtype), kinds: name -> (apply, w)."""
    cases, saved = [], {}
    for kind, (apply, w) in kinds.items():
        fn = _fwdbwd(apply)
        results = []
        for dtype in DTYPES:
            args = (x.astype(dtype), w.astype(dtype), ct)
            results.append(fn(*args))
            name = f"{kind} {jnp.dtype(dtype).name}"
            cases.append(_timing.Case(name, fn, *args))
            saved[name] = _saved_bytes(apply, *args[:2])
        _check(results, f"{label} {kind}")
    return cases, saved


COLUMNS = [("layer", 28, "s"), ("sparsity", 8, ".2f"),
           ("sparse f32 ms", 13, ".2f"), ("sparse bf16 ms", 14, ".2f"),
           ("bf16 speedup", 12, ".2f"), ("dense f32 ms", 12, ".2f"),
           ("dense bf16 ms", 13, ".2f"), ("bf16 vs dense bf16", 18, ".2f"),
           ("saved f32 MB", 12, ".2f"), ("saved bf16 MB", 13, ".2f")]


def _row(table, label, sparsity, samples, saved):
    ms = {name: _timing.median_ms(s) for name, s in samples.items()}
    row = {"layer": label, "sparsity": sparsity, "ms": ms,
           "saved_bytes": saved}
    table.row([label, sparsity, ms["sparse float32"], ms["sparse bfloat16"],
               ms["sparse float32"] / ms["sparse bfloat16"], ms["dense float32"],
               ms["dense bfloat16"], ms["dense bfloat16"] / ms["sparse bfloat16"],
               saved["sparse float32"] / 1e6, saved["sparse bfloat16"] / 1e6])
    return row


def bench_linear(shape, sparsity, rng, table, sampling):
    batch, n_in, n_out = shape
    kernel = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
    kernel[rng.random(kernel.shape) < sparsity] = 0.0
    weight = SparseWeight.from_dense(kernel)
    x = jnp.asarray(rng.standard_normal((batch, n_in)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((batch, n_out)), jnp.float32)
    kinds = {"sparse": (lambda x, v: sparse_linear(x, weight.with_values(v)), weight.values),
             "dense": (lambda x, k: x @ k, jnp.asarray(kernel))}
    label = f"linear {batch}x{n_in}->{n_out}"
    cases, saved = _cases(label, kinds, x, ct)
    return _row(table, label, sparsity, _timing.run_interleaved(cases, **sampling), saved)


def bench_conv(layer, sparsity, rng, table, sampling):
    batch, h, w, cin, cout, stride = layer
    kernel = rng.standard_normal((3, 3, cin, cout)).astype(np.float32) / np.sqrt(9 * cin)
    kernel[rng.random(kernel.shape) < sparsity] = 0.0
    weight = SparseWeight.from_dense(kernel)
    x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), jnp.float32)
    ho, wo = -(-h // stride), -(-w // stride)
    ct = jnp.asarray(rng.standard_normal((batch, ho, wo, cout)), jnp.float32)

    def dense(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kinds = {"sparse": (lambda x, v: sparse_conv2d(x, weight.with_values(v), None, stride),
                        weight.values),
             "dense": (dense, jnp.asarray(kernel))}
    label = f"conv {batch}x{h}x{w}x{cin}->{cout}/{stride}"
    cases, saved = _cases(label, kinds, x, ct)
    return _row(table, label, sparsity, _timing.run_interleaved(cases, **sampling), saved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape and layer")
    parser.add_argument("--min-time", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="run on this many CPUs (applied before jax is imported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    sampling = {"min_time": 0.02 if args.quick else args.min_time,
                "min_repeats": 3 if args.quick else args.repeats}
    info = _timing.machine_info()
    print(_timing.machine_summary(info))
    table = _timing.TablePrinter(COLUMNS)
    table.header()
    rows = []
    for shape in QUICK_LINEAR_SHAPES if args.quick else LINEAR_SHAPES:
        for sparsity in LINEAR_SPARSITIES:
            rows.append(bench_linear(shape, sparsity, rng, table, sampling))
    for layer in QUICK_CONV_LAYERS if args.quick else CONV_LAYERS:
        for sparsity in CONV_SPARSITIES:
            rows.append(bench_conv(layer, sparsity, rng, table, sampling))
    if args.json:
        _timing.write_json(args.json, {"machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
