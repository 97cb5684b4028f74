"""`batch_norm_relu_max_pool` against Flax's BatchNorm, ReLU and max pool applied one by one."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparseprop_jax as sp
import sparseprop_jax.nnx as spnnx
from conftest import tasks_per_call
from sparseprop_jax import _ffi, _targets

CASES = [
    # shape, window, strides, padding
    ((4, 12, 13, 10), (3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNet stem's pool, odd sizes
    ((2, 9, 9, 70), (2, 2), (2, 2), "VALID"),              # channels past one block of 64
    ((3, 7, 8, 5), (3, 2), (1, 3), "SAME"),                # stride longer than the window
    ((2, 6, 5, 130), (3, 3), (1, 1), ((0, 2), (1, 0))),    # asymmetric pads, 3 channel blocks
    ((1, 5, 5, 3), (2, 2), (1, 1), ((3, 3), (3, 3))),      # windows wholly in the padding
    ((5, 1, 1, 8), (1, 1), (1, 1), "VALID"),               # one pixel per image
]


def _flax(x, scale, bias, window, strides, padding):
    """Flax's BatchNorm (training mode), relu and max_pool, each as it is."""
    bn = nnx.BatchNorm(x.shape[-1], momentum=0.0, rngs=nnx.Rngs(0))  # averages = the batch's
    bn.scale[...] = scale
    bn.bias[...] = bias
    y = nnx.max_pool(nnx.relu(bn(x)), window, strides, padding)
    return y, bn.mean[...], bn.var[...]


def _inputs(shape, seed, *, integers=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2 + 0.5
    if integers:  # ties inside windows
        x = np.round(x)
    scale = rng.standard_normal(shape[-1])
    scale[0] = -abs(scale[0])  # a negative scale turns the maximum around
    bias = rng.standard_normal(shape[-1])
    ct = rng.standard_normal(shape[-1])
    return [jnp.asarray(a, jnp.float32) for a in (x, scale, bias, ct)]


def _value_and_grads(fn, x, scale, bias, ct, *args):
    def loss(x, scale, bias):
        y = fn(x, scale, bias, *args)[0]
        # Weights that differ per position, so that every gradient entry is tested.
        return jnp.sum(jnp.sin(y) * ct) + jnp.sum(y * jnp.linspace(0, 1, y.size).reshape(y.shape))
    y, mean, var = jax.jit(fn, static_argnums=(3, 4, 5))(x, scale, bias, *args)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    return y, mean, var, *grads


def _assert_close(got, want):
    for name, g, w in zip(("y", "mean", "var", "dx", "dscale", "dbias"), got, want):
        assert g.shape == w.shape, name
        scale = float(np.max(np.abs(np.where(np.isfinite(w), w, 0)), initial=0.0)) + 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)


def _ours(x, scale, bias, window, strides, padding):
    return sp.batch_norm_relu_max_pool(x, scale, bias, window, strides, padding)


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_matches_flax(shape, window, strides, padding, simd_path):
    x, scale, bias, ct = _inputs(shape, sum(shape))
    args = (window, strides, padding)
    _assert_close(_value_and_grads(_ours, x, scale, bias, ct, *args),
                  _value_and_grads(_flax, x, scale, bias, ct, *args))


def test_ties_go_to_the_first_maximum(simd_path):
    x, scale, bias, ct = _inputs((3, 10, 9, 12), 1, integers=True)
    args = ((3, 3), (2, 2), ((1, 1), (1, 1)))
    _assert_close(_value_and_grads(_ours, x, scale, bias, ct, *args),
                  _value_and_grads(_flax, x, scale, bias, ct, *args))


def test_a_nan_makes_its_channel_nan(simd_path):
    x, scale, bias, _ = _inputs((2, 6, 6, 3), 8)
    x = x.at[1, 2, 3, 0].set(jnp.nan)
    args = ((3, 3), (2, 2), "SAME")
    got, want = _ours(x, scale, bias, *args), _flax(x, scale, bias, *args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert np.all(np.isnan(got[0][..., 0])) and not np.any(np.isnan(got[0][..., 1:]))


def test_backward_is_the_cpp_passes():
    x, scale, bias, _ = _inputs((2, 8, 8, 4), 2)
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(_ours(x, scale, bias, (3, 3), (2, 2), "SAME")[0]))
                  ).lower(x).as_text()
    assert _targets.NORM_POOL_GRAD_SUMS.name in hlo
    assert _targets.NORM_POOL_INPUT_GRAD.name in hlo


