"""Benchmark: `sparse_conv2d` against XLA's dense convolution, fwd+bwd and forward.

For each 3x3 layer (H x W x C_in -> C_out, stride 1 or 2, padding SAME, NHWC
activations, HWIO kernel) and sparsity it times, in one process:

  * fwd+bwd:  `jit(value_and_grad(loss, argnums=(0, 1)))`, the loss and its
    gradient with respect to the input and the weight (dense: the kernel;
    sparse: `weight.values`), where `loss = vdot(y, ct)` with a fixed random
    cotangent `ct`: the forward convolution plus both backward products, as
    in a training step; dense `lax.conv_general_dilated` against
    `sparse_conv2d` with variant="batch", "width" and "auto" (the table names
    the variant "auto" chose). (Plain `grad` would not do: the gradient of
    this loss does not need `y`, so XLA would drop the forward.)
  * forward:  `jit(f)(x, w)` for dense, "batch" and "width" (skip: --no-fwd).

Before timing a sparsity, every variant's output and both gradients are
checked against dense XLA (HIGHEST precision) on the masked kernel, so a wrong
result is never timed. `--per-pass` adds a table splitting the time into the
forward (`jit(f)`), the input gradient alone and the weight gradient alone.
Those two are plain `jit(grad(loss))` with respect to x alone / the kernel
(values) alone, so XLA drops the forward from them and each runs just its one
backward product; the table also repeats the full fwd+bwd.

Dense and sparse samples are interleaved; dense samples are pooled per layer
as in `linear.py` (a dense-only block at the start, the samples taken
alongside every sparsity, a dense-only block at the end), and a layer's
sparsities are measured in rounds (`--rounds`), as there.

After the table, a summary per sparsity gives the geometric mean over the
layers of the auto f+b speedup and the slowest layer, with the targets (see
`_targets.py`; for the seven default layers at batch 32 on 2 threads). Run
`python benchmarks/conv2d.py --help` for the options. No assertions on speed
are made; the exit status does not depend on the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _threads  # noqa: E402

if __name__ == "__main__":
    _threads.limit_from_argv()  # --threads N: before jax, which sizes its thread pool once

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import _targets  # noqa: E402
import _timing  # noqa: E402
from sparseprop_jax import SparseWeight, sparse_conv2d  # noqa: E402

VARIANTS = ("batch", "width")
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
KSIZE = 3

RTOL = 1e-3
ATOL_SCALE = 2e-3  # atol = ATOL_SCALE * max|reference|


@dataclasses.dataclass(frozen=True)
class Layer:
    h: int
    w: int
    cin: int
    cout: int
    stride: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output spatial size under SAME padding."""
        return -(-self.h // self.stride), -(-self.w // self.stride)

    @property
    def label(self) -> str:
        text = f"{self.h}x{self.w}x{self.cin}->{self.cout}"
        return text if self.stride == 1 else f"{text}/{self.stride}"

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (KSIZE, KSIZE, self.cin, self.cout)


# ResNet18's 3x3 layers (network order): each stage's stride-1 conv, then the
# stride-2 transition into the next stage.
DEFAULT_LAYERS = (Layer(56, 56, 64, 64), Layer(56, 56, 64, 128, 2),
                  Layer(28, 28, 128, 128), Layer(28, 28, 128, 256, 2),
                  Layer(14, 14, 256, 256), Layer(14, 14, 256, 512, 2),
                  Layer(7, 7, 512, 512))
DEFAULT_SPARSITIES = (0.9, 0.95, 0.98)
DEFAULT_BATCH = 32
QUICK_LAYERS = (Layer(14, 14, 64, 64), Layer(14, 14, 64, 128, 2))
QUICK_SPARSITIES = (0.95,)
QUICK_BATCH = 8


# -- the functions timed -----------------------------------------------------

def dense_conv(x, kernel, stride, precision=None):
    return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                    dimension_numbers=DIMENSION_NUMBERS, precision=precision)


