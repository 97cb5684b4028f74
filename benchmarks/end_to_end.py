"""Benchmark: whole training steps of sparse models against the same models dense under XLA.

For each model and sparsity it builds the model from plain `nnx.Conv` /
`nnx.Linear` layers (`sparseprop_jax.reference_models`), makes a sparse copy with
`sparsify` (uniform sparsity; the stem and the classifier stay dense), and
times, in one process, with the samples of all variants interleaved:

  * train step: one jitted step (forward, softmax cross-entropy loss,
    gradient, optax update; the state is donated and carried from step to
    step, as in a training loop);
  * inference: the jitted forward pass in eval mode (BatchNorm on running
    averages), reported as images per second;
  * breakdown: the layers that `sparsify` made sparse, each timed alone
    (forward and both gradients, on the input shape it gets in the model,
    summed over the model), and the optax update alone; the rest of the
    step (BatchNorm, activations, pooling, the dense stem and head, the loss)
    is the step time minus those two.

Variants: "dense" is the model as Flax and XLA run it (the ResNet18's max
pool is `sparseprop_jax.max_pool` in every variant); "sparse" the sparsified
copy. For convolutional models there is also "dense*": the dense
model with each of those conv layers computed by whichever of
`lax.conv_general_dilated` and `sparseprop_jax.conv_general_dilated` (XLA's
forward, gradients as matrix products with the input's patches; "im2col" in
the tables) was faster for it alone, and the convs that stay dense in the
sparse model (the stem) computed as there, by the latter. XLA's CPU convolution has
slow paths (e.g. 3x3 convs on 2x2 or 4x4 inputs, and the input gradient of
some strided convs, run tens of times slower than the FLOPs suggest), so
"dense*" is the fairer baseline; both are reported. The sparse variant's
stem is what `sparsify` makes of it by default: the latter too.

Targets (`_targets.py`, 2 threads, batch 32, speedup of the train step over
"dense"): ResNet18 at 95% at least 2x at 64x64 and at 128x128, the
MLP-Mixer at least 3x at 95%. No assertions are made on speed.

    python benchmarks/end_to_end.py --threads 2 | tee benchmarks/results/end_to_end.txt
    python benchmarks/end_to_end.py --quick      # small models, a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _threads  # noqa: E402

if __name__ == "__main__":
    _threads.limit_from_argv()  # --threads N: before jax, which sizes its thread pool once

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _targets  # noqa: E402
import _timing  # noqa: E402
import sparseprop_jax  # noqa: E402
from sparseprop_jax import _model_walk, keep_freed_memory, reference_models  # noqa: E402
from sparseprop_jax.sparsify import densify, sparsify  # noqa: E402

NUM_CLASSES = 100
BATCH = _targets.END_TO_END_BATCH


@dataclasses.dataclass(frozen=True)
class Config:
    """One model of the benchmark."""

    name: str
    family: str  # "resnet18" or "mixer"
    image_size: int
    sparsities: tuple[float, ...]
    quick: bool = False
    # The layers' computation dtype (None: float32); parameters stay float32.
    dtype: Optional[str] = None

    def build(self, seed: int) -> nnx.Module:
        rngs = nnx.Rngs(seed)
        if self.family == "resnet18":
            widths = (8, 16, 32, 64) if self.quick else (64, 128, 256, 512)
            return reference_models.ResNet18(NUM_CLASSES, widths=widths, dtype=self.dtype,
                                             rngs=rngs)
        if self.quick:
            return reference_models.MLPMixer(NUM_CLASSES, image_size=self.image_size,
                                             patch_size=4, dim=32, depth=2, token_hidden=16,
                                             channel_hidden=64, dtype=self.dtype, rngs=rngs)
        return reference_models.MLPMixer(NUM_CLASSES, image_size=self.image_size, patch_size=4,
                                         dim=256, depth=8, token_hidden=128, channel_hidden=1024,
                                         dtype=self.dtype, rngs=rngs)

    @property
    def skip(self) -> tuple[str, ...]:
        return (reference_models.RESNET18_SPARSIFY_SKIP if self.family == "resnet18"
                else reference_models.MLP_MIXER_SPARSIFY_SKIP)

    def optimizer(self) -> optax.GradientTransformation:
        # As the models are usually trained: SGD with momentum for ResNets, AdamW for Mixers.
        if self.family == "resnet18":
            return optax.sgd(0.05, momentum=0.9)
        return optax.adamw(1e-3, weight_decay=1e-4)


CONFIGS = (Config("resnet18 64x64", "resnet18", 64, (0.95,)),
           Config("resnet18 128x128", "resnet18", 128, (0.95,)),
           Config("mixer 32x32", "mixer", 32, (0.9, 0.95)))
QUICK_CONFIGS = (Config("resnet18/8 32x32", "resnet18", 32, (0.95,), quick=True),
                 Config("mixer/32 16x16", "mixer", 16, (0.95,), quick=True))


# -- jitted steps ----------------------------------------------------------------

def cross_entropy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    # The loss in float32 whatever the layers compute in, as mixed precision does.
    logits = model(x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class TrainLoop:
    """A jitted training step whose state (model and optimizer) is carried between calls.

    The step is a pure function of the split nnx state (the fast way to run
    nnx under jit), which it donates, as a training loop would.
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, x, y):
        model = nnx.clone(model)
        model.train()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.graphdef, state = nnx.split((model, optimizer))
        self.state = jax.tree.map(jnp.copy, state)  # donated: must not alias the model's arrays
        self.x, self.y = x, y
        graphdef = self.graphdef

        def step(state, x, y):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        self.step = jax.jit(step, donate_argnums=0)

    def __call__(self) -> jax.Array:
        self.state, loss = self.step(self.state, self.x, self.y)
        return loss