def test_other_inputs_run_the_ops_one_by_one():
    # Not NHWC float32: the three ops as they are (values and gradients still Flax's).
    rng = np.random.default_rng(3)
    for shape, window in (((2, 9, 4), (3,)), ((2, 3, 6, 6, 2), (2, 2))):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
        ct = jnp.ones(shape[-1])
        args = (window, None, "SAME")
        hlo = jax.jit(jax.grad(lambda x: jnp.sum(_ours(x, scale, bias, *args)[0]))).lower(
            x).as_text()
        assert _targets.NORM_POOL_GRAD_SUMS.name not in hlo
        _assert_close(_value_and_grads(_ours, x, scale, bias, ct, *args),
                      _value_and_grads(_flax, x, scale, bias, ct, *args))


def test_same_bits_for_any_number_of_tasks():
    x, scale, bias, _ = _inputs((6, 16, 16, 24), 4)
    grad = jax.jit(jax.grad(lambda x, s, b: jnp.sum(jnp.sin(_ours(x, s, b, (3, 3), (2, 2),
                                                                  "SAME")[0])), argnums=(0, 1, 2)))
    results = []
    for n in (1, 2, 5):
        with tasks_per_call(n):
            results.append([np.asarray(g) for g in jax.block_until_ready(grad(x, scale, bias))])
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            np.testing.assert_array_equal(a, b)


def test_vmap_of_grad():
    # Per-group statistics and gradients: the handlers get leading (vmap) dims.
    x, scale, bias, ct = _inputs((3, 4, 7, 7, 6), 5)

    def grads(fn):
        def loss(x, scale, bias):
            return jnp.sum(jnp.sin(fn(x, scale, bias, (3, 3), (2, 2), "SAME")[0]) * ct)
        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, 0)))(
            x, scale, jnp.stack([bias] * 3))
    for g, w in zip(grads(_ours), grads(_flax)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, False)])
def test_nnx_layer_state_and_gradients(use_scale, use_bias):
    x, _, _, ct = _inputs((4, 9, 10, 6), 6)

    def model(bn):
        return nnx.max_pool(nnx.relu(bn(x)), (3, 3), (2, 2), ((1, 1), (1, 1)))

    def ours(bn):
        return spnnx.batch_norm_relu_max_pool(bn, x, (3, 3), (2, 2), ((1, 1), (1, 1)))

    results = []
    for fn in (model, ours):
        bn = nnx.BatchNorm(6, momentum=0.9, use_scale=use_scale, use_bias=use_bias,
                           rngs=nnx.Rngs(0))
        if use_scale:
            bn.scale[...] = jnp.linspace(-1.0, 2.0, 6)
        grads = nnx.grad(lambda bn: jnp.sum(jnp.sin(fn(bn)) * ct))(bn)  # updates the stats
        y = fn(bn)  # a second step from the updated averages
        bn.eval()
        results.append((y, fn(bn), bn.mean[...], bn.var[...],
                        jax.tree.leaves(nnx.state(grads, nnx.Param))))
    (y0, e0, m0, v0, g0), (y1, e1, m1, v1, g1) = results
    for got, want in ((y1, y0), (e1, e0), (m1, m0), (v1, v0), *zip(g1, g0)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(g1) == 2 * use_scale


def test_nnx_layer_falls_back_where_not_fused():
    # Eval mode, or a BatchNorm over another axis: exactly the three ops.
    x, _, _, _ = _inputs((2, 6, 6, 6), 7)
    for kwargs, call in (({"use_running_average": True}, {}), ({"axis": 1}, {}),
                         ({}, {"use_running_average": True})):
        bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0), **kwargs)
        want = nnx.max_pool(nnx.relu(bn(x, **call)), (2, 2), (2, 2))
        bn = nnx.BatchNorm(6, rngs=nnx.Rngs(0), **kwargs)
        got = spnnx.batch_norm_relu_max_pool(bn, x, (2, 2), (2, 2), **call)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="bn must be an nnx.BatchNorm"):
        spnnx.batch_norm_relu_max_pool(nnx.LayerNorm(6, rngs=nnx.Rngs(0)), x, (2, 2))


