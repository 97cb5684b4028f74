"""sparsify / densify of whole nnx and linen models, and sparse transfer (fine-tuning)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseprop_jax import sparsify as sparsify_module
from sparseprop_jax.distribution import erk_densities, magnitude_masks
from sparseprop_jax.linen import PATTERN_COLLECTION
from sparseprop_jax.masks import to_masks
from sparseprop_jax.nnx import SparseConv, SparseDense
from sparseprop_jax.sparsify import densify, sparse_apply, sparsify

X_IMG = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32)


class CNN(nnx.Module):
    """A stem conv, batch norm, two convs in a list, a linear head."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)  # batch norm follows
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs),
                                nnx.Conv(16, 16, (3, 3), padding="VALID", rngs=rngs)])
        self.head = nnx.Linear(16 * 2 * 2, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.head(x.reshape(x.shape[0], -1))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(24)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="head")(x)


def _kernels(model):
    return {"/".join(map(str, p)): np.asarray(m.kernel[...]) for p, m in nnx.iter_modules(model)
            if isinstance(m, (nnx.Linear, nnx.Conv))}


def _sparse_kernels(model):
    return {"/".join(map(str, p)): np.asarray(m.weight.to_dense())
            for p, m in nnx.iter_modules(model) if isinstance(m, (SparseDense, SparseConv))}


def _linen_setup():
    module = LinenCNN()
    variables = module.init(jax.random.key(0), X_IMG)
    return module, variables


# -- distributions ------------------------------------------------------------
def test_uniform_hits_each_layer_exactly():
    model, report = sparsify(CNN(nnx.Rngs(0)), 0.85, skip="stem")
    for name, kernel in _sparse_kernels(model).items():
        assert np.count_nonzero(kernel) == kernel.size - round(0.85 * kernel.size), name
        assert report[name].nnz == np.count_nonzero(kernel)
    assert isinstance(model.stem, nnx.Conv)


def test_global_hits_target_within_one_weight_with_one_threshold():
    dense = _kernels(CNN(nnx.Rngs(0)))
    model, _ = sparsify(CNN(nnx.Rngs(0)), 0.9, distribution="global", skip=["stem"])
    sparse = _sparse_kernels(model)
    assert set(sparse) == set(dense) - {"stem"}
    total = sum(k.size for k in sparse.values())
    nnz = sum(np.count_nonzero(k) for k in sparse.values())
    assert abs(nnz - (total - round(0.9 * total))) <= 1
    kept = np.concatenate([np.abs(k[k != 0]) for k in sparse.values()])
    pruned = np.concatenate([np.abs(dense[n][sparse[n] == 0]) for n in sparse])
    assert kept.min() >= pruned.max()  # one threshold across layers
    for name, kernel in sparse.items():  # kept entries are the original weights
        np.testing.assert_array_equal(kernel[kernel != 0], dense[name][kernel != 0])


def test_erk_hits_target_and_follows_erk_densities():
    model, report = sparsify(CNN(nnx.Rngs(0)), 0.9, distribution="erk", skip="stem")
    sparse = _sparse_kernels(model)
    names = sorted(sparse)
    total = sum(sparse[n].size for n in names)
    nnz = sum(np.count_nonzero(sparse[n]) for n in names)
    assert abs(nnz - 0.1 * total) <= len(names)
    expected = erk_densities([sparse[n].shape for n in names], 0.9)
    for name, density in zip(names, expected):
        assert np.count_nonzero(sparse[name]) == min(sparse[name].size,
                                                     round(density * sparse[name].size))
    # ERK gives the small layer more density than the big ones.
    assert report["head"].sparsity < report["blocks/1"].sparsity


def test_erk_densities_cap_small_layers_at_one():
    densities = erk_densities([(2, 2), (400, 400)], 0.5)
    assert densities[0] == 1.0
    assert 4 + densities[1] * 160000 == pytest.approx(0.5 * 160004)


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_linen_distributions_hit_target(distribution):
    module, variables = _linen_setup()
    new, report = sparsify(module, 0.8, variables=variables, inputs=X_IMG,
                           distribution=distribution, skip="stem")
    assert "kernel" in new["params"]["stem"]
    sparse = [r for r in report if r.is_sparse]
    assert [r.name for r in sparse] == ["Conv_0", "Dense_0", "head"]
    for r in sparse:
        assert new["params"][r.name]["values"].shape == (r.nnz,)
        assert new[PATTERN_COLLECTION][r.name]["indices"].shape == (r.nnz,)
        if distribution == "uniform":
            assert r.nnz == np.prod(r.shape) - round(0.8 * np.prod(r.shape))
    total = sum(int(np.prod(r.shape)) for r in sparse)
    nnz = sum(r.nnz for r in sparse)
    assert abs(nnz - (total - round(0.8 * total))) <= len(sparse)
    assert report.sparsity == pytest.approx(1 - nnz / total)


