"""sparseprop_jax.conv_general_dilated against lax.conv_general_dilated: values and gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax

import sparseprop_jax as sp
from conftest import tasks_per_call
from sparseprop_jax import _ffi, _targets, dense_conv

LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _value_and_grads(conv, x, w, ct, *args, **kwargs):
    def loss(x, w):
        return jnp.sum(conv(x, w, *args, **kwargs) * ct)
    y = conv(x, w, *args, **kwargs)
    return (y, *jax.grad(loss, argnums=(0, 1))(x, w))


def _check(x_shape, w_shape, strides, padding, dimension_numbers, **kwargs):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, dtype=np.float32))
    args = (strides, padding)
    kwargs = dict(dimension_numbers=dimension_numbers, **kwargs)
    y_ref = lax.conv_general_dilated(x, w, *args, **kwargs)
    ct = jnp.asarray(rng.standard_normal(y_ref.shape, dtype=np.float32))
    want = _value_and_grads(lax.conv_general_dilated, x, w, ct, *args, **kwargs)
    got = jax.jit(lambda x, w: _value_and_grads(sp.conv_general_dilated, x, w, ct, *args,
                                                **kwargs))(x, w)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert g.shape == r.shape, name
        scale = float(np.max(np.abs(r), initial=0.0)) + 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                                   atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((4, 17, 15, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),   # the stem: two-step patches
    ((3, 9, 11, 20), (3, 3, 20, 6), (1, 1), "SAME"),             # one-step patches
    ((2, 8, 8, 16), (3, 3, 16, 5), (2, 2), "SAME"),
    ((2, 7, 9, 5), (2, 3, 5, 4), (3, 2), ((0, 2), (1, 0))),      # asymmetric everything
    ((5, 6, 6, 32), (1, 1, 32, 7), (1, 1), "VALID"),             # a 1x1 conv: a plain dot
    ((5, 6, 6, 32), (1, 1, 32, 7), (2, 2), "VALID"),             # strided 1x1 (a shortcut)
    ((1, 4, 4, 2), (4, 4, 2, 3), (1, 1), "VALID"),               # output 1x1
    ((0, 5, 5, 3), (3, 3, 3, 2), (1, 1), "SAME"),                # empty batch
    # The C++ weight gradient's edges: output channels past whole vectors (13,
    # 37: AVX2 and AVX-512 lanes), kernel rows of kw x cin = 4 and 5 entries
    # (blocks of 3 leave 1 and 2), and several pixel blocks (2400 pixels).
    ((2, 9, 10, 2), (2, 2, 2, 13), (1, 1), "SAME"),
    ((3, 8, 7, 1), (3, 5, 1, 37), (2, 1), ((2, 2), (1, 3))),
    ((6, 40, 40, 3), (7, 7, 3, 24), (2, 2), ((3, 3), (3, 3))),
    ((2, 6, 5, 70), (3, 3, 70, 9), (1, 1), "SAME"),              # rows of 210: patches x dy
])
def test_2d_matches_lax(x_shape, w_shape, strides, padding, simd_path):
    _check(x_shape, w_shape, strides, padding, LAYOUTS[2])


@pytest.mark.parametrize("spatial", [1, 3])
@pytest.mark.parametrize("channels", [3, 17])
def test_1d_and_3d_match_lax(spatial, channels):
    size = (9, 7, 6)[:spatial]
    window = (3, 2, 3)[:spatial]
    _check((2, *size, channels), (*window, channels, 4), (2,) * spatial, "SAME",
           LAYOUTS[spatial])


def test_dimension_number_forms():
    dn = lax.conv_dimension_numbers((2, 8, 8, 3), (3, 3, 3, 4), LAYOUTS[2])
    _check((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME", dn)


@pytest.mark.parametrize("case", ["lhs_dilation", "rhs_dilation", "groups", "nchw", "default",
                                  "negative_padding"])
def test_other_convolutions_go_to_lax(case, monkeypatch):
    calls = []
    real = lax.conv_general_dilated

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(dense_conv.lax, "conv_general_dilated", spy)
    x_shape, w_shape, dn, padding, kwargs = (2, 8, 8, 4), (3, 3, 4, 6), LAYOUTS[2], "SAME", {}
    if case == "lhs_dilation":
        padding, kwargs = ((1, 1), (1, 1)), dict(lhs_dilation=(2, 2))
    elif case == "rhs_dilation":
        kwargs = dict(rhs_dilation=(2, 1))
    elif case == "groups":
        w_shape, kwargs = (3, 3, 2, 6), dict(feature_group_count=2)
    elif case == "nchw":
        x_shape, w_shape, dn = (2, 4, 8, 8), (6, 4, 3, 3), ("NCHW", "OIHW", "NCHW")
    elif case == "default":
        x_shape, w_shape, dn = (2, 4, 8, 8), (6, 4, 3, 3), None
    else:
        padding = ((-1, 1), (1, 1))
    monkeypatch.setattr(dense_conv.lax, "conv_general_dilated", real)
    _check(x_shape, w_shape, (1, 1), padding, dn, **kwargs)
    monkeypatch.setattr(dense_conv.lax, "conv_general_dilated", spy)
    x = jnp.ones(x_shape)
    sp.conv_general_dilated(x, jnp.ones(w_shape), (1, 1), padding, dimension_numbers=dn,
                            **kwargs)
    assert calls, "expected lax.conv_general_dilated to run this case"


def _convolutions(fn, *args) -> int:
    """How many convolutions XLA is given for fn(*args)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.convolution")