@functools.lru_cache(maxsize=None)
def dense_fns(stride: int) -> dict:
    """Jitted dense functions: fwd(x, k); fb, dx, dw (x, k, ct).

    fb is `value_and_grad` (forward kept); dx and dw are plain `grad` of one
    argument (XLA drops the forward, leaving one backward product each).
    """
    def loss(x, kernel, ct):
        return jnp.vdot(dense_conv(x, kernel, stride), ct)

    return {"fwd": jax.jit(lambda x, kernel: dense_conv(x, kernel, stride)),
            "fb": jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
            "dx": jax.jit(jax.grad(loss, argnums=0)),
            "dw": jax.jit(jax.grad(loss, argnums=1))}


@functools.lru_cache(maxsize=None)
def sparse_fns(variant: str, stride: int) -> dict:
    """Jitted sparse functions: fwd(x, weight); fb, dx, dw (x, values, weight, ct).

    As `dense_fns`: fb is `value_and_grad`, dx and dw plain `grad`.
    """
    def conv(x, weight):
        return sparse_conv2d(x, weight, strides=stride, padding="SAME", variant=variant)

    def loss(x, values, weight, ct):
        return jnp.vdot(conv(x, weight.with_values(values)), ct)

    return {"fwd": jax.jit(conv),
            "fb": jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
            "dx": jax.jit(jax.grad(loss, argnums=0)),
            "dw": jax.jit(jax.grad(loss, argnums=1))}


def auto_variant(layer: Layer, batch: int) -> str:
    """The variant that variant="auto" runs for this layer (the library's rule)."""
    from sparseprop_jax import conv, conv_variants

    pads = conv.explicit_pads(conv.parse_padding("benchmark", "SAME"), (layer.h, layer.w),
                              (KSIZE, KSIZE), layer.stride)
    geometry = conv.ConvGeometry("batch", batch, layer.h, layer.w, layer.kernel_shape,
                                 layer.stride, pads)
    return conv_variants.auto_variant(geometry)


# -- correctness -------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=3)
def _reference(x, weight, ct, stride):
    """Dense XLA output and gradients (x, values) for the masked kernel."""
    kernel = weight.to_dense()
    y, vjp = jax.vjp(
        lambda x, k: dense_conv(x, k, stride, precision=lax.Precision.HIGHEST), x, kernel)
    dx, dkernel = vjp(ct)
    return y, dx, SparseWeight.gather(dkernel, weight.pattern).values


def check_sparse(layer: Layer, x, weight, ct, label: str) -> dict:
    """Raises SystemExit if any variant's output or gradients disagree with dense XLA.

    Returns the worst error of each (by kernel), relative to the reference's
    largest entry.
    """
    y_ref, dx_ref, dv_ref = (np.asarray(a) for a in _reference(x, weight, ct, layer.stride))
    expected = (x.shape[0], *layer.out_hw, layer.cout)
    if y_ref.shape != expected:
        raise SystemExit(f"{label}: dense output shape {y_ref.shape}, expected {expected}")
    errors = {}
    for kernel in (*VARIANTS, "auto"):
        fns = sparse_fns(kernel, layer.stride)
        y = np.asarray(fns["fwd"](x, weight))
        _, grads = fns["fb"](x, weight.values, weight, ct)
        dx, dv = (np.asarray(a) for a in grads)
        errors[kernel] = {}
        for name, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dvalues", dv, dv_ref)):
            scale = float(np.max(np.abs(ref))) or 1.0
            if got.shape != ref.shape or not np.allclose(got, ref, rtol=RTOL,
                                                         atol=ATOL_SCALE * scale):
                worst = (float(np.max(np.abs(got - ref))) if got.shape == ref.shape
                         else float("nan"))
                raise SystemExit(f"{label}: sparse ({kernel}) {name} disagrees with dense XLA "
                                 f"(shape {got.shape} vs {ref.shape}, max abs error {worst:.3g}, "
                                 f"reference scale {scale:.3g}); not timing a wrong result")
            errors[kernel][name] = float(np.max(np.abs(got - ref))) / scale
    return errors


# -- the benchmark -----------------------------------------------------------