def test_existing_zeros_are_kept():
    model = CNN(nnx.Rngs(0))
    kernel = np.asarray(model.head.kernel[...]).copy()
    kernel[:, ::2] = 0.0  # half the columns already pruned
    model.head.kernel[...] = kernel
    sparsify(model, 0.3, skip=["stem", "blocks/*"])
    assert isinstance(model.head, SparseDense)
    assert model.head.nnz == np.count_nonzero(kernel)
    np.testing.assert_array_equal(model.head.weight.to_dense(), kernel)


# -- skip lists, min_sparsity, copies -----------------------------------------
def test_skip_patterns_and_min_sparsity_are_honoured():
    model = CNN(nnx.Rngs(0))
    before = _kernels(model)
    _, report = sparsify(model, 0.9, distribution="erk", skip=["stem", "blocks/0"],
                         min_sparsity=0.8)
    assert isinstance(model.stem, nnx.Conv) and isinstance(model.blocks[0], nnx.Conv)
    for name in ("stem", "blocks/0"):
        assert report[name].decision == "dense (skipped)"
    np.testing.assert_array_equal(model.blocks[0].kernel[...], before["blocks/0"])
    for r in report:
        if r.name in ("stem", "blocks/0"):
            continue
        if r.sparsity < 0.8:
            assert r.decision == "dense (below min_sparsity)"
        else:
            assert r.decision == "sparse"
    decisions = {r.name: r.decision for r in report}
    assert decisions["head"] == "dense (below min_sparsity)"  # ERK keeps the head dense
    np.testing.assert_array_equal(model.head.kernel[...], before["head"])  # and unpruned
    assert isinstance(model.blocks[1], SparseConv)


def test_convs_that_stay_dense_get_the_fast_dense_convolution():
    import sparseprop_jax as sp
    model = CNN(nnx.Rngs(0))
    reference = nnx.clone(model)

    def own(*args, **kwargs):
        return jax.lax.conv_general_dilated(*args, **kwargs)

    model.blocks[0].conv_general_dilated = own
    fast, _ = sparsify(model, 0.9, skip=["stem", "blocks/0"], copy=True)
    assert fast.stem.conv_general_dilated is sp.conv_general_dilated
    assert fast.blocks[0].conv_general_dilated is own  # a layer's own function stays
    assert model.stem.conv_general_dilated is jax.lax.conv_general_dilated  # copy=True
    flax_ops, _ = sparsify(model, 0.9, skip=["stem", "blocks/0"], copy=True, keep_flax_ops=True)
    assert flax_ops.stem.conv_general_dilated is jax.lax.conv_general_dilated
    x = jnp.asarray(X_IMG)
    np.testing.assert_allclose(fast(x), flax_ops(x), rtol=1e-4, atol=1e-5)
    # The stem's output, gradient included, is the dense layer's.
    grads = [nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m.stem) for m in (fast, reference)]
    np.testing.assert_allclose(grads[0]["kernel"][...], grads[1]["kernel"][...],
                               rtol=1e-4, atol=1e-4)


class LinenOwnConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
        x = nn.Conv(8, (3, 3), name="own", conv_general_dilated=_own_conv)(nn.relu(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def _own_conv(*args, **kwargs):
    return jax.lax.conv_general_dilated(*args, **kwargs)


def test_linen_convs_that_stay_dense_get_the_fast_dense_convolution(monkeypatch):
    module = LinenOwnConv()
    variables = module.init(jax.random.key(0), X_IMG)
    new, _ = sparsify(module, 0.9, variables=variables, inputs=X_IMG, skip=["stem", "own"])
    assert "kernel" in new["params"]["stem"] and "values" in new["params"]["head"]
    calls = []

    def noting(lhs, rhs, *args, **kwargs):
        calls.append(tuple(rhs.shape))
        return fast_conv(lhs, rhs, *args, **kwargs)

    fast_conv = sparsify_module.dense_conv.conv_general_dilated
    monkeypatch.setattr(sparsify_module.dense_conv, "conv_general_dilated", noting)

    def loss(params, apply):
        return jnp.sum(apply({**new, "params": params}, X_IMG) ** 2)

    fast, flax_ops = sparse_apply(module), sparse_apply(module, keep_flax_ops=True)
    np.testing.assert_allclose(fast(new, X_IMG), flax_ops(new, X_IMG), rtol=1e-4, atol=1e-5)
    assert calls == [(3, 3, 3, 8)]  # the stem only: "own" keeps its function
    calls.clear()
    flax_ops(new, X_IMG)
    assert calls == []
    grads = [jax.jit(jax.grad(loss), static_argnums=1)(new["params"], apply)
             for apply in (fast, flax_ops)]
    assert calls == [(3, 3, 3, 8)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)
    with sparsify_module.sparse_layers():  # init inside the context makes the usual variables
        fresh = module.init(jax.random.key(0), X_IMG)
    jax.tree.map(np.testing.assert_array_equal, fresh, variables)


def test_copy_leaves_the_model_alone():
    model = CNN(nnx.Rngs(0))
    new, _ = sparsify(model, 0.5, copy=True)
    assert isinstance(model.head, nnx.Linear) and isinstance(new.head, SparseDense)
    same, _ = sparsify(model, 0.5)
    assert same is model and isinstance(model.head, SparseDense)


def test_a_single_layer_is_returned_replaced():
    layer, report = sparsify(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), 0.75)
    assert isinstance(layer, SparseDense) and layer.nnz == 8
    assert report[0].name == ""


# -- densify ------------------------------------------------------------------
def _masked_dense(model, masks):
    dense = nnx.clone(model)
    for name, module in nnx.iter_modules(dense):
        key = "/".join(map(str, name))
        if key in masks:
            module.kernel[...] = module.kernel[...] * masks[key]
    return dense


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_densify_of_sparsify_is_the_masked_dense_model(distribution):
    original = CNN(nnx.Rngs(0))
    kernels = _kernels(original)
    names = [n for n in kernels if n != "stem"]
    masks = dict(zip(names, magnitude_masks([kernels[n] for n in names], 0.8, distribution)))
    expected = _masked_dense(original, masks)
    model, _ = sparsify(original, 0.8, distribution=distribution, skip="stem", copy=True)
    dense = densify(model, copy=True)
    assert not any(isinstance(m, (SparseDense, SparseConv)) for _, m in nnx.iter_modules(dense))
    for name, kernel in _kernels(expected).items():
        np.testing.assert_array_equal(_kernels(dense)[name], kernel)
    np.testing.assert_allclose(dense(X_IMG), expected(X_IMG), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model(X_IMG), expected(X_IMG), rtol=1e-4, atol=1e-4)


def test_linen_densify_of_sparsify_is_the_masked_dense_model():
    module, variables = _linen_setup()
    names = ["Conv_0", "Dense_0", "head"]
    kernels = [np.asarray(variables["params"][n]["kernel"]) for n in names]
    masks = magnitude_masks(kernels, 0.8, "global")
    expected = jax.tree.map(lambda a: a, variables)
    for name, kernel, mask in zip(names, kernels, masks):
        expected["params"][name]["kernel"] = jnp.asarray(kernel * mask)
    new, _ = sparsify(module, 0.8, variables=variables, inputs=X_IMG, distribution="global",
                      skip="stem")
    dense = densify(new)
    assert PATTERN_COLLECTION not in dense
    for name in names:
        np.testing.assert_array_equal(dense["params"][name]["kernel"],
                                      expected["params"][name]["kernel"])
    y = module.apply(expected, X_IMG)
    np.testing.assert_allclose(module.apply(dense, X_IMG), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(sparse_apply(module))(new, X_IMG), y, rtol=1e-4,
                               atol=1e-4)


# -- only where faster --------------------------------------------------------
def test_only_where_faster_times_real_shapes_and_decides_by_them():
    model, report = sparsify(CNN(nnx.Rngs(0)), 0.9, only_where_faster=True, inputs=X_IMG,
                             skip="stem", timing_repeats=2)
    for r in report:
        if r.name == "stem":
            assert r.dense_ms is None and r.decision == "dense (skipped)"
            continue
        assert r.dense_ms > 0 and r.sparse_ms > 0
        assert r.decision == ("sparse" if r.sparse_ms < r.dense_ms else "dense (faster)")
    modules = dict((("/".join(map(str, p))), m) for p, m in nnx.iter_modules(model))
    for r in report:
        assert isinstance(modules[r.name], (SparseDense, SparseConv)) == r.is_sparse
    text = str(report)
    assert text.splitlines()[0].split() == ["layer", "type", "shape", "sparsity", "nnz",
                                            "dense", "ms", "sparse", "ms", "decision"]
    assert "blocks/1" in text and "3x3x16x16" in text


def test_only_where_faster_keeps_the_faster_one(monkeypatch):
    seen = {}

    def fake_time(layer, mask, repeats=5, dense_conv_fn=None):
        seen[layer.name] = layer.input_shape
        return (1.0, 2.0) if layer.kind == "conv" else (2.0, 1.0)
    monkeypatch.setattr(sparsify_module, "_time_layer", fake_time)
    model, report = sparsify(CNN(nnx.Rngs(0)), 0.9, only_where_faster=True, inputs=(X_IMG,),
                             skip="stem")
    assert seen == {"blocks/0": (4, 8, 8, 8), "blocks/1": (4, 4, 4, 16), "head": (4, 64)}
    assert isinstance(model.head, SparseDense)
    assert isinstance(model.blocks[0], nnx.Conv) and isinstance(model.blocks[1], nnx.Conv)
    assert report["blocks/0"].decision == "dense (faster)"
    # The model's batch statistics were not touched by tracing it.
    np.testing.assert_array_equal(model.bn.mean[...], np.zeros(8, np.float32))
    module, variables = _linen_setup()
    new, report = sparsify(module, 0.9, variables=variables, inputs=X_IMG,
                           only_where_faster=True)
    assert seen["Dense_0"] == (4, 256) and seen["stem"] == (4, 8, 8, 3)
    assert sorted(r.name for r in report if r.is_sparse) == ["Dense_0", "head"]
    assert "kernel" in new["params"]["Conv_0"]


# -- sparse transfer: fine-tuning with the mask fixed -------------------------
def _data():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    return jnp.asarray(x), jnp.asarray(y)


def _mask_grads(grads, masks):
    return jax.tree.map(lambda m, g: g if m is None else g * m, masks, grads,
                        is_leaf=lambda v: v is None)


def test_sparse_fine_tuning_equals_masked_dense_nnx():
    x, y = _data()
    model, _ = sparsify(CNN(nnx.Rngs(0)), 0.8, distribution="global", skip="stem")
    stem = np.asarray(model.stem.kernel[...])
    reference, masks = to_masks(nnx.clone(model))
    tx = optax.adamw(1e-2)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ref_opt = nnx.Optimizer(reference, tx, wrt=nnx.Param)
    # Optimizer state only for the nonzeros (and the dense layers' parameters).
    assert opt.opt_state[0].mu["head"]["values"].shape == (model.head.nnz,)
    assert opt.opt_state[0].mu["blocks"][1]["values"].shape == (model.blocks[1].nnz,)
    assert "kernel" in opt.opt_state[0].mu["stem"]

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def sparse_step(m, o):
        value, grads = nnx.value_and_grad(loss)(m)
        o.update(m, grads)
        return value

    @nnx.jit
    def dense_step(m, o):
        value, grads = nnx.value_and_grad(loss)(m)
        pure = _mask_grads(nnx.to_pure_dict(grads), masks)
        nnx.replace_by_pure_dict(grads, pure)
        o.update(m, grads)
        return value

    for _ in range(5):
        np.testing.assert_allclose(sparse_step(model, opt), dense_step(reference, ref_opt),
                                   rtol=1e-4)
    trained = densify(nnx.clone(model))
    for (name, a), (_, b) in zip(sorted(nnx.to_flat_state(nnx.state(trained, nnx.Param))),
                                 sorted(nnx.to_flat_state(nnx.state(reference, nnx.Param)))):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-5, err_msg=str(name))
    np.testing.assert_allclose(model.bn.mean[...], reference.bn.mean[...], rtol=1e-4, atol=1e-6)
    # The pattern never changed; the pruned weights are still exactly zero.
    _, after = to_masks(nnx.clone(model))
    for (name, a), (_, b) in zip(sorted(nnx.to_flat_state(nnx.State(after))),
                                 sorted(nnx.to_flat_state(nnx.State(masks)))):
        np.testing.assert_array_equal(a, b)
    # The skipped layer stays dense and trains as usual.
    assert isinstance(model.stem, nnx.Conv)
    assert not np.allclose(model.stem.kernel[...], stem)