def test_gradients_are_products_not_convolutions():
    def loss(conv):
        return jax.value_and_grad(lambda x, w: jnp.sum(conv(
            x, w, (1, 1), "SAME", dimension_numbers=LAYOUTS[2])), argnums=(0, 1))
    # Kernel rows (kw x cin) past dense_conv._CPP_MAX_ROW: XLA's forward, products after.
    x, w = jnp.ones((2, 8, 8, 70)), jnp.ones((3, 3, 70, 4))
    assert _convolutions(loss(lax.conv_general_dilated), x, w) == 3
    assert _convolutions(loss(sp.conv_general_dilated), x, w) == 1  # the forward
    # Short rows: the C++ forward, no convolution at all.
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    assert _convolutions(loss(sp.conv_general_dilated), x, w) == 0
    assert _targets.DENSE_CONV_FORWARD.name in jax.jit(loss(sp.conv_general_dilated)).lower(
        x, w).as_text()
    # So in Flax's layers too (they pass out_sharding=None and tuple dimension numbers).
    x = jnp.ones((2, 8, 8, 70))
    layer = nnx.Conv(70, 4, (3, 3), rngs=nnx.Rngs(0), conv_general_dilated=sp.conv_general_dilated)
    graphdef, state = nnx.split(layer)
    assert _convolutions(lambda s: nnx.merge(graphdef, s)(x), state) == 1
    # (grad alone: the forward's output is not needed, so no convolution at all)
    assert _convolutions(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x))), state) == 0


def _weight_grad(x, w, strides=(2, 2), padding=((3, 3), (3, 3))):
    return jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(sp.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=LAYOUTS[2])))))(w)


def test_2d_products_by_kernel_row_length():
    # The C++ products up to dense_conv._CPP_MAX_ROW entries per kernel row
    # (kw x cin); XLA's convolution and patches times dy past it.
    def hlo(cin, kw):
        x, w = jnp.ones((2, 8, 8, cin)), jnp.ones((3, kw, cin, 4))
        return jax.jit(jax.value_and_grad(lambda w: jnp.sum(sp.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=LAYOUTS[2])))).lower(w).as_text()
    for cin, kw, cpp in ((3, 7, True), (64, 3, True), (65, 3, False), (128, 1, True)):
        text = hlo(cin, kw)
        assert (_targets.DENSE_CONV_FORWARD.name in text) == cpp, (cin, kw)
        assert (_targets.DENSE_CONV_WEIGHT_GRAD.name in text) == cpp, (cin, kw)
        assert ("dot_general" in text) == (not cpp), (cin, kw)
        assert ("stablehlo.convolution" in text) == (not cpp), (cin, kw)


def test_2d_weight_gradient_is_deterministic():
    # Pixel blocks fixed by the shapes, partials added in block order: the
    # same bits for any number of tasks.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 40, 40, 3), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((7, 7, 3, 16), dtype=np.float32))
    results = []
    for n in (1, 2, 7):
        with tasks_per_call(n):
            results.append(np.asarray(_weight_grad(x, w)))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_2d_weight_gradient_per_example_under_vmap():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((3, 2, 9, 9, 3), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 10), dtype=np.float32))

    def per_example(conv):
        grad = jax.grad(lambda w, x: jnp.sum(jnp.sin(conv(
            x, w, (2, 2), "SAME", dimension_numbers=LAYOUTS[2]))))
        return jax.jit(jax.vmap(grad, in_axes=(None, 0)))(w, x)
    np.testing.assert_allclose(per_example(sp.conv_general_dilated),
                               per_example(lax.conv_general_dilated), rtol=1e-4, atol=1e-4)


