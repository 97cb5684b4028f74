"""sparse_conv2d against lax.conv_general_dilated: values and all three gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import sparseprop_jax as sp
from conftest import assert_close, random_kernel, tasks_per_call

VARIANTS = ["batch", "width", "auto"]


def _dense_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, (strides, strides), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _random_conv_kernel(rng, kh, kw, cin, cout, sparsity):
    return random_kernel(rng, kh * kw * cin, cout, sparsity).reshape(kh, kw, cin, cout)


def _check(rng, n, h, w, kernel_shape, strides, padding, sparsity, variants=VARIANTS,
           paths=None):
    kh, kw, cin, cout = kernel_shape
    kernel = _random_conv_kernel(rng, kh, kw, cin, cout, sparsity)
    weight = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    y_ref = _dense_conv(x, kernel, strides, padding) + bias
    dy = rng.standard_normal(y_ref.shape).astype(np.float32)
    dx_ref, dk_ref = jax.grad(lambda x, k: jnp.vdot(_dense_conv(x, k, strides, padding), dy),
                              argnums=(0, 1))(x, jnp.asarray(kernel))
    db_ref = dy.sum((0, 1, 2))
    mask = kernel != 0
    fan_in, pixels = kh * kw * cin, int(np.prod(y_ref.shape[:3]))
    for variant in variants:
        def loss(x, values, bias, variant=variant):
            y = sp.sparse_conv2d(x, weight.with_values(values), bias, strides, padding,
                                 variant=variant)
            return jnp.vdot(y, dy), y

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
        for path in paths or sp.runtime.distinct_simd_paths():
            with sp.use_simd_path(path):  # results ready before the path is restored
                (dx, dvalues, db), y = jax.block_until_ready(step(x, weight.values, bias))
            dk = np.asarray(weight.with_values(dvalues).to_dense())
            assert_close(y, y_ref, fan_in)
            assert_close(dx, dx_ref, kh * kw * cout)
            assert_close(dk, np.asarray(dk_ref) * mask, pixels)
            assert np.all(dk[~mask] == 0)
            assert_close(db, db_ref, pixels)


@pytest.mark.parametrize("ksize", [(1, 1), (3, 3), (5, 5), (7, 7), (1, 3)],
                         ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 1), (0, 3))],
                         ids=["SAME", "VALID", "explicit"])
def test_matches_lax_over_kernels_strides_paddings(ksize, strides, padding, rng):
    _check(rng, 3, 11, 9, (*ksize, 5, 6), strides, padding, 0.5)


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_lax_over_sparsities_and_batches(sparsity, batch, rng):
    _check(rng, batch, 8, 8, (3, 3, 8, 16), 1, "SAME", sparsity)


@pytest.mark.parametrize("spatial, strides", [(1, 1), (2, 2), (5, 1), (13, 2), (28, 2), (56, 1)])
def test_matches_lax_over_spatial_sizes(spatial, strides, rng):
    _check(rng, 3, spatial, spatial, (3, 3, 4, 8), strides, "SAME", 0.9)


@pytest.mark.parametrize("batch, cout, strides", [(16, 32, 1), (24, 128, 2)])
def test_large_activations(batch, cout, strides, rng):
    # x, y and dx of at least 4 MiB (kStreamMinBytes in ffi_common.h): the
    # handlers then write the layouts and results with streaming stores on
    # the SIMD paths; a batch of 24 leaves half of the pixel runs unaligned,
    # so those mix with plain stores.
    _check(rng, batch, 48, 48, (3, 3, 32, cout), strides, "SAME", 0.9, variants=["batch"])


def test_stride_three_and_wide_kernel(rng):
    _check(rng, 2, 17, 23, (7, 5, 3, 4), 3, "SAME", 0.3)


def test_empty_input_channels_and_output_channels(rng):
    kernel = _random_conv_kernel(rng, 3, 3, 6, 5, 0.3)
    kernel[:, :, [0, 4], :] = 0  # input channels nothing reads
    kernel[..., [1, 3]] = 0  # output channels that stay at the bias
    weight = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((4, 7, 7, 6)).astype(np.float32)
    for variant in ("batch", "width"):
        y = sp.sparse_conv2d(x, weight, variant=variant)
        assert_close(y, _dense_conv(x, kernel, 1, "SAME"), 54)
        dx = jax.grad(lambda x: jnp.sum(sp.sparse_conv2d(x, weight, variant=variant) ** 2))(x)
        dx_ref = jax.grad(lambda x: jnp.sum(_dense_conv(x, kernel, 1, "SAME") ** 2))(x)
        assert_close(dx, dx_ref, 45 * 50)
        np.testing.assert_array_equal(np.asarray(y)[..., [1, 3]], 0)


def test_weight_gradient_is_deterministic(rng):
    kernel = _random_conv_kernel(rng, 3, 3, 32, 32, 0.9)
    weight = sp.SparseWeight.from_dense(kernel)
    x = rng.standard_normal((16, 14, 14, 32)).astype(np.float32)
    for variant in ("batch", "width"):
        step = jax.jit(jax.grad(lambda x, v, variant=variant: jnp.sum(jnp.sin(sp.sparse_conv2d(
            x, weight.with_values(v), strides=2, variant=variant))), argnums=(0, 1)))
        first = step(x, weight.values)
        for tasks in (0, 0, 3):
            with tasks_per_call(tasks):
                again = jax.block_until_ready(step(x, weight.values))  # before the reset
            for a, b in zip(first, again):
                np.testing.assert_array_equal(a, b)


def test_variants_agree_and_measure_caches(rng):
    weight = sp.SparseWeight.from_dense(_random_conv_kernel(rng, 3, 3, 4, 8, 0.8))
    x = rng.standard_normal((5, 12, 12, 4)).astype(np.float32)
    expected = sp.sparse_conv2d(x, weight, variant="batch")
    for variant in ("width", "auto", "measure"):
        assert_close(sp.sparse_conv2d(x, weight, variant=variant), expected, 36)
    from sparseprop_jax import conv_variants
    assert any(key[:3] == (5, 12, 12) for key in conv_variants._MEASURED)
    # Under jit "measure" times too (it needs only shapes): a new shape is measured.
    conv_variants._MEASURED.clear()
    assert_close(jax.jit(lambda x: sp.sparse_conv2d(x, weight, variant="measure"))(x), expected, 36)
    assert list(conv_variants._MEASURED.values())[0] in ("batch", "width")


def test_vmap_jit_and_remat(rng):
    weight = sp.SparseWeight.from_dense(_random_conv_kernel(rng, 3, 3, 3, 4, 0.5))
    xs = rng.standard_normal((3, 2, 6, 6, 3)).astype(np.float32)
    f = lambda x: sp.sparse_conv2d(x, weight, strides=2)  # noqa: E731
    expected = np.stack([np.asarray(f(x)) for x in xs])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(xs), expected, rtol=1e-6, atol=1e-6)

    def loss(values, x):
        return jnp.sum(jnp.sin(sp.sparse_conv2d(x, weight.with_values(values), variant="width")))

    direct = jax.grad(loss)(weight.values, xs[0])
    remat = jax.grad(jax.checkpoint(loss))(weight.values, xs[0])
    np.testing.assert_allclose(remat, direct, rtol=1e-6, atol=1e-6)
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(weight.values, xs)
    np.testing.assert_allclose(per_example[1], jax.grad(loss)(weight.values, xs[1]),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture
def conv_weight(rng):
    return sp.SparseWeight.from_dense(_random_conv_kernel(rng, 3, 3, 4, 5, 0.5))


def test_bad_inputs(conv_weight):
    x = jnp.ones((2, 8, 8, 4))
    cases = [
        (ValueError, r"x must be 4-D NHWC", dict(x=jnp.ones((8, 8, 4)))),
        (ValueError, r"x must have 4 channels", dict(x=jnp.ones((2, 8, 8, 3)))),
        (TypeError, r"x must be float32 or bfloat16", dict(x=jnp.ones((2, 8, 8, 4), jnp.float16))),
        (ValueError, r"kernel is larger than the padded input",
         dict(x=jnp.ones((2, 2, 2, 4)), padding="VALID")),
        (ValueError, r"padding='CIRCULAR' is not supported", dict(padding="CIRCULAR")),
        (ValueError, r"padding must be 'SAME', 'VALID', an int or \(\(top",
         dict(padding=((1, 1),))),
        (ValueError, r"padding must be non-negative", dict(padding=-1)),
        (ValueError, r"strides must be positive ints", dict(strides=0)),
        (ValueError, r"strides along height and width must be equal", dict(strides=(1, 2))),
        (ValueError, r"strides must be an int or a pair of ints", dict(strides=True)),
        (ValueError, r"strides must be an int or a pair of ints", dict(strides=(1, 1, 1))),
        (ValueError, r"padding must be 'SAME', 'VALID', an int or \(\(top", dict(padding=True)),
        (ValueError, r"variant must be one of", dict(variant="fast")),
        (ValueError, r"bias must have shape \(5,\)", dict(bias=jnp.ones(4))),
    ]
    for error, message, kwargs in cases:
        kwargs = dict(dict(x=x), **kwargs)
        with pytest.raises(error, match=message):
            sp.sparse_conv2d(kwargs.pop("x"), conv_weight, **kwargs)
    with pytest.raises(ValueError, match="weight must be a 4-D HWIO kernel"):
        sp.sparse_conv2d(x, sp.SparseWeight.from_dense(np.eye(4, dtype=np.float32)))


def test_cpp_handler_rejects_corrupt_pattern(conv_weight):
    p = conv_weight.pattern
    indices = np.asarray(p.indices).copy()
    indices[0] = 36  # kh * kw * cin = 36 rows
    bad = sp.SparseWeight(conv_weight.values, sp.SparsityPattern(
        p.indptr, jnp.asarray(indices), p.t_indptr, p.t_indices, p.t_perm, shape=p.shape))
    with pytest.raises(Exception, match="index 36 at entry 0 is outside"):
        jax.block_until_ready(sp.sparse_conv2d(jnp.ones((2, 8, 8, 4)), bad))
    assert sp.sparse_conv2d(jnp.ones((2, 8, 8, 4)), conv_weight).shape == (2, 8, 8, 5)


def test_cpp_backward_rejects_corrupt_transposed_pattern(conv_weight):
    p = conv_weight.pattern
    perm = np.asarray(p.t_perm).copy()
    perm[-1] = conv_weight.nnz  # one past the last value
    bad = sp.SparseWeight(conv_weight.values, sp.SparsityPattern(
        p.indptr, p.indices, p.t_indptr, p.t_indices, jnp.asarray(perm), shape=p.shape))
    x = jnp.ones((2, 8, 8, 4))
    for variant in ("batch", "width"):
        grad = jax.grad(lambda x: jnp.sum(sp.sparse_conv2d(x, bad, variant=variant)))
        with pytest.raises(Exception, match="transposed permutation"):
            jax.block_until_ready(grad(x))


@pytest.mark.parametrize("variant", ["batch", "width"])
def test_cpp_handlers_check_shapes_and_attributes(variant, conv_weight):
    from sparseprop_jax import _ffi, _targets
    p, x = conv_weight.pattern, jnp.ones((2, 8, 8, 4))
    attrs = dict(stride=np.int64(1), kh=np.int64(3), kw=np.int64(3), pad_top=np.int64(1),
                 pad_bottom=np.int64(1), pad_left=np.int64(1), pad_right=np.int64(1))
    forward = functools.partial(_ffi.call, _targets.CONV_FORWARD[variant])
    ok = forward((2, 8, 8, 5), x, conv_weight.values, p.indptr, p.indices, **attrs)
    np.testing.assert_allclose(ok, sp.sparse_conv2d(x, conv_weight, variant=variant), rtol=1e-6)
    with pytest.raises(Exception, match="output height is 7, expected 8"):
        jax.block_until_ready(forward((2, 7, 8, 5), x, conv_weight.values, p.indptr, p.indices,
                                      **attrs))
    with pytest.raises(Exception, match="bad attributes"):
        jax.block_until_ready(forward((2, 8, 8, 5), x, conv_weight.values, p.indptr, p.indices,
                                      **{**attrs, "pad_left": np.int64(-1)}))
    with pytest.raises(Exception, match="kernel is larger than the padded input"):
        jax.block_until_ready(forward((2, 1, 1, 5), jnp.ones((2, 1, 1, 4)), conv_weight.values,
                                      p.indptr, p.indices, **{**attrs, "pad_top": np.int64(0)}))
    backward = functools.partial(_ffi.call, _targets.CONV_BACKWARD[variant])
    dy = jnp.ones((2, 8, 8, 5))
    with pytest.raises(Exception, match="dy width is 7, expected 8"):
        jax.block_until_ready(backward((x.shape, conv_weight.values.shape), x, dy[:, :, :7],
                                       conv_weight.values, *(getattr(p, f) for f in p.FIELDS),
                                       **attrs))


@pytest.mark.parametrize("variant", ["batch", "width"])
def test_nested_vmap_with_operands_batched_at_different_levels(variant, rng):
    kernel = _random_conv_kernel(rng, 3, 2, 3, 4, 0.5)
    weight = sp.SparseWeight.from_dense(kernel)
    xs = rng.standard_normal((2, 3, 6, 5, 3)).astype(np.float32)
    stacked = np.stack([np.asarray(weight.values) * s for s in (1.0, -2.0, 0.5)])

    def value_and_grads(x, values, op):
        def loss(x, values):
            w = weight.with_values(values)
            y = (sp.sparse_conv2d(x, w, strides=2, variant=variant) if op == "sparse"
                 else _dense_conv(x, w.to_dense(), 2, "SAME"))
            return jnp.sum(jnp.sin(y))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, values)

    def nested(op):
        return jax.jit(jax.vmap(jax.vmap(functools.partial(value_and_grads, op=op),
                                         in_axes=(None, 0)), in_axes=(0, None)))

    got = jax.block_until_ready(nested("sparse")(xs, stacked))
    want = nested("dense")(xs, stacked)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        assert_close(g, w, 3 * 2 * 4 * 30)


@pytest.mark.parametrize("variant", ["batch", "width"])
def test_empty_batch(variant, conv_weight):
    x = np.zeros((0, 5, 5, 4), np.float32)
    assert sp.sparse_conv2d(x, conv_weight, variant=variant).shape == (0, 5, 5, 5)

    def loss(x, values):
        return jnp.sum(sp.sparse_conv2d(x, conv_weight.with_values(values), variant=variant))

    dx, dvalues = jax.grad(loss, argnums=(0, 1))(x, conv_weight.values)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dvalues, np.zeros(conv_weight.nnz))