def test_sparse_fine_tuning_equals_masked_dense_linen():
    x, y = _data()
    module, variables = _linen_setup()
    sparse, _ = sparsify(module, 0.8, variables=variables, inputs=X_IMG, skip="stem")
    dense, masks = to_masks(sparse)
    tx = optax.adam(1e-2)
    apply = sparse_apply(module)

    def make_step(apply_fn, grad_masks):
        @jax.jit
        def step(variables, opt_state):
            def loss(params):
                logits, updates = apply_fn({**variables, "params": params}, x, train=True,
                                           mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
            (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(
                variables["params"])
            if grad_masks is not None:
                grads = _mask_grads(grads, grad_masks)
            changes, opt_state = tx.update(grads, opt_state, variables["params"])
            params = optax.apply_updates(variables["params"], changes)
            return {**variables, **updates, "params": params}, opt_state, value
        return step

    sparse_step, dense_step = make_step(apply, None), make_step(module.apply, masks)
    s_state, d_state = tx.init(sparse["params"]), tx.init(dense["params"])
    assert s_state[0].mu["head"]["values"].shape == sparse["params"]["head"]["values"].shape
    for _ in range(5):
        sparse, s_state, s_loss = sparse_step(sparse, s_state)
        dense, d_state, d_loss = dense_step(dense, d_state)
        np.testing.assert_allclose(s_loss, d_loss, rtol=1e-4)
    trained = densify(sparse)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(trained),
                                 jax.tree_util.tree_leaves_with_path(dense)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


# -- errors -------------------------------------------------------------------
class Grouped(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


class OneD(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, 3, rngs=rngs)


@pytest.mark.parametrize("make, error, match", [
    (lambda: sparsify(CNN(nnx.Rngs(0)), 1.0), ValueError,
     r"sparsify: sparsity must be in \[0, 1\)"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), -0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), "a lot"), TypeError, "sparsity must be a number"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), 0.5, min_sparsity=1.5), ValueError,
     r"sparsity must be in \[0, 1\]"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), 0.5, distribution="random"), ValueError,
     "distribution must be one of"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), 0.5, skip=["stem", "classifier"]), ValueError,
     "skip pattern 'classifier' matches no Linear/Dense or Conv layer.*'blocks/0'"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), 0.5, skip=[3]), TypeError, "skip must hold"),
    (lambda: sparsify(Grouped(nnx.Rngs(0)), 0.5), ValueError,
     "layer 'conv' \\(nnx.Conv\\) cannot be made sparse: feature_group_count=2 .*add it to skip"),
    (lambda: sparsify(OneD(nnx.Rngs(0)), 0.5), ValueError,
     "layer 'conv' \\(nnx.Conv\\) cannot be made sparse: kernel_size"),
    (lambda: sparsify({"params": {}}, 0.5), TypeError, "model must be a flax.nnx.Module"),
    (lambda: sparsify(LinenCNN(), 0.5), ValueError, "needs its variables"),
    (lambda: sparsify(LinenCNN(), 0.5, variables={"params": {}}), ValueError,
     "needs example inputs"),
    (lambda: sparsify(CNN(nnx.Rngs(0)), 0.5, only_where_faster=True), ValueError,
     "give example inputs"),
    (lambda: densify([1, 2]), TypeError, "densify: model must be"),
])
def test_bad_inputs_give_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_unsupported_layers_can_be_skipped():
    model, report = sparsify(Grouped(nnx.Rngs(0)), 0.5, skip="conv")
    assert isinstance(model.conv, nnx.Conv) and isinstance(model.head, SparseDense)
    f16 = nnx.Linear(4, 4, param_dtype=jnp.float16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="float16 .only float32 or bfloat16"):
        sparsify(f16, 0.5)
