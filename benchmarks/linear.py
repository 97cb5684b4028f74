"""Benchmark: `sparse_linear` against XLA's dense `x @ kernel`, forward and fwd+bwd.

For each shape (batch x in -> out) and sparsity it times, in one process:

  * forward:  `jit(f)(x, w)`;
  * fwd+bwd:  `jit(value_and_grad(loss, argnums=(0, 1)))`, the loss and its
    gradient with respect to the input and the weight (dense: the kernel;
    sparse: `weight.values`), where `loss = vdot(y, ct)` with a fixed random
    cotangent `ct`: one forward plus both backward products, as in a training
    step. (Plain `grad` would not do: the gradient of this loss does not need
    `y`, so XLA would drop the forward from the compiled function.)

  * BCSR forward: `jax.experimental.sparse.BCSR.fromdense(masked_kernel.T)`
    applied as `(bcsr @ x.T).T` (jitted; the orientation that has JAX's native
    CPU sparse-dense kernel), the forward the sparse one must beat from 90%.

  * traffic floor: the same f+b with the layer replaced by XLA ops that move
    the data the layer must move (read x, write y; read dy, write dx; read x
    again, write one float per nonzero) and multiply nothing. No implementation
    of the layer behind this interface can be faster, so `floor speedup`
    (dense f+b / floor f+b) bounds the f+b speedup from above: where it is
    not far above a target, memory traffic, not arithmetic, decides.

Before timing a sparsity, the sparse output and both gradients (and the BCSR
output) are checked against dense XLA on the masked kernel, so a wrong result
is never timed.

Dense and sparse samples are interleaved. The dense functions do not depend on
the sparsity, so their samples are pooled per shape: a dense-only block at
the start, the dense samples taken alongside every sparsity, and a dense-only
block at the end; the reported dense time is the median of all of them. A
shape's sparsities are measured in rounds (`--rounds`), each taking a part of
every sparsity's samples, so that a burst of load on the host that lasts about
one measurement cannot move a whole median.

Each row shows the f+b target of its shape and sparsity and whether it is met
(see `_targets.py`; targets are for 2 threads, `--threads 2`). Run
`python benchmarks/linear.py --help` for the options. No assertions on speed
are made; the exit status does not depend on the targets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _threads  # noqa: E402

if __name__ == "__main__":
    _threads.limit_from_argv()  # --threads N: before jax, which sizes its thread pool once

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import sparse as jsparse  # noqa: E402

import _targets  # noqa: E402
import _timing  # noqa: E402
from sparseprop_jax import SparseWeight, sparse_linear  # noqa: E402

DEFAULT_SHAPES = ((256, 768, 3072), (256, 3072, 768), (64, 4096, 4096), (128, 512, 256))
DEFAULT_SPARSITIES = (0.8, 0.9, 0.95, 0.98, 0.99)
QUICK_SHAPES = ((128, 512, 256),)
QUICK_SPARSITIES = (0.9, 0.99)

RTOL = 1e-4
ATOL_SCALE = 1e-3  # atol = ATOL_SCALE * max|reference|


# -- the functions timed -----------------------------------------------------

def _dense_loss(x, kernel, ct):
    return jnp.vdot(x @ kernel, ct)


def _sparse_loss(x, values, weight, ct):
    return jnp.vdot(sparse_linear(x, weight.with_values(values)), ct)


dense_fwd = jax.jit(lambda x, kernel: x @ kernel)
# value_and_grad, not grad: the loss value keeps the forward in the compiled function.
dense_fwdbwd = jax.jit(jax.value_and_grad(_dense_loss, argnums=(0, 1)))
sparse_fwd = jax.jit(lambda x, weight: sparse_linear(x, weight))
sparse_fwdbwd = jax.jit(jax.value_and_grad(_sparse_loss, argnums=(0, 1)))
# BCSR (out x in) @ x.T is the product jax.experimental.sparse runs with its native CPU
# kernel (other orientations fall back to a generic gather/scatter lowering).
bcsr_fwd = jax.jit(lambda x, matrix: (matrix @ x.T).T)


def _fold(a, n: int):
    """`a` [B, m] -> [B, n]: reads every element of `a` and writes n columns, no products.

    m >= n: the sum of the n-wide column blocks (the last one zero-padded);
    m < n: `a` repeated along the columns, cut to n.
    """
    m = a.shape[1]
    k = -(-max(m, n) // min(m, n))
    if m >= n:
        return jnp.pad(a, ((0, 0), (0, k * n - m))).reshape(a.shape[0], k, n).sum(1)
    return jnp.tile(a, (1, k))[:, :n]


def traffic_floor_fwdbwd(n_in: int, n_out: int):
    """The f+b of a stand-in for the layer that moves its data and computes nothing."""
    @jax.custom_vjp
    def layer(x, values):
        return _fold(x, n_out) * values[0]

    def layer_fwd(x, values):
        return layer(x, values), (x, values)

    def layer_bwd(residuals, dy):
        x, values = residuals
        return _fold(dy, n_in) * values[0], jnp.full_like(values, jnp.sum(x))

    layer.defvjp(layer_fwd, layer_bwd)
    return jax.jit(jax.value_and_grad(lambda x, values, ct: jnp.vdot(layer(x, values), ct),
                                      argnums=(0, 1)))


def to_bcsr(weight: SparseWeight) -> jsparse.BCSR:
    """The masked kernel, transposed to (out, in), as a BCSR matrix."""
    return jsparse.BCSR.fromdense(weight.to_dense().T, nse=weight.nnz)


# -- correctness -------------------------------------------------------------

@jax.jit
def _reference(x, weight, ct):
    """Dense XLA output and gradients (x, values) for the masked kernel."""
    hi = jax.lax.Precision.HIGHEST
    kernel = weight.to_dense()
    y = jnp.matmul(x, kernel, precision=hi)
    dx = jnp.matmul(ct, kernel.T, precision=hi)
    dkernel = jnp.matmul(x.T, ct, precision=hi)
    p = weight.pattern
    dvalues = dkernel[p.indices, p.output_index()]
    return y, dx, dvalues


def check_sparse(x, weight, bcsr, ct, label: str) -> dict[str, float]:
    """Raises SystemExit if sparse output or gradients (or BCSR's output) disagree with XLA.

    Returns the worst error of each, relative to the reference's largest entry.
    """
    y_ref, dx_ref, dv_ref = (np.asarray(a) for a in _reference(x, weight, ct))
    y = np.asarray(sparse_fwd(x, weight))
    _, grads = sparse_fwdbwd(x, weight.values, weight, ct)
    dx, dv = (np.asarray(a) for a in grads)
    y_bcsr = np.asarray(bcsr_fwd(x, bcsr))
    errors = {}
    for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dvalues", dv, dv_ref),
                           ("bcsr_y", y_bcsr, y_ref)):
        scale = float(np.max(np.abs(ref))) or 1.0
        if got.shape != ref.shape or not np.allclose(got, ref, rtol=RTOL,
                                                     atol=ATOL_SCALE * scale):
            worst = (float(np.max(np.abs(got - ref))) if got.shape == ref.shape
                     else float("nan"))
            who = "BCSR y" if name == "bcsr_y" else f"sparse {name}"
            raise SystemExit(f"{label}: {who} disagrees with dense XLA "
                             f"(shape {got.shape} vs {ref.shape}, max abs error {worst:.3g}, "
                             f"reference scale {scale:.3g}); not timing a wrong result")
        errors[name] = float(np.max(np.abs(got - ref))) / scale
    return errors


# -- the benchmark -----------------------------------------------------------

def shape_label(shape) -> str:
    batch, n_in, n_out = shape
    return f"{batch}x{n_in}->{n_out}"


COLUMNS = [
    ("shape", 14, "s"), ("sparsity", 8, ".2f"),
    ("dense fwd ms", 12, ".3f"), ("sparse fwd ms", 13, ".3f"), ("fwd speedup", 11, ".2f"),
    ("bcsr fwd ms", 11, ".3f"), ("vs bcsr", 7, ".2f"), ("beats bcsr", 10, "s"),
    ("dense f+b ms", 12, ".3f"), ("sparse f+b ms", 13, ".3f"),
    ("f+b speedup", 11, ".2f"), ("efficiency", 10, ".2f"), ("target", 6, "s"), ("met", 3, "s"),
    ("floor f+b ms", 12, ".3f"), ("floor speedup", 13, ".2f"),
]


def bench_shape(shape, sparsities, key, timing: dict, rounds: int,
                table: _timing.TablePrinter, evaluate: bool) -> list[dict]:
    """Times one shape at every sparsity; prints and returns a row per sparsity.

    `rounds`: the sparsities' samples are taken in this many rounds
    (`_timing.run_rounds`). `evaluate`: whether the targets apply (a run on 2
    threads).
    """
    batch, n_in, n_out = shape
    kx, kk, kc, kw = jax.random.split(key, 4)
    x = jax.random.normal(kx, (batch, n_in), jnp.float32)
    kernel = jax.nn.initializers.lecun_normal()(kk, (n_in, n_out), jnp.float32)
    ct = jax.random.normal(kc, (batch, n_out), jnp.float32)

    d_fwd = _timing.Case("dense_fwd", dense_fwd, x, kernel)
    d_fb = _timing.Case("dense_fwdbwd", dense_fwdbwd, x, kernel, ct)
    floor_fwdbwd = traffic_floor_fwdbwd(n_in, n_out)
    pooled = {"dense_fwd": [], "dense_fwdbwd": []}

    def add_dense(samples):
        for name in pooled:
            pooled[name].extend(samples[name])

    add_dense(_timing.run_interleaved([d_fwd, d_fb], **timing))

    configs = []
    for sparsity, k in zip(sparsities, jax.random.split(kw, len(sparsities))):
        label = f"{shape_label(shape)} sparsity {sparsity}"
        weight = SparseWeight.random((n_in, n_out), sparsity, k)
        bcsr = to_bcsr(weight)
        errors = check_sparse(x, weight, bcsr, ct, label)
        s_fwd = _timing.Case("sparse_fwd", sparse_fwd, x, weight)
        s_fb = _timing.Case("sparse_fwdbwd", sparse_fwdbwd, x, weight.values, weight, ct)
        b_fwd = _timing.Case("bcsr_fwd", bcsr_fwd, x, bcsr)
        f_fb = _timing.Case("floor_fwdbwd", floor_fwdbwd, x, weight.values, ct)
        configs.append((sparsity, weight, bcsr, errors, s_fwd, s_fb, b_fwd, f_fb))
    # Every sparsity's cases, with the dense ones, interleaved; the sparsities in rounds.
    all_samples = _timing.run_rounds(
        [[d_fwd, s_fwd, b_fwd, d_fb, s_fb, f_fb] for *_, s_fwd, s_fb, b_fwd, f_fb in configs],
        rounds=rounds, **timing)
    for samples in all_samples:
        add_dense(samples)

    add_dense(_timing.run_interleaved([d_fwd, d_fb], **timing))
    dense = {name: _timing.summarize(s) for name, s in pooled.items()}

    results = []
    for config, samples in zip(configs, all_samples):
        sparsity, weight, bcsr, errors, s_fwd, s_fb, b_fwd, _ = config
        stats = {name: _timing.summarize(s) for name, s in samples.items()}
        dfwd = dense["dense_fwd"]["median_ms"]
        dfb = dense["dense_fwdbwd"]["median_ms"]
        sfwd = stats["sparse_fwd"]["median_ms"]
        sfb = stats["sparse_fwdbwd"]["median_ms"]
        bfwd = stats["bcsr_fwd"]["median_ms"]
        ffb = stats["floor_fwdbwd"]["median_ms"]
        density = weight.nnz / (n_in * n_out)
        target = _targets.linear_fb_target(shape, sparsity)
        fb_target, fb_met_cell, fb_met = _targets.check(target, dfb / sfb, evaluate)
        _, bcsr_met_cell, bcsr_met = _targets.check(
            _targets.linear_bcsr_target(sparsity), bfwd / sfwd, evaluate)
        result = {
            "batch": batch, "in_features": n_in, "out_features": n_out,
            "sparsity": sparsity, "nnz": weight.nnz, "density": density,
            "dense_fwd_ms": dfwd, "sparse_fwd_ms": sfwd, "bcsr_fwd_ms": bfwd,
            "dense_fwdbwd_ms": dfb, "sparse_fwdbwd_ms": sfb,
            # The traffic floor: f+b of a stand-in that moves the layer's data, no products.
            "floor_fwdbwd_ms": ffb, "floor_fwdbwd_speedup": dfb / ffb,
            "fwd_speedup": dfwd / sfwd, "fwdbwd_speedup": dfb / sfb,
            "efficiency": dfb / sfb * density,
            # BCSR forward time / sparse forward time (> 1: the sparse forward is faster).
            "fwd_vs_bcsr": bfwd / sfwd,
            # The f+b speedup target (for 2 threads; None: none here) and whether it
            # and the BCSR target are met (None: no target, or not a 2-thread run).
            "fwdbwd_target": None if target is None else str(target),
            "fwdbwd_target_met": fb_met,
            "beats_bcsr_target_met": bcsr_met,
            # Against only the dense samples interleaved with this sparsity (less
            # affected by slow drifts, fewer samples).
            "fwd_speedup_local": stats["dense_fwd"]["median_ms"] / sfwd,
            "fwdbwd_speedup_local": stats["dense_fwdbwd"]["median_ms"] / sfb,
            "dense_pooled": dense,
            "stats": stats,  # this sparsity's interleaved samples, dense ones included
            "compile_s": {"sparse_fwd": s_fwd.compile_s, "sparse_fwdbwd": s_fb.compile_s,
                          "bcsr_fwd": b_fwd.compile_s,
                          "dense_fwd": d_fwd.compile_s, "dense_fwdbwd": d_fb.compile_s},
            "max_rel_error": errors,
            # The FFI kernels in the compiled sparse fwd+bwd (forward included).
            "fwdbwd_custom_calls": _timing.custom_call_targets(
                sparse_fwdbwd, x, weight.values, weight, ct),
            # The kernel BCSR's forward runs (JAX's native CPU CSR x dense product).
            "bcsr_fwd_custom_calls": _timing.custom_call_targets(bcsr_fwd, x, bcsr),
        }
        table.row([shape_label(shape), sparsity, dfwd, sfwd, dfwd / sfwd, bfwd, bfwd / sfwd,
                   bcsr_met_cell, dfb, sfb, dfb / sfb, dfb / sfb * density, fb_target,
                   fb_met_cell, ffb, dfb / ffb])
        results.append(result)
    return results


def print_summary(results: list[dict]) -> None:
    """How many targets were met (only targets that were evaluated count)."""
    for key, what in (("fwdbwd_target_met", "f+b speedup targets"),
                      ("beats_bcsr_target_met", "forward faster than BCSR (from 90%)")):
        checked = [r[key] for r in results if r[key] is not None]
        if checked:
            print(f"# {what}: {sum(checked)}/{len(checked)} met")


# -- command line ------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.strip().lower().replace("->", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"shape must be BATCHxINxOUT with positive integers, e.g. 256x768x3072, got {text!r}")
    return shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", type=_timing.comma_list(parse_shape), default=None,
                        help="comma-separated BATCHxINxOUT shapes (default: "
                             + ",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES) + ")")
    _timing.add_common_arguments(
        parser, "smoke run: one small shape, two sparsities, few repeats", DEFAULT_SPARSITIES)
    args = parser.parse_args(argv)

    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    sparsities = args.sparsities or (QUICK_SPARSITIES if args.quick else DEFAULT_SPARSITIES)
    repeats, min_time, rounds = _timing.sampling(parser, args)
    default_run = not args.quick and not any(
        (args.shapes, args.sparsities, args.simd, args.tasks_per_call is not None))
    threads, json_path = _timing.prepare_run(parser, args, "linear", default_run)
    timing = {"min_time": min_time, "min_repeats": repeats, "max_repeats": args.max_repeats}
    evaluate = _targets.evaluates(threads)

    info = _timing.machine_info()
    print(f"# sparse_linear vs dense XLA: {_timing.machine_summary(info)}")
    print(f"# medians of >= {repeats} samples (~{min_time:g} s per measurement, in {rounds} "
          f"round{'' if rounds == 1 else 's'} over a shape's sparsities); "
          f"fwd = jit(f); efficiency = f+b speedup x density")
    print("# f+b = jit(value_and_grad(loss)) w.r.t. x and weight, loss = vdot(y, ct): "
          "the forward and both backward products")
    print("# bcsr fwd = jax.experimental.sparse BCSR (out x in) @ x.T; vs bcsr = bcsr fwd / "
          "sparse fwd; beats bcsr: target > 1x from 90%")
    print("# floor f+b = the same f+b with the layer replaced by ops that only move its data "
          "(x, y, dy, dx, one float per nonzero); floor speedup = dense f+b / floor f+b, "
          "an upper bound on the f+b speedup")
    print(_targets.note(threads), flush=True)
    table = _timing.TablePrinter(COLUMNS)
    table.header()

    start = time.perf_counter()
    key = jax.random.key(args.seed)
    results = []
    for shape, k in zip(shapes, jax.random.split(key, len(shapes))):
        results.extend(bench_shape(shape, sparsities, k, timing, rounds, table, evaluate))
    elapsed = time.perf_counter() - start
    print(f"# {len(results)} configurations in {elapsed:.1f} s", flush=True)
    print_summary(results)

    _timing.finish(args, json_path, {
        "benchmark": "linear",
        "machine": info,
        "threads": threads,
        "targets_evaluated": evaluate,
        "config": {"shapes": [list(s) for s in shapes], "sparsities": list(sparsities),
                   "quick": args.quick, "seed": args.seed, "threads": threads,
                   "threads_requested": args.threads,
                   "rtol": RTOL, "atol_scale": ATOL_SCALE, "rounds": rounds, **timing},
        "elapsed_s": elapsed,
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
