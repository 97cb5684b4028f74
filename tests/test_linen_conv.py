"""The Flax Linen SparseConv: values, conversions, training, transforms, errors."""

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
from sparseprop_jax.linen import PATTERN_COLLECTION, SparseConv, SparseDense

_PATTERN_KEYS = {"indptr", "indices", "t_indptr", "t_indices", "t_perm", "shape"}


def _conv_kernel(rng, kh, kw, cin, cout, sparsity):
    return random_kernel(rng, kh * kw * cin, cout, sparsity).reshape(kh, kw, cin, cout)


def _kernel(variables, kernel_size=(3, 3)) -> np.ndarray:
    return np.asarray(SparseConv.to_dense_variables(variables, kernel_size)["params"]["kernel"])


def _dense_conv(kernel, bias, strides, padding):
    """A linen.Conv and its variables holding `kernel` and `bias`."""
    kh, kw, _, cout = kernel.shape
    params = {"kernel": jnp.asarray(kernel)}
    if bias is not None:
        params["bias"] = jnp.asarray(bias)
    conv = nn.Conv(cout, (kh, kw), strides, padding, use_bias=bias is not None,
                   precision="highest")
    return conv, {"params": params}


@pytest.mark.parametrize("ksize", [3, 1], ids=lambda k: f"{k}x{k}")
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides", [1, 2])
def test_output_matches_linen_conv(rng, ksize, padding, strides):
    kernel = _conv_kernel(rng, ksize, ksize, 3, 5, 0.6)
    bias = rng.standard_normal(5).astype(np.float32)
    variables = SparseConv.variables_from_dense(kernel, bias)
    model = SparseConv(5, (ksize, ksize), strides, padding)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    y = model.apply(variables, x)
    conv, dense_variables = _dense_conv(kernel, bias, strides, padding)
    expected = conv.apply(dense_variables, x)
    assert y.shape == expected.shape
    assert_close(y, expected, scale_terms=ksize * ksize * 3)
    assert_close(y, conv.apply(SparseConv.to_dense_variables(variables, (ksize, ksize)), x),
                 scale_terms=ksize * ksize * 3)


def test_explicit_padding_no_bias_unbatched_and_kernel_choice(rng):
    kernel = _conv_kernel(rng, 3, 2, 4, 6, 0.7)
    variables = SparseConv.variables_from_dense(kernel)
    x = rng.standard_normal((3, 9, 8, 4)).astype(np.float32)
    conv, dense_variables = _dense_conv(kernel, None, 2, ((2, 0), (1, 1)))
    expected = conv.apply(dense_variables, x)
    for conv_variant in ("batch", "width"):
        model = SparseConv(6, (3, 2), (2, 2), ((2, 0), 1), use_bias=False,
                           conv_variant=conv_variant)
        y = model.apply(variables, x)
        assert_close(y, expected, scale_terms=24)
        assert_close(model.apply(variables, x[1]), expected[1], scale_terms=24)


def test_init_has_exact_sparsity_and_collections():
    model = SparseConv(features=6, kernel_size=(3, 3), sparsity=0.9)
    x = jnp.ones((1, 5, 5, 4))
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params", PATTERN_COLLECTION}
    assert set(variables["params"]) == {"values", "bias"}
    assert set(variables[PATTERN_COLLECTION]) == _PATTERN_KEYS
    weight = SparseConv.weight(variables, (3, 3))
    assert weight.shape == (3, 3, 4, 6)
    assert weight.nnz == 216 - 194 and weight.sparsity == pytest.approx(194 / 216)
    assert np.count_nonzero(_kernel(variables)) == 22
    same = model.init(jax.random.key(0), x)
    other = model.init(jax.random.key(1), x)
    np.testing.assert_array_equal(_kernel(same), _kernel(variables))
    assert not np.array_equal(_kernel(other) != 0, _kernel(variables) != 0)
    assert "bias" not in SparseConv(3, (1, 1), use_bias=False).init(
        jax.random.key(0), x)["params"]
    # Unbatched input at init.
    assert SparseConv(3, (2, 2), sparsity=0.0).init(
        jax.random.key(0), jnp.ones((5, 5, 4)))["params"]["values"].shape == (48,)


def test_from_dense_keeps_zeros_and_round_trips(rng):
    kernel = _conv_kernel(rng, 3, 3, 2, 4, 0.6)
    bias = rng.standard_normal(4).astype(np.float32)
    variables = SparseConv.variables_from_dense(kernel, bias)
    assert variables["params"]["values"].shape == (np.count_nonzero(kernel),)
    dense = SparseConv.to_dense_variables(variables, (3, 3))
    np.testing.assert_array_equal(dense["params"]["kernel"], kernel)
    np.testing.assert_array_equal(dense["params"]["bias"], bias)
    again = SparseConv.variables_from_dense(dense)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    mask = kernel != 0
    mask[1, 1] = True  # explicit zeros in the mask are kept as entries
    masked = SparseConv.variables_from_dense(kernel, mask=mask)
    assert masked["params"]["values"].shape == (mask.sum(),)
    assert "bias" not in masked["params"]
    np.testing.assert_array_equal(_kernel(masked), kernel)


