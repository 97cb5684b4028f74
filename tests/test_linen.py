"""The Flax Linen SparseDense: values, conversions, training, transforms, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import sparseprop_jax as sp
from conftest import assert_close, random_kernel
from sparseprop_jax.linen import PATTERN_COLLECTION, SparseDense

_PATTERN_KEYS = {"indptr", "indices", "t_indptr", "t_indices", "t_perm", "shape"}


def _variables_from_random(rng, n_in=13, n_out=7, sparsity=0.7, use_bias=True):
    kernel = random_kernel(rng, n_in, n_out, sparsity)
    bias = rng.standard_normal(n_out).astype(np.float32) if use_bias else None
    return SparseDense.variables_from_dense(kernel, bias), kernel, bias


def _kernel(variables) -> np.ndarray:
    return np.asarray(SparseDense.to_dense_variables(variables)["params"]["kernel"])


@pytest.mark.parametrize("use_bias", [True, False])
def test_output_matches_dense(rng, use_bias):
    variables, kernel, bias = _variables_from_random(rng, use_bias=use_bias)
    model = SparseDense(features=7, use_bias=use_bias)
    x = rng.standard_normal((2, 5, 13)).astype(np.float32)
    y = model.apply(variables, x)
    assert_close(y, x @ kernel + (0 if bias is None else bias), scale_terms=13)
    dense = nn.Dense(features=7, use_bias=use_bias)
    assert_close(y, dense.apply(SparseDense.to_dense_variables(variables), x), scale_terms=13)


def test_init_has_exact_sparsity_and_collections():
    model = SparseDense(features=20, sparsity=0.9)
    variables = model.init(jax.random.key(0), jnp.ones((1, 30)))
    assert set(variables) == {"params", PATTERN_COLLECTION}
    assert set(variables["params"]) == {"values", "bias"}
    assert set(variables[PATTERN_COLLECTION]) == _PATTERN_KEYS
    weight = SparseDense.weight(variables)
    assert weight.shape == (30, 20)
    assert weight.nnz == 60 and weight.sparsity == pytest.approx(0.9)
    assert np.count_nonzero(_kernel(variables)) == 60
    same = model.init(jax.random.key(0), jnp.ones((1, 30)))
    other = model.init(jax.random.key(1), jnp.ones((1, 30)))
    np.testing.assert_array_equal(_kernel(same), _kernel(variables))
    assert not np.array_equal(_kernel(other) != 0, _kernel(variables) != 0)
    assert "bias" not in SparseDense(3, use_bias=False).init(
        jax.random.key(0), jnp.ones((1, 4)))["params"]


def test_from_dense_keeps_zeros_and_round_trips(rng):
    variables, kernel, bias = _variables_from_random(rng, sparsity=0.6)
    assert variables["params"]["values"].shape == (np.count_nonzero(kernel),)
    dense = SparseDense.to_dense_variables(variables)
    np.testing.assert_array_equal(dense["params"]["kernel"], kernel)
    np.testing.assert_array_equal(dense["params"]["bias"], bias)
    again = SparseDense.variables_from_dense(dense)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    mask = kernel != 0
    mask[0, :] = True  # explicit zeros in the mask are kept as entries
    masked = SparseDense.variables_from_dense(kernel, mask=mask)
    assert masked["params"]["values"].shape == (mask.sum(),)
    np.testing.assert_array_equal(_kernel(masked), kernel)


class _TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(SparseDense(32, sparsity=0.8)(x))
        return SparseDense(4, sparsity=0.5)(x)


def test_optax_trains_only_nonzeros(rng):
    model = _TwoLayer()
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = jnp.tanh(x[:, :4] - x[:, 4:8])  # learnable targets
    variables = model.init(jax.random.key(0), x)
    params, pattern = variables["params"], variables[PATTERN_COLLECTION]
    layers = ("SparseDense_0", "SparseDense_1")
    layer_vars = lambda p, name: {"params": p[name], PATTERN_COLLECTION: pattern[name]}  # noqa
    masks = [_kernel(layer_vars(params, name)) != 0 for name in layers]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    param_shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
    assert {leaf.shape for leaf in jax.tree.leaves(opt_state)} <= param_shapes | {()}

    @jax.jit
    def step(params, opt_state):
        loss_fn = lambda p: jnp.mean(  # noqa: E731
            (model.apply({"params": p, PATTERN_COLLECTION: pattern}, x) - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    for name, mask in zip(layers, masks):
        kernel = _kernel(layer_vars(params, name))
        assert np.all(kernel[~mask] == 0.0)
        assert np.count_nonzero(kernel) == mask.sum()


def test_grad_matches_dense(rng):
    variables, _, _ = _variables_from_random(rng)
    x = jnp.asarray(rng.standard_normal((4, 13)), jnp.float32)
    pattern = variables[PATTERN_COLLECTION]
    loss = lambda p: jnp.sum(jnp.sin(  # noqa: E731
        SparseDense(7).apply({"params": p, PATTERN_COLLECTION: pattern}, x)))
    grads = jax.grad(loss)(variables["params"])
    dense_params = SparseDense.to_dense_variables(variables)["params"]
    dense_grads = jax.grad(lambda p: jnp.sum(jnp.sin(nn.Dense(7).apply({"params": p}, x))))(
        dense_params)
    expected = sp.SparseWeight.gather(dense_grads["kernel"], SparseDense.weight(variables).pattern)
    assert_close(grads["values"], expected.values, scale_terms=4)
    assert_close(grads["bias"], dense_grads["bias"], scale_terms=4)


def test_variables_serialize(rng):
    variables, _, _ = _variables_from_random(rng)
    x = jnp.ones((2, 13))
    restored = serialization.from_bytes(variables, serialization.to_bytes(variables))
    np.testing.assert_array_equal(SparseDense(7).apply(restored, x),
                                  SparseDense(7).apply(variables, x))


def _kernel_f32(*shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SparseDense(0), ValueError, "features must be a positive"),
    (lambda: SparseDense(3, sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: SparseDense(3).apply({"params": {}}, jnp.ones((1, 2))), ValueError,
     f"must include the '{PATTERN_COLLECTION}' collection"),
    (lambda: SparseDense(5).apply(SparseDense.variables_from_dense(_kernel_f32(2, 3)),
                                  jnp.ones((1, 2))), ValueError, "features=5 does not match"),
    (lambda: SparseDense(3, use_bias=False).apply(
        SparseDense.variables_from_dense(_kernel_f32(2, 3)), jnp.ones((1, 4))), ValueError,
     r"x must have shape \[..., 2\]"),
    (lambda: jax.jit(SparseDense(3).init)(jax.random.key(0), jnp.ones((1, 2))), TypeError,
     "initialise the layer outside jit"),
    (lambda: SparseDense.variables_from_dense(_kernel_f32(3)), ValueError,
     r"kernel must be 2-D \(in_features, out_features\)"),
    (lambda: SparseDense.variables_from_dense(np.ones((3, 4), np.int32)), TypeError,
     "kernel must be float32"),
    (lambda: SparseDense.variables_from_dense(_kernel_f32(3, 4), mask=np.ones((3, 3), bool)),
     ValueError, r"mask must have shape \(3, 4\)"),
    (lambda: SparseDense.variables_from_dense(_kernel_f32(3, 4), np.ones(3, np.float32)),
     ValueError, r"bias must have shape \(4,\)"),
    (lambda: SparseDense.variables_from_dense({"params": {"kernel": _kernel_f32(3, 4)}},
                                              np.ones(4, np.float32)),
     ValueError, "bias must be None"),
    (lambda: SparseDense.variables_from_dense({"kernel": _kernel_f32(3, 4)}), ValueError,
     "kernel_or_variables must be"),
    (lambda: SparseDense.to_dense_variables({"params": {}}), ValueError,
     f"'{PATTERN_COLLECTION}' collection"),
])
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()
