"""Flax's `dtype` and `param_dtype` on the nnx and linen layers: storage, promotion,
conversions, training in mixed precision, sparsify, errors."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparseprop_jax as sp
from sparseprop_jax import linen as sp_linen
from sparseprop_jax import nnx as sp_nnx
from sparseprop_jax.linen import PATTERN_COLLECTION
from sparseprop_jax.sparsify import densify, sparse_apply, sparsify

F32, BF16 = jnp.float32, jnp.bfloat16
KINDS = ("nnx.SparseDense", "nnx.SparseConv", "linen.SparseDense", "linen.SparseConv")
_X_SHAPE = {"dense": (4, 24), "conv": (2, 7, 7, 3)}


def _const(array):
    return lambda key, shape, dtype=None: jnp.asarray(array, dtype)


def _bias_init(key, shape, dtype=F32):
    # A nonzero bias, so its dtype and promotion matter in the comparisons.
    return jax.random.normal(key, shape, dtype)


def _x(kind, dtype):
    shape = _X_SHAPE["conv" if kind.endswith("Conv") else "dense"]
    return jax.random.normal(jax.random.key(7), shape, F32).astype(dtype)


_PADDING = ((1, 0), (0, 1))


def _case(kind, **dtypes):
    """(sparse layer's call, the equivalent Flax dense layer's call, the sparse layer's
    params, its `SparseWeight` as stored).

    The dense layer is built from the sparse kernel with the same dtype arguments.
    """
    conv = kind.endswith("Conv")
    if kind.startswith("nnx"):
        if conv:
            layer = sp_nnx.SparseConv(3, 6, (3, 3), 2, padding=_PADDING, sparsity=0.7,
                                      bias_init=_bias_init, rngs=nnx.Rngs(0), **dtypes)
            dense = nnx.Conv(3, 6, (3, 3), 2, padding=_PADDING,
                             kernel_init=_const(layer.weight.to_dense()),
                             bias_init=_const(layer.bias[...]), rngs=nnx.Rngs(0), **dtypes)
        else:
            layer = sp_nnx.SparseDense(24, 10, sparsity=0.7, bias_init=_bias_init,
                                       rngs=nnx.Rngs(0), **dtypes)
            dense = nnx.Linear(24, 10, kernel_init=_const(layer.weight.to_dense()),
                               bias_init=_const(layer.bias[...]), rngs=nnx.Rngs(0), **dtypes)
        return (layer, dense, {"values": layer.values[...], "bias": layer.bias[...]},
                layer.weight)
    cls = sp_linen.SparseConv if conv else sp_linen.SparseDense
    if conv:
        model = cls(6, (3, 3), 2, _PADDING, sparsity=0.7, bias_init=_bias_init, **dtypes)
        dense_model = nn.Conv(6, (3, 3), 2, _PADDING, **dtypes)
    else:
        model = cls(10, sparsity=0.7, bias_init=_bias_init, **dtypes)
        dense_model = nn.Dense(10, **dtypes)
    variables = model.init(jax.random.key(0), _x(kind, F32))
    return (lambda x: model.apply(variables, x),
            lambda x: dense_model.apply(cls.to_dense_variables(variables), x),
            dict(variables["params"]), cls.weight(variables))


def _assert_close(actual, expected):
    """Within bfloat16's rounding when either side is bfloat16, else float32's."""
    actual, expected = (np.asarray(a, np.float32) for a in (actual, expected))
    tol = 2e-2 if jnp.bfloat16 in (actual.dtype, expected.dtype) else 1e-5
    scale = np.abs(expected).max(initial=1.0)
    np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=tol * scale)


def _dtypes_of(tree):
    return {jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(tree)}


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compute_with_f32_params_matches_flax(kind):
    sparse, dense, params, _ = _case(kind, dtype=BF16, param_dtype=F32)
    assert _dtypes_of(params) == {"float32"}
    x = _x(kind, F32)
    y, y_dense = sparse(x), dense(x)
    assert y.dtype == y_dense.dtype == BF16
    # Relative to the output scale: both round inputs and parameters to bfloat16.
    scale = float(np.abs(np.asarray(y_dense, np.float32)).max())
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_dense, np.float32),
                               rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_params_are_created_in_bf16(kind):
    sparse, dense, params, _ = _case(kind, param_dtype=BF16)
    assert _dtypes_of(params) == {"bfloat16"}
    x = _x(kind, BF16)
    assert sparse(x).dtype == dense(x).dtype == BF16
    _assert_close(sparse(x), dense(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, param_dtype, x_dtype",
                         list(itertools.product((None, F32, BF16), (F32, BF16),
                                                (F32, BF16, jnp.float16))))
def test_output_dtype_follows_flax_promotion(kind, dtype, param_dtype, x_dtype):
    # dtype=None infers the common dtype as Flax does: bfloat16 with float32 gives float32,
    # and so does a float16 input with either (so float16 never reaches the op).
    sparse, dense, _, _ = _case(kind, dtype=dtype, param_dtype=param_dtype)
    x = _x(kind, x_dtype)
    y, y_dense = sparse(x), dense(x)
    assert y.dtype == y_dense.dtype
    _assert_close(y, y_dense)


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_stay_float32_as_before(kind):
    sparse, _, params, weight = _case(kind)
    assert _dtypes_of(params) == {"float32"}
    x = _x(kind, F32)
    y = sparse(x)
    assert y.dtype == F32
    # Nothing cast on the default path: bit for bit the op on the stored parameters.
    if kind.endswith("Conv"):
        expected = sp.sparse_conv2d(x, weight, params["bias"], 2, _PADDING)
    else:
        expected = sp.sparse_linear(x, weight, params["bias"])
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_param_gradients_come_back_in_param_dtype(kind):
    sparse, _, _, _ = _case(kind, dtype=BF16, param_dtype=F32)
    x = _x(kind, F32)
    if kind.startswith("nnx"):
        grads = nnx.grad(lambda m: jnp.sum(m(x).astype(F32) ** 2))(sparse)
        grads = {"values": grads["values"][...], "bias": grads["bias"][...]}
    else:
        model = (sp_linen.SparseConv(6, (3, 3), 2, _PADDING, dtype=BF16)
                 if kind.endswith("Conv") else sp_linen.SparseDense(10, dtype=BF16))
        variables = model.init(jax.random.key(0), x)
        grads = jax.grad(lambda p: jnp.sum(model.apply(
            {"params": p, PATTERN_COLLECTION: variables[PATTERN_COLLECTION]}, x
        ).astype(F32) ** 2))(variables["params"])
    assert _dtypes_of(grads) == {"float32"}
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


# -- conversions ---------------------------------------------------------------
@pytest.mark.parametrize("dtype, param_dtype", [(BF16, F32), (BF16, BF16), (None, BF16)])
def test_nnx_from_dense_and_to_dense_keep_dtypes(dtype, param_dtype):
    linear = nnx.Linear(6, 4, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    conv = nnx.Conv(2, 3, (3, 3), 2, padding="VALID", dtype=dtype, param_dtype=param_dtype,
                    rngs=nnx.Rngs(0))
    for dense, cls in ((linear, sp_nnx.SparseDense), (conv, sp_nnx.SparseConv)):
        layer = cls.from_dense(dense)
        assert (layer.dtype, layer.param_dtype) == (dtype, param_dtype)
        assert _dtypes_of((layer.values[...], layer.bias[...])) == {jnp.dtype(param_dtype).name}
        back = layer.to_dense()
        assert type(back) is type(dense)
        assert (back.dtype, back.param_dtype) == (dtype, param_dtype)
        np.testing.assert_array_equal(np.asarray(back.kernel[...], np.float32),
                                      np.asarray(dense.kernel[...], np.float32))
        assert back.kernel[...].dtype == dense.kernel[...].dtype


def test_nnx_from_dense_kernel_takes_dtype_arguments(rng):
    kernel = rng.standard_normal((5, 3)).astype(np.float32)
    assert sp_nnx.SparseDense.from_dense(kernel).values[...].dtype == F32
    bf16 = sp_nnx.SparseDense.from_dense(jnp.asarray(kernel, BF16))
    assert bf16.param_dtype == BF16 and bf16.values[...].dtype == BF16
    mixed = sp_nnx.SparseDense.from_dense(kernel, np.ones(3, np.float32), dtype=BF16,
                                          param_dtype=BF16)
    assert mixed.dtype == BF16 and _dtypes_of((mixed.values[...], mixed.bias[...])) == {
        "bfloat16"}
    conv = sp_nnx.SparseConv.from_dense(np.ones((3, 3, 2, 4), np.float32), dtype=BF16)
    assert conv(jnp.ones((1, 5, 5, 2))).dtype == BF16 and conv.values[...].dtype == F32
    with pytest.raises(ValueError, match="param_dtype must be None when an nnx.Linear"):
        sp_nnx.SparseDense.from_dense(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), param_dtype=BF16)
    with pytest.raises(ValueError, match="dtype must be None when an nnx.Conv"):
        sp_nnx.SparseConv.from_dense(nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0)), dtype=BF16)


def test_linen_variables_keep_the_kernel_dtype():
    dense = nn.Dense(4, param_dtype=BF16)
    dense_vars = dense.init(jax.random.key(0), jnp.ones((1, 6)))
    variables = sp_linen.SparseDense.variables_from_dense(dense_vars)
    assert _dtypes_of(variables["params"]) == {"bfloat16"}
    back = sp_linen.SparseDense.to_dense_variables(variables)
    assert _dtypes_of(back["params"]) == {"bfloat16"}
    x = jnp.ones((2, 6), F32)
    y = sp_linen.SparseDense(4, dtype=BF16, param_dtype=BF16).apply(variables, x)
    assert y.dtype == BF16
    _assert_close(y, nn.Dense(4, dtype=BF16, param_dtype=BF16).apply(dense_vars, x))


def test_conv_padding_is_keyword_only_as_in_flax():
    with pytest.raises(TypeError, match="positional"):
        sp_nnx.SparseConv(2, 3, (3, 3), 1, "VALID", rngs=nnx.Rngs(0))
    layer = sp_nnx.SparseConv(2, 3, (3, 3), 2, padding="VALID", rngs=nnx.Rngs(0))
    assert (layer.strides, layer.padding) == ((2, 2), "VALID")
    # Linen's Conv takes them positionally (dataclass fields), and so does ours.
    assert sp_linen.SparseConv(3, (3, 3), 2, "VALID").padding == "VALID"


def test_repr_shows_non_default_dtypes():
    layer = sp_nnx.SparseDense(4, 3, dtype=BF16, rngs=nnx.Rngs(0))
    assert repr(layer).endswith("use_bias=True, dtype=bfloat16)")
    layer = sp_nnx.SparseDense(4, 3, param_dtype=BF16, rngs=nnx.Rngs(0))
    assert repr(layer).endswith("use_bias=True, param_dtype=bfloat16)")
    assert "dtype" not in repr(sp_nnx.SparseDense(4, 3, rngs=nnx.Rngs(0)))


# -- errors ----------------------------------------------------------------------
def _make(kind, **kwargs):
    if kind == "nnx.SparseDense":
        return sp_nnx.SparseDense(4, 3, rngs=nnx.Rngs(0), **kwargs)
    if kind == "nnx.SparseConv":
        return sp_nnx.SparseConv(2, 3, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    if kind == "linen.SparseDense":
        return sp_linen.SparseDense(3, **kwargs)
    return sp_linen.SparseConv(3, (3, 3), **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kwargs, match", [
    ({"param_dtype": jnp.float16}, r"param_dtype must be one of the supported dtypes "
                                   r"\(float32, bfloat16\), got float16"),
    ({"param_dtype": None}, r"param_dtype must be one of the supported dtypes .*got None"),
    ({"dtype": jnp.int32}, r": dtype must be one of the supported dtypes "
                           r"\(float32, bfloat16 or None\), got int32"),
    ({"dtype": "float64"}, r": dtype must be .*got float64"),
    ({"dtype": "not a dtype"}, r": dtype must be .*got 'not a dtype'"),
])
def test_bad_dtype_arguments_fail_at_construction(kind, kwargs, match):
    with pytest.raises(TypeError, match=f"{kind}: " + match.lstrip(": ")):
        _make(kind, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [None, "abc"])
def test_non_array_inputs_are_named_before_promotion(kind, bad):
    layer = _make(kind, dtype=BF16)
    call = layer if kind.startswith("nnx") else (lambda x: layer.init(jax.random.key(0), x))
    with pytest.raises(TypeError, match=f"{kind}: inputs must be an array"):
        call(bad)


# -- training --------------------------------------------------------------------
def _problem(n=128, n_in=64, classes=10):
    kx, kt = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (n, n_in), F32)
    labels = jnp.argmax(x @ jax.random.normal(kt, (n_in, classes), F32), axis=-1)
    return x, labels


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(F32), labels).mean()


class _MLP(nnx.Module):
    def __init__(self, rngs):
        kwargs = {"sparsity": 0.9, "dtype": BF16, "param_dtype": F32, "rngs": rngs}
        self.fc1 = sp_nnx.SparseDense(64, 32, **kwargs)
        self.fc2 = sp_nnx.SparseDense(32, 10, **kwargs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_mixed_precision_trains_with_adamw():
    x, labels = _problem()
    model = _MLP(nnx.Rngs(0))
    zeros = [np.asarray(layer.weight.to_dense()) == 0 for layer in (model.fc1, model.fc2)]
    optimizer = nnx.Optimizer(model, optax.adamw(5e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), labels))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.75 * losses[0]
    assert model(x).dtype == BF16
    assert _dtypes_of(nnx.state(model, nnx.Param)) == {"float32"}
    for layer, was_zero in zip((model.fc1, model.fc2), zeros):
        kernel = np.asarray(layer.weight.to_dense())
        assert np.all(kernel[was_zero] == 0)  # the pattern never changes
        assert np.count_nonzero(kernel) == layer.nnz


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(sp_linen.SparseDense(32, sparsity=0.9, dtype=BF16)(x))
        return sp_linen.SparseDense(10, sparsity=0.9, dtype=BF16)(x)


def test_linen_mixed_precision_trains_with_adamw():
    x, labels = _problem()
    model = _LinenMLP()
    variables = model.init(jax.random.key(0), x)
    params, patterns = variables["params"], variables[PATTERN_COLLECTION]
    tx = optax.adamw(5e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return _loss(model.apply({"params": p, PATTERN_COLLECTION: patterns}, x), labels)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.75 * losses[0]
    assert _dtypes_of(params) == {"float32"}
    for name in ("SparseDense_0", "SparseDense_1"):
        before = {"params": variables["params"][name], PATTERN_COLLECTION: patterns[name]}
        after = {"params": params[name], PATTERN_COLLECTION: patterns[name]}
        was_zero = np.asarray(sp_linen.SparseDense.weight(before).to_dense()) == 0
        kernel = np.asarray(sp_linen.SparseDense.weight(after).to_dense())
        assert np.all(kernel[was_zero] == 0)
        assert np.count_nonzero(kernel) == np.count_nonzero(~was_zero)


# -- sparsify --------------------------------------------------------------------
class _CNN(nnx.Module):
    def __init__(self, rngs, dtype, param_dtype):
        kwargs = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.conv = nnx.Conv(3, 8, (3, 3), 2, **kwargs)
        self.head = nnx.Linear(8, 5, **kwargs)

    def __call__(self, x):
        return self.head(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))


@pytest.mark.parametrize("param_dtype", [F32, BF16])
def test_nnx_sparsify_keeps_dtypes(param_dtype):
    x = _x("nnx.SparseConv", F32)
    model, report = sparsify(_CNN(nnx.Rngs(0), BF16, param_dtype), 0.6)
    assert all(r.is_sparse for r in report)
    assert isinstance(model.conv, sp_nnx.SparseConv) and isinstance(model.head,
                                                                      sp_nnx.SparseDense)
    for layer in (model.conv, model.head):
        assert (layer.dtype, layer.param_dtype) == (BF16, param_dtype)
        assert _dtypes_of((layer.values[...], layer.bias[...])) == {
            jnp.dtype(param_dtype).name}
    y = model(x)
    assert y.dtype == BF16
    dense = densify(model, copy=True)
    assert (dense.conv.dtype, dense.head.param_dtype) == (BF16, param_dtype)
    _assert_close(y, dense(x))


class _LinenCNN(nn.Module):
    param_dtype: object = F32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), 2, dtype=BF16, param_dtype=self.param_dtype)(x))
        return nn.Dense(5, dtype=BF16, param_dtype=self.param_dtype)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize("param_dtype", [F32, BF16])
def test_linen_sparsify_keeps_dtypes(param_dtype):
    x = _x("linen.SparseConv", F32)
    module = _LinenCNN(param_dtype)
    variables = module.init(jax.random.key(0), x)
    sparse, report = sparsify(module, 0.6, variables=variables, inputs=x)
    assert all(r.is_sparse for r in report)
    assert _dtypes_of(sparse["params"]) == {jnp.dtype(param_dtype).name}
    y = sparse_apply(module)(sparse, x)
    # The unchanged modules' dtype: their bfloat16 computation, as the dense model's.
    y_dense = module.apply(densify(sparse), x)
    assert y.dtype == y_dense.dtype == BF16
    _assert_close(y, y_dense)