class _SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(SparseConv(16, (3, 3), sparsity=0.5)(x))
        x = nn.relu(SparseConv(32, (3, 3), strides=2, sparsity=0.8)(x))
        return SparseDense(10, sparsity=0.5)(x.reshape(x.shape[0], -1))


def _digits(n=256):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:n] / 16.0).astype(np.float32)[..., None]
    return jnp.asarray(x), jnp.asarray(digits.target[:n])


def test_small_cnn_optax_trains_only_nonzeros():
    model = _SmallCNN()
    x, labels = _digits()
    variables = model.init(jax.random.key(0), x)
    params, pattern = variables["params"], variables[PATTERN_COLLECTION]
    layer_vars = lambda p, name: {"params": p[name], PATTERN_COLLECTION: pattern[name]}  # noqa
    kernels = {"SparseConv_0": lambda v: _kernel(v), "SparseConv_1": lambda v: _kernel(v),
               "SparseDense_0": lambda v: np.asarray(SparseDense.weight(v).to_dense())}
    masks = {name: get(layer_vars(params, name)) != 0 for name, get in kernels.items()}
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    param_shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
    assert {leaf.shape for leaf in jax.tree.leaves(opt_state)} <= param_shapes | {()}
    assert all(len(shape) <= 1 for shape in param_shapes)  # values and biases only

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p, PATTERN_COLLECTION: pattern}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(15):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    for name, get in kernels.items():
        kernel = get(layer_vars(params, name))
        assert np.all(kernel[~masks[name]] == 0.0)
        assert np.count_nonzero(kernel) == masks[name].sum()


def test_grad_matches_dense(rng):
    kernel = _conv_kernel(rng, 3, 3, 2, 4, 0.5)
    variables = SparseConv.variables_from_dense(kernel, rng.standard_normal(4).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 7, 7, 2)), jnp.float32)
    pattern = variables[PATTERN_COLLECTION]
    loss = lambda p: jnp.sum(jnp.sin(  # noqa: E731
        SparseConv(4, (3, 3), 2).apply({"params": p, PATTERN_COLLECTION: pattern}, x)))
    grads = jax.grad(loss)(variables["params"])
    dense_params = SparseConv.to_dense_variables(variables, (3, 3))["params"]
    conv = nn.Conv(4, (3, 3), 2, precision="highest")
    dense_grads = jax.grad(lambda p: jnp.sum(jnp.sin(conv.apply({"params": p}, x))))(
        dense_params)
    expected = sp.SparseWeight.gather(dense_grads["kernel"],
                                      SparseConv.weight(variables, (3, 3)).pattern)
    assert_close(grads["values"], expected.values, scale_terms=32)
    assert_close(grads["bias"], dense_grads["bias"], scale_terms=32)


def test_variables_serialize(rng):
    variables = SparseConv.variables_from_dense(_conv_kernel(rng, 3, 3, 2, 4, 0.5))
    x = jnp.ones((2, 5, 5, 2))
    restored = serialization.from_bytes(variables, serialization.to_bytes(variables))
    model = SparseConv(4, (3, 3), use_bias=False)
    np.testing.assert_array_equal(model.apply(restored, x), model.apply(variables, x))


def _k(*shape):
    return np.ones(shape, np.float32)


def _vars(kh=3, kw=3, cin=2, cout=3):
    return SparseConv.variables_from_dense(_k(kh, kw, cin, cout))