def test_bad_arguments():
    x = jnp.ones((2, 6, 6, 4))
    ones = jnp.ones(4)
    with pytest.raises(ValueError, match=r"scale must have shape \(4,\)"):
        sp.batch_norm_relu_max_pool(x, jnp.ones(3), ones, (2, 2))
    with pytest.raises(ValueError, match="bias must have shape"):
        sp.batch_norm_relu_max_pool(x, ones, jnp.ones((1, 4)), (2, 2))
    with pytest.raises(ValueError, match="epsilon must be a non-negative number"):
        sp.batch_norm_relu_max_pool(x, ones, ones, (2, 2), epsilon=-1.0)
    with pytest.raises(ValueError, match="window_shape"):
        sp.batch_norm_relu_max_pool(x, ones, ones, (0, 2))
    with pytest.raises(ValueError, match="padding"):
        sp.batch_norm_relu_max_pool(x, ones, ones, (2, 2), padding="BOGUS")


def test_cpp_handlers_check_shapes():
    x, pooled, g = jnp.ones((2, 6, 6, 4)), jnp.ones((2, 3, 3, 4)), jnp.ones((2, 3, 3, 4))
    taps = jnp.zeros((2, 3, 3, 4), jnp.int8)
    c = jnp.ones(4)
    attrs = dict(window_h=2, window_w=2, stride_h=2, stride_w=2, pad_top=0, pad_left=0)
    sums = functools.partial(_ffi.call, _targets.NORM_POOL_GRAD_SUMS)
    grad = functools.partial(_ffi.call, _targets.NORM_POOL_INPUT_GRAD)
    for operands, match in (((g, pooled, taps, jnp.ones((2, 6, 6, 5)), c), "pooled channels"),
                            ((g, pooled, taps, jnp.ones((3, 6, 6, 4)), c), "pooled batch size"),
                            ((g, jnp.ones((2, 3, 2, 4)), taps, x, c), "pooled shape"),
                            ((g, pooled, taps[:, :2], x, c), "taps shape"),
                            ((g, pooled, taps, x, jnp.ones(5)), "shift length")):
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(sums((g.shape, (4,), (4,)), *operands, **attrs))
    with pytest.raises(Exception, match="more than 127 taps"):
        jax.block_until_ready(sums((g.shape, (4,), (4,)), g, pooled, taps, x, c,
                                   **{**attrs, "window_h": 12, "window_w": 11}))
    with pytest.raises(Exception, match="bad attributes"):
        jax.block_until_ready(sums((g.shape, (4,), (4,)), g, pooled, taps, x, c,
                                   **{**attrs, "stride_w": 0}))
    with pytest.raises(Exception, match="dx shape"):
        jax.block_until_ready(grad((2, 6, 5, 4), g, taps, x, c, c, c, c, **attrs))
    with pytest.raises(Exception, match="coefficient length"):
        jax.block_until_ready(grad(x.shape, g, taps, x, c, c, jnp.ones(3), c, **attrs))
    # Taps that name no pixel of the window (corrupt) pass no gradient and read nothing.
    for bad in (-1, 4, 127):
        dx = grad(x.shape, g, jnp.full(taps.shape, bad, jnp.int8), x, c, c, c * 0, c * 0,
                  **attrs)
        np.testing.assert_array_equal(dx, 0)


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True)])
def test_linen_module_matches_batch_norm_relu_max_pool(use_scale, use_bias):
    from flax import linen as nn

    from sparseprop_jax.linen import BatchNormReLUMaxPool

    pool = dict(window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, use_scale=use_scale,
                             use_bias=use_bias, name="bn")(x)
            return nn.max_pool(nn.relu(x), **pool)

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return BatchNormReLUMaxPool(use_running_average=not train, momentum=0.9,
                                        use_scale=use_scale, use_bias=use_bias, name="bn",
                                        **pool)(x)

    x, scale, bias, ct = _inputs((4, 9, 10, 6), 9)
    variables = Reference().init(jax.random.key(0), x, True)
    params = jax.tree.map(lambda p: p + 0.3 * jnp.arange(p.size).reshape(p.shape) / p.size,
                          variables["params"])
    assert jax.tree.structure(Ours().init(jax.random.key(0), x, True)) == jax.tree.structure(
        variables)
    results = []
    for module in (Reference(), Ours()):
        def loss(params, module=module):
            y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                      x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * ct), updates
        (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        evaluated = module.apply({"params": params, **updates}, x, False)
        results.append(jax.tree.leaves((value, updates, grads, evaluated)))
    for got, want in zip(*reversed(results)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