def test_cpp_forward_checks_shapes():
    x, w = jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 5))
    call = functools.partial(_ffi.call, _targets.DENSE_CONV_FORWARD)
    np.testing.assert_allclose(call((2, 4, 4, 5), x, w, stride_h=2, stride_w=2), 27)
    for shape, kernel, strides, match in (
            ((2, 4, 4, 5), (3, 3, 4, 5), (2, 2), "kernel input channels"),
            ((2, 4, 4, 6), (3, 3, 3, 5), (2, 2), "kernel output channels"),
            ((3, 4, 4, 5), (3, 3, 3, 5), (2, 2), "output batch size"),
            ((2, 4, 4, 5), (3, 3, 3, 5), (1, 2), "output height"),
            ((2, 4, 4, 5), (3, 5, 3, 5), (2, 2), "output width"),
            ((2, 4, 4, 5), (11, 3, 3, 5), (2, 2), "larger than the padded input"),
            ((2, 4, 4, 5), (3, 3, 3, 5), (2, 0), "strides")):
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(call(shape, x, jnp.ones(kernel), stride_h=strides[0],
                                       stride_w=strides[1]))


def test_cpp_weight_gradient_checks_shapes():
    x, dy = jnp.ones((2, 10, 10, 3)), jnp.ones((2, 4, 4, 5))
    call = functools.partial(_ffi.call, _targets.DENSE_CONV_WEIGHT_GRAD)
    np.testing.assert_allclose(call((3, 3, 3, 5), x, dy, stride_h=2, stride_w=2), 16 * 2)
    for shape, strides, match in (((3, 3, 4, 5), (2, 2), "kernel input channels"),
                                  ((3, 3, 3, 6), (2, 2), "kernel output channels"),
                                  ((3, 3, 3, 5), (1, 2), "dy height"),
                                  ((3, 5, 3, 5), (2, 2), "dy width"),
                                  ((11, 3, 3, 5), (2, 2), "larger than the padded input"),
                                  ((3, 3, 3, 5), (0, 2), "strides")):
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(call(shape, x, dy, stride_h=strides[0], stride_w=strides[1]))
    with pytest.raises(Exception, match="dy batch size"):
        jax.block_until_ready(call((3, 3, 3, 5), x, jnp.ones((3, 4, 4, 5)), stride_h=2,
                                   stride_w=2))


def test_bad_arguments_get_lax_errors():
    x = jnp.ones((2, 8, 8, 3))
    for w, padding in ((jnp.ones((3, 3, 4, 4)), "SAME"),   # kernel in-features 4, input 3
                       (jnp.ones((3, 3, 3, 4)), "BOGUS")):
        with pytest.raises(Exception) as want:
            lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=LAYOUTS[2])
        with pytest.raises(want.type, match=re.escape(str(want.value).splitlines()[0][:40])):
            sp.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=LAYOUTS[2])


def test_in_flax_conv_layers():
    x = jax.random.normal(jax.random.key(0), (3, 10, 10, 3))
    ref = nnx.Conv(3, 8, (7, 7), strides=2, padding=3, rngs=nnx.Rngs(0))
    fast = nnx.Conv(3, 8, (7, 7), strides=2, padding=3, rngs=nnx.Rngs(0),
                    conv_general_dilated=sp.conv_general_dilated)
    np.testing.assert_allclose(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    module = nn.Conv(8, (3, 3), strides=2)
    params = module.init(jax.random.key(1), x)
    fast = nn.Conv(8, (3, 3), strides=2, conv_general_dilated=sp.conv_general_dilated)
    np.testing.assert_allclose(fast.apply(params, x), module.apply(params, x),
                               rtol=1e-5, atol=1e-5)


def test_vmap():
    x = jax.random.normal(jax.random.key(0), (4, 2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))

    def conv(fn):
        return jax.vmap(lambda x: fn(x, w, (1, 1), "SAME", dimension_numbers=LAYOUTS[2]))(x)
    np.testing.assert_allclose(conv(sp.conv_general_dilated), conv(lax.conv_general_dilated),
                               rtol=1e-5, atol=1e-5)
    # A kernel per example too.
    ws = jax.random.normal(jax.random.key(2), (4, 3, 3, 3, 5))

    def conv_each(fn):
        return jax.vmap(lambda x, w: fn(x, w, (2, 2), "SAME", dimension_numbers=LAYOUTS[2]))(x, ws)
    np.testing.assert_allclose(conv_each(sp.conv_general_dilated),
                               conv_each(lax.conv_general_dilated), rtol=1e-5, atol=1e-5)