@pytest.mark.parametrize("make, error, match", [
    (lambda: SparseConv(0, (3, 3)), ValueError, "features must be a positive"),
    (lambda: SparseConv(3, (3, 3), sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: SparseConv(3, 3), ValueError, r"kernel_size must be a pair \(kh, kw\).*1-D"),
    (lambda: SparseConv(3, (3, 3, 3)), ValueError, "3-D convolution, which is not supported"),
    (lambda: SparseConv(3, (3, 3), strides=(2, 1)), ValueError,
     "strides=.*is not supported.*must be equal"),
    (lambda: SparseConv(3, (3, 3), padding="CIRCULAR"), ValueError,
     "padding='CIRCULAR' is not supported"),
    (lambda: SparseConv(3, (3, 3), padding="CAUSAL"), ValueError,
     "padding='CAUSAL' is not supported"),
    (lambda: SparseConv(3, (3, 3), padding=((1, 2, 3), 1)), ValueError,
     "padding must be 'SAME', 'VALID'"),
    (lambda: SparseConv(3, (3, 3), kernel_dilation=2), ValueError,
     "kernel_dilation=2 is not supported"),
    (lambda: SparseConv(3, (3, 3), input_dilation=2), ValueError,
     "input_dilation=2 is not supported"),
    (lambda: SparseConv(3, (3, 3), feature_group_count=3), ValueError,
     "feature_group_count=3 is not supported"),
    (lambda: SparseConv(3, (3, 3), conv_variant="im2col"), ValueError,
     "conv_variant must be one of"),
    (lambda: SparseConv(3, (3, 3)).apply({"params": {}}, jnp.ones((1, 4, 4, 2))), ValueError,
     f"must include the '{PATTERN_COLLECTION}' collection"),
    (lambda: SparseConv(5, (3, 3)).apply(_vars(), jnp.ones((1, 4, 4, 2))), ValueError,
     "features=5 does not match"),
    (lambda: SparseConv(3, (2, 2)).apply(_vars(), jnp.ones((1, 4, 4, 2))), ValueError,
     r"kernel_size=\(2, 2\) with 2 input channels needs a pattern of 8 rows"),
    (lambda: SparseConv(3, (3, 3)).apply(_vars(), jnp.ones((1, 4, 4, 5))), ValueError,
     "with 5 input channels needs a pattern of 45 rows"),
    (lambda: SparseConv(3, (3, 3)).apply(_vars(), jnp.ones((4, 2))), ValueError,
     r"inputs must have shape \[N, H, W, C\]"),
    (lambda: jax.jit(SparseConv(3, (3, 3)).init)(jax.random.key(0), jnp.ones((1, 4, 4, 2))),
     TypeError, "initialise the layer outside jit"),
    (lambda: SparseConv.variables_from_dense(_k(3, 3)), ValueError,
     r"kernel must be 4-D \(kh, kw, in_features, out_features\)"),
    (lambda: SparseConv.variables_from_dense(np.ones((3, 3, 2, 2), np.int32)), TypeError,
     "kernel must be float32"),
    (lambda: SparseConv.variables_from_dense(_k(3, 3, 2, 2), mask=np.ones((3, 3), bool)),
     ValueError, r"mask must have shape \(3, 3, 2, 2\)"),
    (lambda: SparseConv.variables_from_dense(_k(3, 3, 2, 2), np.ones(3, np.float32)),
     ValueError, r"bias must have shape \(2,\)"),
    (lambda: SparseConv.variables_from_dense({"params": {"kernel": _k(3, 3, 2, 2)}},
                                             np.ones(2, np.float32)),
     ValueError, "bias must be None"),
    (lambda: SparseConv.variables_from_dense({"kernel": _k(3, 3, 2, 2)}), ValueError,
     "kernel_or_conv_variables must be"),
    (lambda: SparseConv.to_dense_variables({"params": {}}, (3, 3)), ValueError,
     f"'{PATTERN_COLLECTION}' collection"),
    (lambda: SparseConv.to_dense_variables(_vars(), (2, 2)), ValueError,
     r"kernel_size=\(2, 2\) does not fit the pattern"),
    (lambda: SparseConv.weight(_vars(), 3), ValueError, "kernel_size must be a pair"),
])
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_weight_needs_no_kernel_size(rng):
    kernel = _conv_kernel(rng, 3, 1, 2, 4, 0.5)  # (3, 1) has the matrix view of (1, 3)
    variables = SparseConv.variables_from_dense(kernel)
    np.testing.assert_array_equal(SparseConv.weight(variables).to_dense(), kernel)
    np.testing.assert_array_equal(
        SparseConv.to_dense_variables(variables)["params"]["kernel"], kernel)
    np.testing.assert_array_equal(SparseConv.weight(variables, (3, 1)).to_dense(), kernel)
    with pytest.raises(ValueError, match=r"kernel_size=\(1, 3\) does not fit the pattern"):
        SparseConv.weight(variables, (1, 3))
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 2)), jnp.float32)
    layer = SparseConv(4, (3, 1), use_bias=False)
    np.testing.assert_array_equal(jax.jit(layer.apply)(variables, x), layer.apply(variables, x))
    with pytest.raises(ValueError, match=r"kernel_size=\(1, 3\) with 2 input channels"):
        SparseConv(4, (1, 3), use_bias=False).apply(variables, x)


def test_variables_without_the_kernel_shape_say_how_to_add_it(rng):
    variables = _vars()
    del variables[PATTERN_COLLECTION]["shape"]
    with pytest.raises(ValueError, match="lacks its kernel shape 'shape'.*np.array"):
        SparseConv(3, (3, 3)).apply(variables, jnp.ones((1, 4, 4, 2)))