def make_inputs(layer: Layer, batch: int, key):
    kx, kk, kc, kw = jax.random.split(key, 4)
    x = jax.random.normal(kx, (batch, layer.h, layer.w, layer.cin), jnp.float32)
    kernel = jax.nn.initializers.lecun_normal()(kk, layer.kernel_shape, jnp.float32)
    ct = jax.random.normal(kc, (batch, *layer.out_hw, layer.cout), jnp.float32)
    return x, kernel, ct, kw


def bench_layer(layer: Layer, sparsities, batch: int, key, timing: dict, rounds: int, opts,
                table: _timing.TablePrinter, evaluate: bool) -> list[dict]:
    """Times one layer at every sparsity; prints and returns a row per sparsity.

    `rounds`: the sparsities' samples are taken in this many rounds
    (`_timing.run_rounds`). `evaluate`: whether the targets apply (a run on 2
    threads).
    """
    x, kernel, ct, kw = make_inputs(layer, batch, key)
    dense = dense_fns(layer.stride)
    d_fb = _timing.Case("dense_fb", dense["fb"], x, kernel, ct)
    dense_cases = [d_fb]
    if opts.fwd:
        dense_cases.append(_timing.Case("dense_fwd", dense["fwd"], x, kernel))
    pooled = {c.name: [] for c in dense_cases}

    def add_dense(samples):
        for name in pooled:
            pooled[name].extend(samples[name])

    add_dense(_timing.run_interleaved(dense_cases, **timing))
    chosen = auto_variant(layer, batch)

    configs = []
    for sparsity, k in zip(sparsities, jax.random.split(kw, len(sparsities))):
        label = f"{layer.label} sparsity {sparsity}"
        weight = SparseWeight.random(layer.kernel_shape, sparsity, k)
        errors = check_sparse(layer, x, weight, ct, label)
        cases = list(dense_cases)
        for variant in (*VARIANTS, "auto"):
            fns = sparse_fns(variant, layer.stride)
            cases.append(_timing.Case(f"{variant}_fb", fns["fb"], x, weight.values, weight, ct))
            if opts.fwd and variant != "auto":
                cases.append(_timing.Case(f"{variant}_fwd", fns["fwd"], x, weight))
        configs.append((sparsity, weight, errors, cases))
    # Every sparsity's cases, with the dense ones, interleaved; the sparsities in rounds.
    all_samples = _timing.run_rounds([cases for *_, cases in configs], rounds=rounds, **timing)
    for samples in all_samples:
        add_dense(samples)

    add_dense(_timing.run_interleaved(dense_cases, **timing))
    dense_stats = {name: _timing.summarize(s) for name, s in pooled.items()}

    results = []
    for (sparsity, weight, errors, cases), samples in zip(configs, all_samples):
        stats = {name: _timing.summarize(s) for name, s in samples.items()}
        med = {name: s["median_ms"] for name, s in stats.items()}
        dfb = dense_stats["dense_fb"]["median_ms"]
        best = min(VARIANTS, key=lambda v: med[f"{v}_fb"])
        density = weight.nnz / math.prod(layer.kernel_shape)
        auto_x = dfb / med["auto_fb"]
        target = _targets.conv_layer_target(layer.label, batch, sparsity)
        target_cell, met_cell, met = _targets.check(target, auto_x, evaluate)
        row = {
            "layer": layer.label, "h": layer.h, "w": layer.w, "in_channels": layer.cin,
            "out_channels": layer.cout, "stride": layer.stride, "out_hw": list(layer.out_hw),
            "batch": batch, "sparsity": sparsity, "nnz": weight.nnz,
            "density": density,
            "dense_fb_ms": dfb, "batch_fb_ms": med["batch_fb"], "width_fb_ms": med["width_fb"],
            "auto_fb_ms": med["auto_fb"], "auto_variant": chosen, "best_variant": best,
            "best_fb_speedup": dfb / med[f"{best}_fb"], "auto_fb_speedup": auto_x,
            "auto_efficiency": auto_x * density,
            # This layer's own target (auto f+b speedup, for 2 threads; None: none here)
            # and whether it is met (None: no target, or not a 2-thread run).
            "auto_fb_target": None if target is None else str(target),
            "auto_fb_target_met": met,
            # Against only the dense samples interleaved with this sparsity.
            "best_fb_speedup_local": med["dense_fb"] / med[f"{best}_fb"],
        }
        cells = [layer.label, "x".join(map(str, layer.out_hw)), sparsity, dfb,
                 med["batch_fb"], med["width_fb"], med["auto_fb"], chosen, best,
                 dfb / med[f"{best}_fb"], auto_x, auto_x * density, target_cell, met_cell]
        if opts.fwd:
            dfwd = dense_stats["dense_fwd"]["median_ms"]
            best_fwd = min(VARIANTS, key=lambda v: med[f"{v}_fwd"])
            row.update({"dense_fwd_ms": dfwd, "batch_fwd_ms": med["batch_fwd"],
                        "width_fwd_ms": med["width_fwd"], "best_fwd_variant": best_fwd,
                        "best_fwd_speedup": dfwd / med[f"{best_fwd}_fwd"]})
            cells += [dfwd, med["batch_fwd"], med["width_fwd"], dfwd / med[f"{best_fwd}_fwd"]]
        row.update({
            "dense_pooled": dense_stats,
            "stats": stats,  # this sparsity's interleaved samples, dense ones included
            "compile_s": {c.name: c.compile_s for c in cases},
            "max_rel_error": errors,
            "fb_custom_calls": {
                variant: _timing.custom_call_targets(sparse_fns(variant, layer.stride)["fb"],
                                                     x, weight.values, weight, ct)
                for variant in VARIANTS},
        })
        table.row(cells)
        results.append(row)
    return results


