"""Runs the data-parallel checks on 4 forced host devices and prints them as JSON.

Started by tests/test_sharding.py in a subprocess: the device count is fixed
when jax initialises its backend, and the main pytest process keeps 1 device.

For a SparseDense MLP and a SparseConv model it computes the loss and the
gradients of one training step on one device (the reference) and with the
batch split over 4 devices: under `jit` with `NamedSharding` (auto and
explicit mesh axes) and under `shard_map` (with and without `check_vma`). It
also records what the compiled HLO of the jitted steps contains, and, as
controls, what happens with the package's custom calls issued the naive way
(a plain `jax.ffi.ffi_call` with a `ShapeDtypeStruct` result).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sparseprop_jax import _ffi  # noqa: E402
from sparseprop_jax.nnx import SparseConv, SparseDense  # noqa: E402

N_DEVICES = 4


class MLP(nnx.Module):
    # On [batch, 3, 12]: both linear targets, batch-major and feature-major
    # (the batch in dim 0 of [batch, 3, 40], as a Mixer's token mixing has it).
    def __init__(self, rngs):
        self.l1 = SparseDense(12, 40, sparsity=0.8, rngs=rngs)
        self.mix = SparseDense(3, 6, sparsity=0.5, rngs=rngs)
        self.l2 = SparseDense(40, 5, sparsity=0.7, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.mix(jax.nn.relu(self.l1(x)), feature_axis=-2))
        return self.l2(h.mean(axis=1))


class ConvNet(nnx.Module):
    # Both conv kernels, whose custom calls keep the batch in different dims.
    def __init__(self, rngs):
        self.c1 = SparseConv(3, 8, (3, 3), sparsity=0.6, conv_variant="batch", rngs=rngs)
        self.c2 = SparseConv(8, 6, (3, 3), strides=2, sparsity=0.5, conv_variant="width",
                             rngs=rngs)
        self.head = SparseDense(6, 5, sparsity=0.5, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x))
        h = jax.nn.relu(self.c2(h))
        return self.head(h.mean(axis=(1, 2)))


def _setup(name):
    rng = np.random.default_rng(0)
    if name == "dense":
        model = MLP(nnx.Rngs(0))
        x = rng.standard_normal((16, 3, 12)).astype(np.float32)
    else:
        model = ConvNet(nnx.Rngs(0))
        x = rng.standard_normal((12, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 5, x.shape[0]).astype(np.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnz = [int(v.shape[0]) for path, v in jax.tree_util.tree_leaves_with_path(params)
           if "values" in jax.tree_util.keystr(path)]

    def loss_sum(params, rest, x, labels):  # summed over the (local) batch
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    return params, rest, x, labels, loss_sum, nnz


def _err(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / (1.0 + np.max(np.abs(v))))
               for u, v in zip(a, b))


def _collectives(hlo: str, nnz):
    lines = [ln for ln in hlo.splitlines() if "=" in ln]
    ops = [ln.split("=", 1)[1] for ln in lines]
    all_reduce = [op.split("all-reduce(")[0] for op in ops if " all-reduce(" in op]
    local = []
    for op in ops:
        if "custom-call(" in op and "sparseprop_" in op:
            local.append(op.split("custom-call(")[0].strip())
    return dict(
        all_gather=sum(" all-gather(" in op or "all-gather-start(" in op for op in ops),
        all_to_all=sum(" all-to-all(" in op for op in ops),
        # How often each layer's values gradient, f32[nnz], is all-reduced.
        values_all_reduced=[sum(len(re.findall(rf"f32\[{n}\]", t)) for t in all_reduce)
                            for n in nnz],
        custom_call_results=local)


def _naive_call(target, shapes, *operands, **attrs):
    """How the package issued its calls before: results declared with a bare ShapeDtypeStruct."""
    if shapes and isinstance(shapes[0], tuple):
        result = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    else:
        result = jax.ShapeDtypeStruct(shapes, jnp.float32)
    return jax.ffi.ffi_call(target.name, result, vmap_method="expand_dims")(*operands, **attrs)


@contextlib.contextmanager
def _naive():
    call, match = _ffi.call, _ffi.match_vma
    _ffi.call, _ffi.match_vma = _naive_call, (lambda *arrays: arrays)
    try:
        yield
    finally:
        _ffi.call, _ffi.match_vma = call, match


def run(name):
    params, rest, x, labels, loss_sum, nnz = _setup(name)
    batch = x.shape[0]

    def loss(params, rest, x, labels):
        return loss_sum(params, rest, x, labels) / batch

    out = {"nnz": nnz}
    ref = jax.jit(jax.value_and_grad(loss))(params, rest, x, labels)

    # -- jit with the batch sharded, the parameters replicated --------------------
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(axis_type,))
        batch_sharded = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        args = (jax.device_put(params, replicated), jax.device_put(rest, replicated),
                jax.device_put(x, batch_sharded), jax.device_put(labels, batch_sharded))
        step = jax.jit(jax.value_and_grad(loss))
        with jax.set_mesh(mesh):
            got = step(*args)
            hlo = step.lower(*args).compile().as_text()
        key = f"jit_{axis_type.name.lower()}"
        out[key] = dict(err=_err(got, ref), **_collectives(hlo, nnz))
        if axis_type == AxisType.Auto:
            with _naive():  # control: the unpartitioned custom calls
                hlo = jax.jit(jax.value_and_grad(loss)).lower(*args).compile().as_text()
            out["jit_naive"] = _collectives(hlo, nnz)

    # -- shard_map -----------------------------------------------------------------
    mesh = jax.make_mesh((N_DEVICES,), ("data",))
    specs = (P(), P(), P("data"), P("data"))
    args = (params, rest, jax.device_put(x, NamedSharding(mesh, P("data"))),
            jax.device_put(labels, NamedSharding(mesh, P("data"))))

    def global_loss(params, rest, x, labels):  # check_vma: JAX all-reduces the grads
        return jax.lax.psum(loss_sum(params, rest, x, labels), "data") / batch

    def vma_step(*a):
        return jax.value_and_grad(global_loss)(*a)

    def manual_step(*a):  # no check_vma: the user all-reduces the local gradients
        value, grads = jax.value_and_grad(loss_sum)(*a)
        return jax.tree.map(lambda t: jax.lax.psum(t, "data") / batch, (value, grads))

    for key, fn, check in (("shard_map", vma_step, True),
                           ("shard_map_no_check_vma", manual_step, False),
                           ):
        step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=(P(), P()),
                                     check_vma=check))
        out[key] = dict(err=_err(step(*args), ref),
                        **_collectives(step.lower(*args).compile().as_text(), nnz))
    with _naive():  # control: the trap of DESIGN.md, results declared device-invariant
        step = jax.jit(jax.shard_map(vma_step, mesh=mesh, in_specs=specs,
                                     out_specs=(P(), P())))
        try:
            out["shard_map_naive"] = dict(err=_err(step(*args), ref))
        except Exception as err:  # noqa: BLE001 (reported to the test)
            out["shard_map_naive"] = dict(error=f"{type(err).__name__}: {err}"[:300])
    return out


if __name__ == "__main__":
    names = sys.argv[1:] or ["dense", "conv"]
    print(json.dumps({name: run(name) for name in names}))
