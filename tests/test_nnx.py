"""The Flax NNX SparseDense: values, conversions, training, transforms, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparseprop_jax as sp
from conftest import assert_close, random_kernel
from sparseprop_jax.nnx import SparseDense, SparsityPatternVar


def _layer_from_random(rng, n_in=13, n_out=7, sparsity=0.7, use_bias=True):
    kernel = random_kernel(rng, n_in, n_out, sparsity)
    bias = rng.standard_normal(n_out).astype(np.float32) if use_bias else None
    return SparseDense.from_dense(kernel, bias), kernel, bias


def _kernel(layer: SparseDense) -> np.ndarray:
    return np.asarray(layer.to_dense().kernel[...])


@pytest.mark.parametrize("use_bias", [True, False])
def test_output_matches_dense(rng, use_bias):
    layer, kernel, bias = _layer_from_random(rng, use_bias=use_bias)
    x = rng.standard_normal((2, 5, 13)).astype(np.float32)
    expected = x @ kernel + (0 if bias is None else bias)
    assert_close(layer(x), expected, scale_terms=13)
    assert_close(layer(x), x @ np.asarray(layer.weight.to_dense()) + (0 if bias is None else bias),
                 scale_terms=13)
    assert_close(layer(x), layer.to_dense()(x), scale_terms=13)
    assert (layer.bias is None) == (not use_bias)


def test_init_has_exact_sparsity():
    layer = SparseDense(30, 20, sparsity=0.9, rngs=nnx.Rngs(0))
    assert layer.nnz == 600 - 540
    assert layer.sparsity == pytest.approx(0.9)
    assert (layer.in_features, layer.out_features) == (30, 20)
    assert layer.values[...].shape == (60,)
    assert np.count_nonzero(_kernel(layer)) == 60
    np.testing.assert_array_equal(layer.bias[...], np.zeros(20, np.float32))
    # Same seed, same pattern; another seed, another pattern.
    same = SparseDense(30, 20, sparsity=0.9, rngs=nnx.Rngs(0))
    other = SparseDense(30, 20, sparsity=0.9, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_kernel(same), _kernel(layer))
    assert not np.array_equal(_kernel(other) != 0, _kernel(layer) != 0)


def test_default_sparsity_and_extremes():
    assert SparseDense(10, 10, rngs=nnx.Rngs(0)).nnz == 10
    assert SparseDense(4, 3, sparsity=0.0, rngs=nnx.Rngs(0)).nnz == 12
    empty = SparseDense(4, 3, sparsity=1.0, rngs=nnx.Rngs(0))
    assert empty.nnz == 0
    np.testing.assert_array_equal(empty(jnp.ones((2, 4))), np.zeros((2, 3), np.float32))


def test_from_dense_keeps_zeros_and_round_trips(rng):
    layer, kernel, bias = _layer_from_random(rng, sparsity=0.6)
    assert layer.nnz == np.count_nonzero(kernel)
    dense = layer.to_dense()
    assert isinstance(dense, nnx.Linear)
    np.testing.assert_array_equal(dense.kernel[...], kernel)
    np.testing.assert_array_equal(dense.bias[...], bias)
    again = SparseDense.from_dense(dense)
    np.testing.assert_array_equal(again.values[...], layer.values[...])
    np.testing.assert_array_equal(again.bias[...], bias)


def test_from_dense_linear_and_mask(rng):
    linear = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    linear.kernel[...] = linear.kernel[...].at[0, :].set(0.0)
    layer = SparseDense.from_dense(linear)
    assert layer.nnz == 20
    np.testing.assert_array_equal(_kernel(layer), linear.kernel[...])
    # A mask keeps its entries (zeros included) and drops the rest.
    mask = np.zeros((6, 4), bool)
    mask[:2, :] = True
    masked = SparseDense.from_dense(linear, mask=mask)
    assert masked.nnz == 8
    np.testing.assert_array_equal(_kernel(masked), np.where(mask, linear.kernel[...], 0.0))
    # A given pattern is used as is.
    fixed = SparseDense(6, 4, pattern=masked.pattern.get_value(), rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(_kernel(fixed) != 0, mask)


def test_state_split_merge_and_jit(rng):
    layer, _, _ = _layer_from_random(rng)
    x = jnp.asarray(rng.standard_normal((3, 13)), jnp.float32)
    graphdef, params, pattern = nnx.split(layer, nnx.Param, SparsityPatternVar)
    assert set(params.keys()) == {"values", "bias"}
    assert set(pattern.keys()) == {"pattern"}
    merged = nnx.merge(graphdef, params, pattern)
    np.testing.assert_array_equal(merged(x), layer(x))
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(layer, x), layer(x))
    apply = jax.jit(lambda p, x: nnx.merge(graphdef, p, pattern)(x))
    np.testing.assert_array_equal(apply(params, x), layer(x))


def test_grad_matches_dense(rng):
    layer, _, _ = _layer_from_random(rng)
    x = jnp.asarray(rng.standard_normal((4, 13)), jnp.float32)
    loss = lambda m: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    grads = nnx.grad(loss)(layer)
    dense_grads = nnx.grad(loss)(layer.to_dense())
    expected_values = sp.SparseWeight.gather(dense_grads["kernel"][...], layer.weight.pattern)
    assert_close(grads["values"][...], expected_values.values, scale_terms=4)
    assert_close(grads["bias"][...], dense_grads["bias"][...], scale_terms=4)
    assert "pattern" not in grads


class _TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.first = SparseDense(16, 32, sparsity=0.8, rngs=rngs)
        self.second = SparseDense(32, 4, sparsity=0.5, rngs=rngs)

    def __call__(self, x):
        return self.second(nnx.relu(self.first(x)))


def test_optimizer_trains_only_nonzeros(rng):
    model = _TwoLayer(nnx.Rngs(0))
    masks = [_kernel(layer) != 0 for layer in (model.first, model.second)]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    shapes = {leaf.shape for leaf in jax.tree.leaves(optimizer.opt_state)}
    assert shapes <= {(), (model.first.nnz,), (32,), (model.second.nnz,), (4,)}
    x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    y = jnp.tanh(x[:, :4] - x[:, 4:8])  # learnable targets

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0]
    for layer, mask in zip((model.first, model.second), masks):
        kernel = _kernel(layer)
        assert np.all(kernel[~mask] == 0.0)
        assert np.count_nonzero(kernel) == layer.nnz


def test_repr_is_short():
    layer = SparseDense(30, 20, sparsity=0.9, use_bias=False, rngs=nnx.Rngs(0))
    text = repr(layer)
    assert text == str(layer) == ("SparseDense(in_features=30, out_features=20, sparsity=0.9, "
                                  "nnz=60, use_bias=False)")
    assert "SparseDense(in_features=16" in repr(_TwoLayer(nnx.Rngs(0)))


def _kernel_f32(*shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize("make, error, match", [
    (lambda: SparseDense(0, 3, rngs=nnx.Rngs(0)), ValueError, "in_features must be a positive"),
    (lambda: SparseDense(3, -1, rngs=nnx.Rngs(0)), ValueError, "out_features must be a positive"),
    (lambda: SparseDense(3, 2.5, rngs=nnx.Rngs(0)), ValueError, "out_features"),
    (lambda: SparseDense(3, 3, sparsity=1.5, rngs=nnx.Rngs(0)), ValueError,
     r"sparsity must be in \[0, 1\]"),
    (lambda: SparseDense(3, 3, sparsity="x", rngs=nnx.Rngs(0)), TypeError, "sparsity"),
    (lambda: SparseDense(3, 3, sparsity=0.5, pattern=sp.SparsityPattern.from_mask(
        np.ones((3, 3), bool)), rngs=nnx.Rngs(0)), ValueError, "sparsity or pattern"),
    (lambda: SparseDense(3, 4, pattern=sp.SparsityPattern.from_mask(np.ones((3, 3), bool)),
                         rngs=nnx.Rngs(0)), ValueError, r"pattern must have shape \(3, 4\)"),
    (lambda: SparseDense(3, 4, pattern=np.ones((3, 4), bool), rngs=nnx.Rngs(0)), TypeError,
     "pattern must be a SparsityPattern"),
    (lambda: SparseDense(3, 4, kernel_init=nnx.initializers.ones, bias_init=lambda *a: 1.0,
                         rngs=nnx.Rngs(0)), ValueError, r"bias_init\(...\) result"),
    (lambda: SparseDense.from_dense(_kernel_f32(3)), ValueError,
     r"kernel must be 2-D \(in_features, out_features\)"),
    (lambda: SparseDense.from_dense(_kernel_f32(3, 4, 1)), ValueError, "kernel must be 2-D"),
    (lambda: SparseDense.from_dense(np.ones((3, 4), np.int32)), TypeError,
     "kernel must be float32"),
    (lambda: SparseDense.from_dense(_kernel_f32(3, 4), mask=np.ones((4, 3), bool)), ValueError,
     r"mask must have shape \(3, 4\)"),
    (lambda: SparseDense.from_dense(_kernel_f32(3, 4), mask=np.ones((3, 4))), TypeError,
     "mask must be boolean"),
    (lambda: SparseDense.from_dense(_kernel_f32(3, 4), np.ones(3, np.float32)), ValueError,
     r"bias must have shape \(4,\)"),
    (lambda: SparseDense.from_dense(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), np.ones(4, np.float32)),
     ValueError, "bias must be None"),
    (lambda: SparseDense(3, 4, rngs=nnx.Rngs(0))(jnp.ones((2, 5))), ValueError,
     r"x must have shape \[..., 3\]"),
])
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_building_under_jit_explains():
    with pytest.raises(TypeError, match="outside jit"):
        nnx.eval_shape(lambda: SparseDense(4, 4, rngs=nnx.Rngs(0)))