def summarize_sparsities(results: list[dict], layers, batch: int, sparsities,
                         evaluate: bool) -> list[dict]:
    """Per sparsity: geomean over the layers of the f+b speedups, the slowest layer, targets.

    Prints a table and returns its rows (for the JSON output).
    """
    labels = [layer.label for layer in layers]
    table = _timing.TablePrinter([
        ("sparsity", 8, ".2f"), ("layers", 6, "d"), ("geomean auto x", 14, ".2f"),
        ("geomean best x", 14, ".2f"), ("target", 6, "s"), ("met", 3, "s"),
        ("min auto x", 10, ".2f"), ("slowest layer", 16, "s"), ("min target", 10, "s"),
        ("min met", 7, "s")])
    print(f"\n# per sparsity, over the {len(labels)} layers: geometric mean of the f+b speedups "
          f"(auto, and best of batch/width) and the smallest auto f+b speedup")
    print("# targets: geomean auto x (seven default layers, batch 32); min target = no layer "
          "slower than dense")
    table.header()
    summary = []
    for sparsity in sparsities:
        rows = [r for r in results if math.isclose(r["sparsity"], sparsity, abs_tol=1e-12)]
        geo_auto = _targets.geomean(r["auto_fb_speedup"] for r in rows)
        geo_best = _targets.geomean(r["best_fb_speedup"] for r in rows)
        slowest = min(rows, key=lambda r: r["auto_fb_speedup"])
        geo_target = _targets.conv_geomean_target(labels, batch, sparsity)
        min_target = _targets.conv_min_target(labels, batch, sparsity)
        geo_cells = _targets.check(geo_target, geo_auto, evaluate)
        min_cells = _targets.check(min_target, slowest["auto_fb_speedup"], evaluate)
        table.row([sparsity, len(rows), geo_auto, geo_best, geo_cells[0], geo_cells[1],
                   slowest["auto_fb_speedup"], slowest["layer"], min_cells[0], min_cells[1]])
        summary.append({
            "sparsity": sparsity, "layers": len(rows),
            "geomean_auto_fb_speedup": geo_auto, "geomean_best_fb_speedup": geo_best,
            "min_auto_fb_speedup": slowest["auto_fb_speedup"], "slowest_layer": slowest["layer"],
            "geomean_target": None if geo_target is None else str(geo_target),
            "geomean_target_met": geo_cells[2],
            "min_target": None if min_target is None else str(min_target),
            "min_target_met": min_cells[2],
        })
    return summary


PASSES = ("fwd", "dx", "dw", "fb")


