"""The Flax NNX SparseConv: values, conversions, training, transforms, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparseprop_jax as sp
from conftest import assert_close, random_kernel
from sparseprop_jax.nnx import SparseConv, SparseDense, SparsityPatternVar


def _conv_kernel(rng, kh, kw, cin, cout, sparsity):
    return random_kernel(rng, kh * kw * cin, cout, sparsity).reshape(kh, kw, cin, cout)


def _kernel(layer: SparseConv) -> np.ndarray:
    return np.asarray(layer.to_dense().kernel[...])


def _dense_conv(kernel, bias, strides, padding):
    """An nnx.Conv holding `kernel` and `bias`, built independently of SparseConv."""
    kh, kw, cin, cout = kernel.shape
    return nnx.Conv(cin, cout, (kh, kw), strides, padding=padding, use_bias=bias is not None,
                    kernel_init=lambda *_: jnp.asarray(kernel),
                    bias_init=lambda *_: jnp.asarray(bias), precision="highest",
                    rngs=nnx.Rngs(0))


@pytest.mark.parametrize("ksize", [3, 1], ids=lambda k: f"{k}x{k}")
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides", [1, 2])
def test_output_matches_nnx_conv(rng, ksize, padding, strides):
    kernel = _conv_kernel(rng, ksize, ksize, 3, 5, 0.6)
    bias = rng.standard_normal(5).astype(np.float32)
    layer = SparseConv.from_dense(kernel, bias, strides=strides, padding=padding)
    assert (layer.strides, layer.padding) == ((strides, strides), padding)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    y = layer(x)
    expected = _dense_conv(kernel, bias, strides, padding)(x)
    assert y.shape == expected.shape
    assert_close(y, expected, scale_terms=ksize * ksize * 3)
    assert_close(y, layer.to_dense()(x), scale_terms=ksize * ksize * 3)


@pytest.mark.parametrize("conv_variant", ["batch", "width", "measure"])
def test_explicit_padding_no_bias_and_variant_choice(rng, conv_variant):
    kernel = _conv_kernel(rng, 3, 2, 4, 6, 0.7)
    layer = SparseConv.from_dense(kernel, strides=(2, 2), padding=((2, 0), 1),
                                  conv_variant=conv_variant)
    assert layer.bias is None and layer.padding == ((2, 0), (1, 1))
    x = rng.standard_normal((3, 9, 8, 4)).astype(np.float32)
    expected = _dense_conv(kernel, None, 2, ((2, 0), (1, 1)))(x)
    assert_close(layer(x), expected, scale_terms=24)
    assert_close(layer.to_dense()(x), expected, scale_terms=24)


def test_unbatched_and_extra_batch_dims(rng):
    layer = SparseConv(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 3, 7, 7, 3)), jnp.float32)
    y = layer(x)
    assert y.shape == (2, 3, 4, 4, 4)
    np.testing.assert_array_equal(layer(x[1, 2]), y[1, 2])
    assert_close(y, layer.to_dense()(x), scale_terms=27)


def test_init_has_exact_sparsity():
    layer = SparseConv(4, 6, (3, 3), sparsity=0.9, rngs=nnx.Rngs(0))
    assert layer.nnz == 216 - 194
    assert layer.sparsity == pytest.approx(194 / 216)
    assert (layer.in_features, layer.out_features, layer.kernel_size) == (4, 6, (3, 3))
    assert layer.kernel_shape == layer.weight.shape == (3, 3, 4, 6)
    assert layer.values[...].shape == (22,)
    assert np.count_nonzero(_kernel(layer)) == 22
    np.testing.assert_array_equal(layer.bias[...], np.zeros(6, np.float32))
    same = SparseConv(4, 6, (3, 3), sparsity=0.9, rngs=nnx.Rngs(0))
    other = SparseConv(4, 6, (3, 3), sparsity=0.9, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_kernel(same), _kernel(layer))
    assert not np.array_equal(_kernel(other) != 0, _kernel(layer) != 0)


def test_default_sparsity_and_extremes():
    assert SparseConv(2, 5, (2, 2), rngs=nnx.Rngs(0)).nnz == 4  # 0.9 of 40 zeros
    assert SparseConv(2, 3, [1, 1], sparsity=0.0, rngs=nnx.Rngs(0)).nnz == 6
    empty = SparseConv(2, 3, (3, 3), sparsity=1.0, rngs=nnx.Rngs(0))
    assert empty.nnz == 0
    np.testing.assert_array_equal(empty(jnp.ones((1, 4, 4, 2))), np.zeros((1, 4, 4, 3)))


def test_from_dense_keeps_zeros_and_round_trips(rng):
    kernel = _conv_kernel(rng, 3, 3, 2, 4, 0.6)
    bias = rng.standard_normal(4).astype(np.float32)
    layer = SparseConv.from_dense(kernel, bias, strides=2, padding="VALID")
    assert layer.nnz == np.count_nonzero(kernel)
    dense = layer.to_dense()
    assert isinstance(dense, nnx.Conv)
    assert (dense.kernel_size, dense.strides, dense.padding) == ((3, 3), (2, 2), "VALID")
    np.testing.assert_array_equal(dense.kernel[...], kernel)
    np.testing.assert_array_equal(dense.bias[...], bias)
    again = SparseConv.from_dense(dense)
    assert (again.strides, again.padding) == ((2, 2), "VALID")
    np.testing.assert_array_equal(again.values[...], layer.values[...])
    np.testing.assert_array_equal(again.bias[...], bias)
    # A mask keeps its entries (explicit zeros included) and drops the rest.
    mask = np.zeros(kernel.shape, bool)
    mask[1, 1] = True
    masked = SparseConv.from_dense(kernel, mask=mask)
    assert masked.nnz == 8 and masked.bias is None
    np.testing.assert_array_equal(_kernel(masked), np.where(mask, kernel, 0.0))
    # A given pattern is used as is.
    fixed = SparseConv(2, 4, (3, 3), pattern=masked.pattern.get_value(), rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(_kernel(fixed) != 0, mask)


def test_from_dense_nnx_conv_applies_its_mask():
    mask = np.zeros((3, 3, 2, 4), np.float32)
    mask[:, 0] = 1.0
    conv = nnx.Conv(2, 4, (3, 3), strides=(2, 2), padding=1, mask=jnp.asarray(mask),
                    rngs=nnx.Rngs(0))
    layer = SparseConv.from_dense(conv)
    assert layer.nnz == 24 and layer.padding == ((1, 1), (1, 1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 2)), jnp.float32)
    assert_close(layer(x), conv(x), scale_terms=18)


def test_state_split_merge_and_jit(rng):
    layer = SparseConv.from_dense(_conv_kernel(rng, 3, 3, 2, 4, 0.5),
                                  rng.standard_normal(4).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((3, 5, 5, 2)), jnp.float32)
    graphdef, params, pattern = nnx.split(layer, nnx.Param, SparsityPatternVar)
    assert set(params.keys()) == {"values", "bias"}
    assert set(pattern.keys()) == {"pattern"}
    np.testing.assert_array_equal(nnx.merge(graphdef, params, pattern)(x), layer(x))
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(layer, x), layer(x))


def test_grad_matches_dense(rng):
    layer = SparseConv.from_dense(_conv_kernel(rng, 3, 3, 2, 4, 0.5),
                                  rng.standard_normal(4).astype(np.float32), strides=2)
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 2)), jnp.float32)
    loss = lambda m: jnp.sum(jnp.sin(m(x)))  # noqa: E731
    grads = nnx.grad(loss)(layer)
    dense_grads = nnx.grad(loss)(layer.to_dense())
    expected = sp.SparseWeight.gather(dense_grads["kernel"][...], layer.weight.pattern)
    assert_close(grads["values"][...], expected.values, scale_terms=32)
    assert_close(grads["bias"][...], dense_grads["bias"][...], scale_terms=32)
    assert "pattern" not in grads


class _SmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = SparseConv(1, 16, (3, 3), sparsity=0.5, rngs=rngs)
        self.conv2 = SparseConv(16, 32, (3, 3), strides=2, sparsity=0.8, rngs=rngs)
        self.head = SparseDense(4 * 4 * 32, 10, sparsity=0.5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.reshape(x.shape[0], -1))


def _digits(n=256):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:n] / 16.0).astype(np.float32)[..., None]
    return jnp.asarray(x), jnp.asarray(digits.target[:n])


def test_small_cnn_trains_only_nonzeros():
    model = _SmallCNN(nnx.Rngs(0))
    layers = (model.conv1, model.conv2, model.head)
    masks = [np.asarray(layer.weight.to_dense()) != 0 for layer in layers]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    shapes = {leaf.shape for leaf in jax.tree.leaves(optimizer.opt_state)}
    assert shapes <= {(), (model.conv1.nnz,), (16,), (model.conv2.nnz,), (32,),
                      (model.head.nnz,), (10,)}
    x, labels = _digits()

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    for layer, mask in zip(layers, masks):
        kernel = np.asarray(layer.weight.to_dense())
        assert np.all(kernel[~mask] == 0.0)
        assert np.count_nonzero(kernel) == layer.nnz


def test_repr_is_short():
    layer = SparseConv(4, 6, (3, 3), strides=2, padding="VALID", sparsity=0.9, use_bias=False,
                       rngs=nnx.Rngs(0))
    assert repr(layer) == str(layer) == (
        "SparseConv(in_features=4, out_features=6, kernel_size=(3, 3), strides=(2, 2), "
        "padding='VALID', sparsity=0.8981, nnz=22, use_bias=False)")
    assert "SparseConv(in_features=1, out_features=16" in repr(_SmallCNN(nnx.Rngs(0)))


def _make(**kwargs):
    args = {"in_features": 2, "out_features": 3, "kernel_size": (3, 3), "rngs": nnx.Rngs(0)}
    args.update(kwargs)
    return lambda: SparseConv(**args)


def _k(*shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize("make, error, match", [
    (_make(in_features=0), ValueError, "in_features must be a positive"),
    (_make(out_features=1.5), ValueError, "out_features must be a positive"),
    (_make(kernel_size=3), ValueError, r"kernel_size must be a pair \(kh, kw\).*1-D"),
    (_make(kernel_size=(3,)), ValueError, "kernel_size=.*1-D convolution, which is not supp"),
    (_make(kernel_size=(3, 3, 3)), ValueError, "kernel_size=.*3-D convolution, which is not"),
    (_make(kernel_size=(3, 0)), ValueError, r"kernel_size\[1\] must be a positive"),
    (_make(strides=(1, 2)), ValueError, "strides=.*is not supported.*must be equal"),
    (_make(strides=0), ValueError, "strides must be positive"),
    (_make(strides=(1, 1, 1)), ValueError, "strides must be an int or a pair"),
    (_make(padding="CIRCULAR"), ValueError, "padding='CIRCULAR' is not supported"),
    (_make(padding="CAUSAL"), ValueError, "padding='CAUSAL' is not supported"),
    (_make(padding="FULL"), ValueError, "padding must be 'SAME', 'VALID'"),
    (_make(padding=((1, 1),)), ValueError, "padding must be 'SAME', 'VALID'"),
    (_make(padding=-1), ValueError, "padding must be non-negative"),
    (_make(kernel_dilation=2), ValueError, "kernel_dilation=2 is not supported"),
    (_make(input_dilation=(1, 2)), ValueError, r"input_dilation=\(1, 2\) is not supported"),
    (_make(feature_group_count=2), ValueError, "feature_group_count=2 is not supported"),
    (_make(conv_variant="fast"), ValueError, "conv_variant must be one of"),
    (_make(sparsity=1.5), ValueError, r"sparsity must be in \[0, 1\]"),
    (_make(sparsity=0.5, pattern=sp.SparsityPattern.from_mask(np.ones((3, 3, 2, 3), bool))),
     ValueError, "sparsity or pattern"),
    (_make(pattern=sp.SparsityPattern.from_mask(np.ones((18, 3), bool))), ValueError,
     r"pattern must have shape \(3, 3, 2, 3\) \(kh, kw, in_features, out_features\)"),
    (_make(bias_init=lambda *a: jnp.ones(2)), ValueError, r"bias_init\(...\) result"),
    (lambda: SparseConv(2, 3, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((5, 2))), ValueError,
     r"inputs must have shape \[N, H, W, C\]"),
    (lambda: SparseConv(2, 3, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 4))), ValueError,
     "x must have 2 channels"),
    (lambda: SparseConv.from_dense(_k(3, 3)), ValueError,
     r"kernel must be 4-D \(kh, kw, in_features, out_features\)"),
    (lambda: SparseConv.from_dense(np.ones((3, 3, 2, 2), np.int32)), TypeError,
     "kernel must be float32"),
    (lambda: SparseConv.from_dense(_k(3, 3, 2, 2), mask=np.ones((3, 3, 2), bool)), ValueError,
     r"mask must have shape \(3, 3, 2, 2\)"),
    (lambda: SparseConv.from_dense(_k(3, 3, 2, 2), np.ones(3, np.float32)), ValueError,
     r"bias must have shape \(2,\)"),
    (lambda: SparseConv.from_dense(_k(3, 3, 2, 2), padding="REFLECT"), ValueError,
     "padding='REFLECT' is not supported"),
    (lambda: SparseConv.from_dense(nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0)), strides=2),
     ValueError, "strides must be None when an nnx.Conv is given"),
    (lambda: SparseConv.from_dense(nnx.Conv(2, 2, (3, 3), kernel_dilation=2,
                                            rngs=nnx.Rngs(0))),
     ValueError, "conv.kernel_dilation=2 is not supported"),
    (lambda: SparseConv.from_dense(nnx.Conv(2, 2, 3, rngs=nnx.Rngs(0))), ValueError,
     r"conv.kernel_size=\(3,\) asks for a 1-D convolution"),
])
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_building_under_jit_explains():
    with pytest.raises(TypeError, match="outside jit"):
        nnx.eval_shape(lambda: SparseConv(2, 2, (3, 3), rngs=nnx.Rngs(0)))