class OptimizerLoop:
    """The optax update alone, on the model's parameters and gradient-shaped arrays."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation):
        params = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))  # donated, as above
        self.grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
        self.state = (params, tx.init(params))

        def update(state, grads):
            params, opt_state = state
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        self.update = jax.jit(update, donate_argnums=0)

    def __call__(self):
        self.state = self.update(self.state, self.grads)
        return self.state


def forward_fn(model: nnx.Module) -> tuple[Callable, Any]:
    """The jitted eval-mode forward pass as `(fn, state)`: `fn(state, x)` gives the logits."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def layer_pass_fn(module: nnx.Module, **call_kwargs) -> tuple[Callable, Any]:
    """A layer's forward and both gradients alone: `fn(params, x, ct)`, and its params.

    `call_kwargs`: what the model passes the layer besides its input.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x, ct):
        return jnp.vdot(nnx.merge(graphdef, params, rest)(x, **call_kwargs), ct)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


# -- one model -------------------------------------------------------------------

@dataclasses.dataclass
class LayerGroup:
    """Layers of one kind, kernel shape, input shape and geometry: timed once, counted n times.

    The sparse layer is timed as the sparse model calls it, which may differ from
    the dense model's call: the reference Mixer applies its sparse token-mixing
    layers along the tokens axis in place, its dense ones between swapaxes.
    """

    key: tuple
    names: list[str]
    paths: list[tuple]  # the same layers as paths in the model (valid in its clones too)
    input_shape: tuple
    dense_module: nnx.Module
    sparse_module: nnx.Module
    sparse_input_shape: tuple
    sparse_kwargs: dict


def sparse_layer_calls(model: nnx.Module, paths: list[tuple], x: jax.Array) -> dict:
    """{path: (input shape, keyword arguments)} of the layers at `paths` as `model(x)` calls them.

    Runs a clone of the model once, eagerly, with the layers' classes' `__call__`
    wrapped to note each call (a stand-in module would fail the model's own
    isinstance checks).
    """
    model = nnx.clone(model)
    modules = {id(_module_at(model, path)): path for path in paths}
    classes = {type(_module_at(model, path)) for path in paths}
    originals = {cls: cls.__call__ for cls in classes}
    calls: dict = {}

    def noting(original):
        def call(self, inputs, *args, **kwargs):
            if id(self) in modules:
                calls.setdefault(modules[id(self)], (tuple(np.shape(inputs)), dict(kwargs)))
            return original(self, inputs, *args, **kwargs)
        return call

    try:
        for cls in classes:
            cls.__call__ = noting(originals[cls])
        model(x)
    finally:
        for cls in classes:
            cls.__call__ = originals[cls]
    return calls


def _module_at(model: nnx.Module, path: tuple) -> nnx.Module:
    for key in path:
        model = model[int(key)] if isinstance(model, nnx.List) else getattr(model, str(key))
    return model


def sparsified_layer_groups(dense: nnx.Module, sparse: nnx.Module, report, x) -> list[LayerGroup]:
    """The layers `sparsify` made sparse, grouped by what their timing depends on."""
    sparse_names = {r.name for r in report if r.is_sparse}
    layers = [layer for layer in _model_walk.nnx_layers(dense) if layer.name in sparse_names]
    _model_walk.nnx_input_shapes(dense, layers, (x,), {})
    sparse_calls = sparse_layer_calls(sparse, [layer.path for layer in layers], x)
    groups: dict[tuple, LayerGroup] = {}
    for layer in layers:
        sparse_shape, sparse_kwargs = sparse_calls[layer.path]
        key = (layer.kind, layer.shape, layer.input_shape, str(layer.strides), str(layer.padding),
               sparse_shape, str(sorted(sparse_kwargs.items())))
        if key in groups:
            groups[key].names.append(layer.name)
            groups[key].paths.append(layer.path)
        else:
            groups[key] = LayerGroup(key, [layer.name], [layer.path], layer.input_shape,
                                     layer.module, _module_at(sparse, layer.path), sparse_shape,
                                     sparse_kwargs)
    return list(groups.values())


def check_variants(variants: dict, x: jax.Array, dtype: Optional[str] = None) -> None:
    """Before timing: "dense*" computes what "dense" does, and the sparse model what its
    densified copy (the same weights as dense arrays, run by XLA) does.

    Compares eval-mode logits, within 1e-3 relative in float32 and 3e-2 in
    bfloat16 (a few roundings to bfloat16 through the model, which XLA and the
    sparse ops make at different places); raises `RuntimeError` on a mismatch.
    """
    def logits(model):
        model = nnx.clone(model)
        model.eval()
        return np.asarray(model(x))

    pairs = [("sparse", logits(variants["sparse"]), logits(densify(variants["sparse"], copy=True)))]
    if "dense*" in variants:
        pairs.append(("dense*", logits(variants["dense*"]), logits(variants["dense"])))
    tol = 3e-2 if dtype == "bfloat16" else 1e-3
    for name, got, want in pairs:
        got, want = got.astype(np.float32), want.astype(np.float32)
        atol = tol * max(1.0, float(np.max(np.abs(want))))
        if not np.allclose(got, want, rtol=tol, atol=atol):
            raise RuntimeError(f"{name} logits differ from the reference by up to "
                               f"{float(np.max(np.abs(got - want))):.3g} (atol {atol:.3g})")


def _fraction(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else float("nan")


def bench_model(config: Config, sparsity: float, *, batch: int = BATCH,
                seed: int = 0, min_time: float = 1.0, repeats: int = 5,
                evaluate: bool = True) -> dict:
    """Times one model at one sparsity; returns the medians and breakdown as a dict.

    Args:
      config: the model.
      sparsity: uniform sparsity of the layers `sparsify` makes sparse.
      batch, seed: the random images and labels (the same for every variant).
      min_time, repeats: each measurement takes about `min_time` seconds, and
        at least `repeats` samples.
      evaluate: whether to check the speedup against the target (2 threads).
    """
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, config.image_size, config.image_size, 3),
                                        dtype=np.float32))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch, dtype=np.int32))
    tx = config.optimizer()
    dense = config.build(seed)
    sparse, report = sparsify(dense, sparsity, skip=config.skip, copy=True)
    groups = sparsified_layer_groups(dense, sparse, report, x)

    # Each sparsified layer alone, dense (lax and, for convs, im2col) and sparse, on
    # activations and cotangents of the model's computation dtype.
    act = jnp.dtype(config.dtype or "float32")
    cases = []
    for i, group in enumerate(groups):
        calls = (("dense", group.dense_module, group.input_shape, {}),
                 ("sparse", group.sparse_module, group.sparse_input_shape, group.sparse_kwargs))
        for variant, module, shape, kwargs in calls:
            lx = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), act)
            ct = jnp.asarray(rng.standard_normal(jax.eval_shape(
                lambda x: module(x, **kwargs), jax.ShapeDtypeStruct(shape, act)).shape,
                dtype=np.float32), act)
            fn, params = layer_pass_fn(module, **kwargs)
            cases.append(_timing.Case(f"layer{i}/{variant}", fn, params, lx, ct))
            if variant == "dense" and isinstance(module, nnx.Conv):
                im2col = nnx.clone(module)
                im2col.conv_general_dilated = sparseprop_jax.conv_general_dilated
                fn, params = layer_pass_fn(im2col)
                cases.append(_timing.Case(f"layer{i}/im2col", fn, params, lx, ct))
    layer_samples = _timing.run_interleaved(cases, min_time=min_time, min_repeats=repeats)
    layer_ms = {name: _timing.median_ms(s) for name, s in layer_samples.items()}

    # dense*: every conv layer whose im2col pass was faster uses im2col in the model.
    convs = any(f"layer{i}/im2col" in layer_ms for i in range(len(groups)))
    variants = {"dense": dense, "sparse": sparse}
    layers_total = {"dense": 0.0, "sparse": 0.0}
    if convs:
        best = nnx.clone(dense)
        fast_conv = sparseprop_jax.conv_general_dilated
        layers_total["dense*"] = 0.0
        for i, group in enumerate(groups):
            dense_ms = layer_ms[f"layer{i}/dense"]
            im2col_ms = layer_ms.get(f"layer{i}/im2col", float("inf"))
            if im2col_ms < dense_ms:
                for path in group.paths:
                    _module_at(best, path).conv_general_dilated = fast_conv
            layers_total["dense*"] += len(group.names) * min(dense_ms, im2col_ms)
        # The convs sparsify keeps dense (the stem) compute as in the sparse model.
        grouped = {tuple(map(str, p)) for g in groups for p in g.paths}
        for path, module in nnx.iter_modules(best):
            if isinstance(module, nnx.Conv) and tuple(map(str, path)) not in grouped:
                module.conv_general_dilated = fast_conv
        variants = {"dense": dense, "dense*": best, "sparse": sparse}
    for i, group in enumerate(groups):
        layers_total["dense"] += len(group.names) * layer_ms[f"layer{i}/dense"]
        layers_total["sparse"] += len(group.names) * layer_ms[f"layer{i}/sparse"]

    check_variants(variants, x, config.dtype)

    # Whole steps, inference and the optimizer alone, interleaved.
    cases = []
    for variant, model in variants.items():
        cases.append(_timing.Case(f"train/{variant}", TrainLoop(model, tx, x, y)))
        fn, state = forward_fn(model)
        cases.append(_timing.Case(f"infer/{variant}", fn, state, x))
        cases.append(_timing.Case(f"optimizer/{variant}", OptimizerLoop(model, tx)))
    samples = _timing.run_interleaved(cases, min_time=min_time, min_repeats=repeats)
    ms = {name: _timing.median_ms(s) for name, s in samples.items()}

    result = {"model": config.name, "family": config.family, "image_size": config.image_size,
              "batch": batch, "sparsity": sparsity, "sparse_layers": len(
                  [r for r in report if r.is_sparse]),
              "layers": [{"names": g.names, "input_shape": list(g.input_shape),
                          "sparse_input_shape": list(g.sparse_input_shape),
                          "sparse_call": {k: repr(v) for k, v in g.sparse_kwargs.items()},
                          **{v: layer_ms.get(f"layer{i}/{v}")
                             for v in ("dense", "im2col", "sparse")}}
                         for i, g in enumerate(groups)],
              "variants": {}}
    for variant in variants:
        step = ms[f"train/{variant}"]
        result["variants"][variant] = {
            "train_ms": step, "train_samples": len(samples[f"train/{variant}"]),
            "infer_ms": ms[f"infer/{variant}"],
            "images_per_s": batch / ms[f"infer/{variant}"] * 1e3,
            "layers_ms": layers_total[variant], "optimizer_ms": ms[f"optimizer/{variant}"],
            "rest_ms": step - layers_total[variant] - ms[f"optimizer/{variant}"]}
    v = result["variants"]
    result["speedup"] = v["dense"]["train_ms"] / v["sparse"]["train_ms"]
    result["speedup_vs_best_dense"] = (v["dense*"]["train_ms"] / v["sparse"]["train_ms"]
                                       if "dense*" in v else None)
    result["inference_speedup"] = v["sparse"]["images_per_s"] / v["dense"]["images_per_s"]
    target = _targets.end_to_end_target(config.family, batch, sparsity, not config.quick)
    result["target"], result["met_cell"], result["met"] = _targets.check(
        target, result["speedup"], evaluate)
    return result


# -- tables ----------------------------------------------------------------------

def print_tables(results: list[dict]) -> None:
    print("\n## Training step (forward, loss, gradient, optax update), median ms")
    table = _timing.TablePrinter([("model", 18, "s"), ("sparsity", 8, ".2f"), ("dense", 9, ".1f"),
                                  ("dense*", 9, ".1f"), ("sparse", 9, ".1f"),
                                  ("speedup", 7, ".2f"), ("vs dense*", 9, ".2f"),
                                  ("target", 6, "s"), ("met", 3, "s")])
    table.header()
    for r in results:
        v = r["variants"]
        table.row([r["model"], r["sparsity"], v["dense"]["train_ms"],
                   v.get("dense*", {}).get("train_ms"), v["sparse"]["train_ms"], r["speedup"],
                   r["speedup_vs_best_dense"], r["target"], r["met_cell"]])

    print("\n## Breakdown of the step, ms (% of the step): the sparsified layers alone, "
          "the optimizer alone, the rest")
    table = _timing.TablePrinter([("model", 18, "s"), ("sparsity", 8, ".2f"), ("variant", 7, "s"),
                                  ("step", 8, ".1f"), ("layers", 8, ".1f"), ("%", 5, ".0f"),
                                  ("optimizer", 9, ".1f"), ("%", 5, ".0f"), ("rest", 8, ".1f"),
                                  ("%", 5, ".0f")])
    table.header()
    for r in results:
        for variant, v in r["variants"].items():
            step = v["train_ms"]
            table.row([r["model"], r["sparsity"], variant, step, v["layers_ms"],
                       _fraction(v["layers_ms"], step), v["optimizer_ms"],
                       _fraction(v["optimizer_ms"], step), v["rest_ms"],
                       _fraction(v["rest_ms"], step)])

    print("\n## Inference (eval-mode forward), images/s")
    table = _timing.TablePrinter([("model", 18, "s"), ("sparsity", 8, ".2f"), ("dense", 9, ".0f"),
                                  ("dense*", 9, ".0f"), ("sparse", 9, ".0f"),
                                  ("speedup", 7, ".2f"), ("vs dense*", 9, ".2f")])
    table.header()
    for r in results:
        v = r["variants"]
        best = v.get("dense*", {}).get("images_per_s")
        table.row([r["model"], r["sparsity"], v["dense"]["images_per_s"], best,
                   v["sparse"]["images_per_s"], r["inference_speedup"],
                   v["sparse"]["images_per_s"] / best if best else None])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated model families to run: resnet18, mixer "
                             "(default: both)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=None,
                        help="minimum samples per measurement (default 5; 2 with --quick)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="target seconds per measurement (default 1.0; 0.01 with --quick)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the results and machine info to this JSON file (default: "
                             "benchmarks/results/end_to_end.json for a full default run on 2 "
                             "threads, -1thread / -Nthreads otherwise)")
    parser.add_argument("--no-json", action="store_true", help="write no JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="run on this many CPUs (set before jax starts; default: all "
                             "usable CPUs); targets are for 2")
    parser.add_argument("--quick", action="store_true",
                        help="small models and few samples: a smoke run, no targets, no JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the layers' computation dtype: bfloat16 is mixed precision "
                             "(float32 parameters and loss), dense and sparse alike")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call sparseprop_jax.keep_freed_memory() first (glibc's malloc "
                             "keeps freed memory: steps stop faulting their buffers in)")
    args = parser.parse_args(argv)
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory: keep_freed_memory() took no effect here")
    error = _threads.check(args.threads)
    if error:
        parser.error(error)
    families = ("resnet18", "mixer")
    chosen = families if args.models is None else tuple(
        m.strip() for m in args.models.split(",") if m.strip())
    unknown = sorted(set(chosen) - set(families))
    if unknown or not chosen:
        parser.error(f"--models: unknown {unknown or chosen}; choose from {', '.join(families)}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 1.0)
    threads = _threads.usable()
    evaluate = _targets.evaluates(threads)
    default_run = (not args.quick and args.models is None and args.batch == BATCH
                   and not args.keep_freed_memory and args.dtype == "float32")
    path = None if args.no_json else (
        args.json or (_targets.default_json_path("end_to_end", threads) if default_run else None))

    info = _timing.machine_info()
    info["keep_freed_memory"] = args.keep_freed_memory
    info["dtype"] = args.dtype
    print(f"# end-to-end training steps, batch {args.batch}: {_timing.machine_summary(info)}"
          + (", malloc keeps freed memory" if args.keep_freed_memory else "")
          + (", mixed precision (bfloat16)" if args.dtype == "bfloat16" else ""))
    print(_targets.note(threads), flush=True)
    results = []
    for config in (QUICK_CONFIGS if args.quick else CONFIGS):
        if config.family not in chosen:
            continue
        if args.dtype != "float32":
            config = dataclasses.replace(config, dtype=args.dtype)
        for sparsity in config.sparsities:
            results.append(bench_model(config, sparsity, batch=args.batch, seed=args.seed,
                                       min_time=args.min_time, repeats=args.repeats,
                                       evaluate=evaluate))
            r = results[-1]
            print(f"# {config.name} at {sparsity:.2f}: {r['sparse_layers']} sparse layers, "
                  f"train step {r['variants']['dense']['train_ms']:.1f} ms dense, "
                  f"{r['variants']['sparse']['train_ms']:.1f} ms sparse", flush=True)
    print_tables(results)
    print("\n# dense*: the dense model with each sparsified conv computed by the faster of "
          "lax.conv_general_dilated and im2col (sparseprop_jax.conv_general_dilated; timed "
          "alone), the stem by the latter as in the sparse model")
    print("# layers: the sparsified layers, each timed alone (forward + input and weight "
          "gradients) and summed; rest = step - layers - optimizer")
    if path is not None:
        _timing.write_json(path, {"benchmark": "end_to_end", "machine": info,
                                  "batch": args.batch, "results": results})
        print(f"# wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