def bench_passes(layer: Layer, sparsities, index: int, batch: int, key,
                 timing: dict) -> list[dict]:
    """Forward, input grad alone, weight grad alone, fwd+bwd: dense, batch, width.

    Same inputs and weight as `bench_layer` for `sparsities[index]`.
    """
    x, kernel, ct, kw = make_inputs(layer, batch, key)
    sparsity = sparsities[index]
    weight = SparseWeight.random(layer.kernel_shape, sparsity,
                                 jax.random.split(kw, len(sparsities))[index])
    dense = dense_fns(layer.stride)
    cases = [_timing.Case("dense_fwd", dense["fwd"], x, kernel)]
    cases += [_timing.Case(f"dense_{p}", dense[p], x, kernel, ct) for p in PASSES[1:]]
    custom_calls = {}
    for variant in VARIANTS:
        fns = sparse_fns(variant, layer.stride)
        cases.append(_timing.Case(f"{variant}_fwd", fns["fwd"], x, weight))
        cases += [_timing.Case(f"{variant}_{p}", fns[p], x, weight.values, weight, ct)
                  for p in PASSES[1:]]
        custom_calls[variant] = {
            p: _timing.custom_call_targets(fns[p], x, weight.values, weight, ct)
            for p in PASSES[1:]}
    samples = _timing.run_interleaved(cases, **timing)
    results = []
    for who in ("dense", *VARIANTS):
        med = {p: _timing.median_ms(samples[f"{who}_{p}"]) for p in PASSES}
        results.append({"layer": layer.label, "batch": batch, "sparsity": sparsity,
                        "variant": who, **{f"{p}_ms": med[p] for p in PASSES},
                        "custom_calls": custom_calls.get(who),
                        "stats": {p: _timing.summarize(samples[f"{who}_{p}"]) for p in PASSES}})
    return results


# -- command line ------------------------------------------------------------

_LAYER_RE = re.compile(r"^(\d+)x(\d+)x(\d+)->(\d+)(?:/(\d+))?$")


def parse_layer(text: str) -> Layer:
    match = _LAYER_RE.match(text.strip().lower().replace(" ", ""))
    if not match:
        raise argparse.ArgumentTypeError(
            f"layer must be HxWxCIN->COUT[/STRIDE], e.g. 56x56x64->128/2, got {text!r}")
    h, w, cin, cout, stride = match.groups()
    layer = Layer(int(h), int(w), int(cin), int(cout), int(stride or 1))
    if min(layer.h, layer.w, layer.cin, layer.cout, layer.stride) < 1:
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return layer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", type=_timing.comma_list(parse_layer), default=None,
                        help="comma-separated 3x3 layers HxWxCIN->COUT[/STRIDE], padding SAME "
                             "(default: " + ",".join(layer.label for layer in DEFAULT_LAYERS) + ")")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default {DEFAULT_BATCH}; {QUICK_BATCH} with --quick)")
    parser.add_argument("--no-fwd", dest="fwd", action="store_false",
                        help="skip the forward-only columns")
    parser.add_argument("--per-pass", action="store_true",
                        help="also time forward / input grad alone / weight grad alone "
                             "(plain grad, no forward) for every layer and sparsity "
                             "(a second table)")
    _timing.add_common_arguments(
        parser, "smoke run: two small layers, batch 8, one sparsity, few repeats",
        DEFAULT_SPARSITIES)
    args = parser.parse_args(argv)

    layers = args.layers or (QUICK_LAYERS if args.quick else DEFAULT_LAYERS)
    sparsities = args.sparsities or (QUICK_SPARSITIES if args.quick else DEFAULT_SPARSITIES)
    batch = args.batch if args.batch is not None else (QUICK_BATCH if args.quick
                                                       else DEFAULT_BATCH)
    repeats, min_time, rounds = _timing.sampling(parser, args)
    if batch < 1:
        parser.error("need --batch >= 1")
    default_run = not args.quick and not any(
        (args.layers, args.sparsities, args.batch is not None, not args.fwd, args.simd,
         args.tasks_per_call is not None))
    threads, json_path = _timing.prepare_run(parser, args, "conv2d", default_run)
    timing = {"min_time": min_time, "min_repeats": repeats, "max_repeats": args.max_repeats}
    evaluate = _targets.evaluates(threads)

    info = _timing.machine_info()
    print(f"# sparse_conv2d vs dense XLA conv: {_timing.machine_summary(info)}")
    print(f"# 3x3 NHWC/HWIO, padding SAME, batch {batch}; medians of >= {repeats} samples "
          f"(~{min_time:g} s per measurement, in {rounds} round{'' if rounds == 1 else 's'} "
          f"over a layer's sparsities)")
    print("# f+b = jit(value_and_grad(loss)) w.r.t. x and weight, loss = vdot(y, ct): the "
          "forward and both backward products; fwd = jit(f)")
    print("# speedup (x) = dense / sparse; best = faster of batch/width; auto eff = auto x x "
          "density; target = this layer's (auto x)")
    print(_targets.note(threads), flush=True)
    columns = [("layer", 16, "s"), ("out", 5, "s"), ("sparsity", 8, ".2f"),
               ("dense f+b", 9, ".2f"), ("batch f+b", 9, ".2f"), ("width f+b", 9, ".2f"),
               ("auto f+b", 8, ".2f"), ("auto", 5, "s"), ("best", 5, "s"),
               ("best x", 6, ".2f"), ("auto x", 6, ".2f"), ("auto eff", 8, ".2f"),
               ("target", 6, "s"), ("met", 3, "s")]
    if args.fwd:
        columns += [("dense fwd", 9, ".2f"), ("batch fwd", 9, ".2f"), ("width fwd", 9, ".2f"),
                    ("fwd best x", 10, ".2f")]
    table = _timing.TablePrinter(columns)
    table.header()

    start = time.perf_counter()
    key = jax.random.key(args.seed)
    layer_keys = jax.random.split(key, len(layers))
    results = []
    for layer, k in zip(layers, layer_keys):
        results.extend(bench_layer(layer, sparsities, batch, k, timing, rounds, args, table,
                                   evaluate))
    elapsed = time.perf_counter() - start
    print(f"# {len(results)} configurations in {elapsed:.1f} s (times in ms)", flush=True)
    summary = summarize_sparsities(results, layers, batch, sparsities, evaluate)

    passes = []
    if args.per_pass:
        print("\n# per pass: fwd = jit(f); dx = jit(grad) w.r.t. x alone, dW = jit(grad) "
              "w.r.t. the kernel / values alone")
        print("# (plain grad: XLA drops the forward, so each is one backward product); "
              "sum = fwd + dx + dW; f+b = the value_and_grad f+b above, timed again here",
              flush=True)
        pass_table = _timing.TablePrinter([
            ("layer", 16, "s"), ("sparsity", 8, ".2f"), ("variant", 7, "s"),
            ("fwd ms", 8, ".2f"), ("dx ms", 8, ".2f"), ("dW ms", 8, ".2f"),
            ("sum ms", 8, ".2f"), ("f+b ms", 8, ".2f")])
        pass_table.header()
        for layer, k in zip(layers, layer_keys):
            for index, sparsity in enumerate(sparsities):
                rows = bench_passes(layer, sparsities, index, batch, k, timing)
                for r in rows:
                    pass_table.row([layer.label, sparsity, r["variant"], r["fwd_ms"],
                                    r["dx_ms"], r["dw_ms"],
                                    r["fwd_ms"] + r["dx_ms"] + r["dw_ms"], r["fb_ms"]])
                passes.extend(rows)
        elapsed = time.perf_counter() - start
        print(f"# total {elapsed:.1f} s", flush=True)

    _timing.finish(args, json_path, {
        "benchmark": "conv2d",
        "machine": info,
        "threads": threads,
        "targets_evaluated": evaluate,
        "config": {"layers": [dataclasses.asdict(layer) for layer in layers],
                   "sparsities": list(sparsities), "batch": batch, "kernel_size": KSIZE,
                   "padding": "SAME", "quick": args.quick, "seed": args.seed,
                   "threads": threads, "threads_requested": args.threads,
                   "fwd": args.fwd, "fwdbwd": "value_and_grad",
                   "rtol": RTOL, "atol_scale": ATOL_SCALE, "rounds": rounds, **timing},
        "elapsed_s": elapsed,
        "results": results,
        "summary": summary,
        "per_pass": passes,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
