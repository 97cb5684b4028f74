"""bfloat16 through the ops: products summed in float32, results rounded once, on every path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_reference, random_kernel, tasks_per_call

import sparseprop_jax as sp

BF16 = jnp.bfloat16
# A result rounded once to bfloat16 is within half its unit in the last place:
# 2^-8 relative. Products summed in bfloat16 would be off by far more.
ROUNDING = 2.0 ** -8


def as_bf16(a) -> np.ndarray:
    """`a` rounded to bfloat16, as float64 (the reference's inputs)."""
    return np.asarray(jnp.asarray(a, BF16), np.float64)


def assert_rounded_once(actual, expected, scale_terms: int = 1):
    """A bfloat16 result against the float64 reference of its bfloat16 inputs."""
    assert actual.dtype == BF16
    expected = np.asarray(expected, np.float64)
    atol = 1e-5 * np.sqrt(max(scale_terms, 1)) * (1.0 + np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                               rtol=ROUNDING * 1.001, atol=atol)


def _grads(weight, x, dy, wrt, feature_axis=-1):
    def loss(x, values):
        y = sp.sparse_linear(x, weight.with_values(values), feature_axis=feature_axis)
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32)), y
    fn = jax.jit(jax.grad(loss, argnums=wrt, has_aux=True))
    return fn(x, weight.values)


def _bf16_case(rng, n_in, n_out, sparsity, batch):
    kernel = as_bf16(random_kernel(rng, n_in, n_out, sparsity))
    weight = sp.SparseWeight.from_dense(kernel.astype(np.float32))
    weight = weight.with_values(weight.values.astype(BF16))
    x = jnp.asarray(rng.standard_normal((batch, n_in)), BF16)
    dy = jnp.asarray(rng.standard_normal((batch, n_out)), BF16)
    return kernel, weight, x, dy


@pytest.mark.parametrize("n_in,n_out,sparsity,batch", [
    (100, 70, 0.9, 37),     # one narrow tile
    (64, 48, 0.0, 64),      # fully dense, one whole tile
    (200, 300, 0.5, 130),   # long rows over three tiles (per-tile weight gradient)
    (33, 17, 0.95, 1),      # a single row of the batch
    (50, 40, 1.0, 9),       # all zero
])
@pytest.mark.parametrize("wrt", [(0, 1), (0,), (1,)], ids=["both", "dx", "dvalues"])
def test_linear_matches_dense_reference_on_every_path(n_in, n_out, sparsity, batch, wrt, rng):
    kernel, weight, x, dy = _bf16_case(rng, n_in, n_out, sparsity, batch)
    y_ref, dx_ref, dk_ref, _ = dense_reference(as_bf16(x), kernel, None, as_bf16(dy))
    mask = kernel != 0
    for path in sp.runtime.distinct_simd_paths("bfloat16"):
        for tasks in (0, 3):
            with sp.use_simd_path(path), tasks_per_call(tasks):
                grads, y = jax.block_until_ready(_grads(weight, x, dy, wrt))
            assert_rounded_once(y, y_ref, n_in)
            grads = dict(zip(wrt, grads))
            if 0 in grads:
                assert_rounded_once(grads[0], dx_ref, n_out)
            if 1 in grads:
                assert grads[1].dtype == BF16
                dk = np.asarray(weight.with_values(grads[1]).to_dense(), np.float64)
                assert_rounded_once(jnp.asarray(dk, BF16), dk_ref * mask, batch)
                assert np.all(dk[~mask] == 0)


def test_empty_rows_and_columns(rng):
    kernel = as_bf16(random_kernel(rng, 40, 30, 0.7))
    kernel[:, 3:9] = 0
    kernel[5:12, :] = 0
    weight = sp.SparseWeight.from_dense(kernel.astype(np.float32))
    weight = weight.with_values(weight.values.astype(BF16))
    x = jnp.asarray(rng.standard_normal((21, 40)), BF16)
    dy = jnp.asarray(rng.standard_normal((21, 30)), BF16)
    y_ref, dx_ref, dk_ref, _ = dense_reference(as_bf16(x), kernel, None, as_bf16(dy))
    for path in sp.runtime.distinct_simd_paths("bfloat16"):
        with sp.use_simd_path(path):
            (dx, dvalues), y = jax.block_until_ready(_grads(weight, x, dy, (0, 1)))
        assert_rounded_once(y, y_ref, 40)
        assert np.all(np.asarray(y, np.float32)[:, 3:9] == 0)
        assert_rounded_once(dx, dx_ref, 30)
        assert np.all(np.asarray(dx, np.float32)[:, 5:12] == 0)
        dk = weight.with_values(dvalues).to_dense()
        assert_rounded_once(dk, dk_ref * (kernel != 0), 21)


def test_paths_agree_on_the_products_they_share(rng):
    """Every path sums the same products in float32 (in other orders, with or
    without fused multiply-adds, or in pairs on avx512_bf16), so results agree
    within one rounding to bfloat16 either side."""
    kernel, weight, x, dy = _bf16_case(rng, 120, 90, 0.8, 70)
    results = {}
    for path in sp.runtime.distinct_simd_paths("bfloat16"):
        with sp.use_simd_path(path):
            results[path] = jax.block_until_ready(_grads(weight, x, dy, (1,)))
    (scalar_dv,), scalar_y = results["scalar"]
    for (dv,), y in results.values():
        for got, want in ((y, scalar_y), (dv, scalar_dv)):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=2 * ROUNDING, atol=1e-3)


def test_vmap_and_leading_dims(rng):
    kernel, weight, _, _ = _bf16_case(rng, 30, 20, 0.8, 1)
    xs = jnp.asarray(rng.standard_normal((3, 5, 30)), BF16)
    y = jax.vmap(lambda x: sp.sparse_linear(x, weight))(xs)
    y_ref = as_bf16(xs) @ kernel
    assert_rounded_once(y, y_ref, 30)
    assert_rounded_once(sp.sparse_linear(xs, weight), y_ref, 30)


def test_conv_under_vmap(rng):
    """vmap over a stack of images and over a stack of kernels' values."""
    kernel = as_bf16(rng.standard_normal((3, 3, 4, 6)))
    kernel[rng.random(kernel.shape) < 0.6] = 0
    weight = sp.SparseWeight.from_dense(kernel.astype(np.float32))
    weight = weight.with_values(weight.values.astype(BF16))
    xs = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), BF16)
    y = jax.jit(jax.vmap(lambda x: sp.sparse_conv2d(x, weight)))(xs)
    for x, y_i in zip(xs, y):
        assert_rounded_once(y_i, _conv_reference(as_bf16(x), kernel, 1, "SAME",
                                                 np.zeros(y_i.shape))[0], 36)
    scales = jnp.asarray([1.0, -0.5], BF16)
    ys = jax.vmap(lambda c: sp.sparse_conv2d(xs[0], weight.with_values(weight.values * c)))(
        scales)
    assert_rounded_once(ys[1], -0.5 * np.asarray(ys[0], np.float64), 36)


def test_bfloat16_with_float32_computes_in_float32(rng):
    """As jnp.matmul promotes; each gradient comes back in its own input's dtype."""
    kernel = random_kernel(rng, 24, 16, 0.75)
    weight = sp.SparseWeight.from_dense(kernel)
    x = jnp.asarray(rng.standard_normal((6, 24)), BF16)
    y = sp.sparse_linear(x, weight)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), as_bf16(x) @ kernel, rtol=1e-5, atol=1e-5)
    dx, dv = jax.grad(lambda x, v: sp.sparse_linear(x, weight.with_values(v)).sum(),
                      argnums=(0, 1))(x, weight.values)
    assert dx.dtype == BF16 and dv.dtype == jnp.float32


@pytest.mark.parametrize("groups,n_in,n_out,n,sparsity", [
    (4, 12, 10, 7, 0.5),      # narrow runs
    (3, 40, 24, 130, 0.8),    # three tiles a group
    (2, 16, 16, 64, 0.0),     # dense
])
def test_feature_axis_matches_dense_reference_on_every_path(groups, n_in, n_out, n, sparsity,
                                                            rng):
    kernel = as_bf16(random_kernel(rng, n_in, n_out, sparsity))
    weight = sp.SparseWeight.from_dense(kernel.astype(np.float32))
    weight = weight.with_values(weight.values.astype(BF16))
    x = jnp.asarray(rng.standard_normal((groups, n_in, n)), BF16)
    dy = jnp.asarray(rng.standard_normal((groups, n_out, n)), BF16)
    y_ref, dx_ref, dk_ref, _ = dense_reference(np.swapaxes(as_bf16(x), 1, 2), kernel, None,
                                               np.swapaxes(as_bf16(dy), 1, 2))
    mask = kernel != 0
    for path in sp.runtime.distinct_simd_paths("bfloat16"):
        with sp.use_simd_path(path):
            (dx, dvalues), y = jax.block_until_ready(
                _grads(weight, x, dy, (0, 1), feature_axis=-2))
        assert_rounded_once(y, np.swapaxes(y_ref, 1, 2), n_in)
        assert_rounded_once(dx, np.swapaxes(dx_ref, 1, 2), n_out)
        dk = weight.with_values(dvalues).to_dense()
        assert_rounded_once(dk, dk_ref * mask, groups * n)
        assert np.all(np.asarray(dk, np.float32)[~mask] == 0)


def _conv_reference(x, kernel, stride, padding, dy):
    """Output and (dx, dkernel) of the convolution in float64, for cotangent dy."""
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)
    with jax.enable_x64(True):
        y, vjp = jax.vjp(conv, jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64))
        dx, dk = vjp(jnp.asarray(dy, jnp.float64))
        return np.asarray(y), np.asarray(dx), np.asarray(dk)


@pytest.mark.parametrize("variant", ["batch", "width"])
@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,padding,sparsity", [
    (3, 9, 7, 8, 12, 3, 1, "SAME", 0.8),
    (2, 10, 11, 5, 16, 3, 2, "SAME", 0.5),
    (1, 6, 6, 16, 8, 1, 1, "VALID", 0.0),
    (5, 8, 8, 3, 8, 7, 2, ((3, 3), (3, 3)), 0.6),
    (2, 5, 5, 4, 4, 3, 1, "SAME", 1.0),
])
def test_conv_matches_dense_reference_on_every_path(variant, n, h, w, cin, cout, k, stride,
                                                    padding, sparsity, rng):
    """Both variants' bfloat16 kernels, within one rounding of the float64 reference."""
    kernel = as_bf16(rng.standard_normal((k, k, cin, cout)))
    kernel[rng.random(kernel.shape) < sparsity] = 0
    weight = sp.SparseWeight.from_dense(kernel.astype(np.float32))
    weight = weight.with_values(weight.values.astype(BF16))
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), BF16)
    y_shape = jax.eval_shape(lambda x: sp.sparse_conv2d(x, weight, None, stride, padding),
                             x).shape
    dy = jnp.asarray(rng.standard_normal(y_shape), BF16)
    y_ref, dx_ref, dk_ref = _conv_reference(as_bf16(x), kernel, stride, padding, as_bf16(dy))

    def loss(x, values):
        y = sp.sparse_conv2d(x, weight.with_values(values), None, stride, padding,
                             variant=variant)
        return jnp.vdot(y.astype(jnp.float32), dy.astype(jnp.float32)), y

    step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    mask = kernel != 0
    for path in sp.runtime.distinct_simd_paths("bfloat16"):
        with sp.use_simd_path(path):
            (dx, dvalues), y = jax.block_until_ready(step(x, weight.values))
        assert_rounded_once(y, y_ref, k * k * cin)
        assert_rounded_once(dx, dx_ref, k * k * cout)
        dk = weight.with_values(dvalues).to_dense()
        assert_rounded_once(dk, dk_ref * mask, int(np.prod(y_shape[:3])))
        assert np.all(np.asarray(dk, np.float32)[~mask] == 0)


@pytest.mark.parametrize("k,cin,stride", [(7, 3, 2), (3, 16, 1)])
def test_dense_conv_computes_bfloat16_in_float32(k, cin, stride, rng):
    """sparseprop_jax.conv_general_dilated on bfloat16: float32 products (the C++
    ones for the 7x7 stem on 3 channels), rounded once; gradients in bfloat16."""
    x = jnp.asarray(rng.standard_normal((2, 12, 12, cin)), BF16)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, 8)), BF16)
    pads = ((k // 2, k // 2),) * 2
    y = sp.conv_general_dilated(x, kernel, (stride, stride), pads,
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dy = np.asarray(rng.standard_normal(y.shape), np.float32)
    y_ref, dx_ref, dk_ref = _conv_reference(as_bf16(x), as_bf16(kernel), stride, pads,
                                            as_bf16(dy))
    assert_rounded_once(y, y_ref, k * k * cin)
    dx, dk = jax.grad(lambda x, w: jnp.vdot(sp.conv_general_dilated(
        x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        .astype(jnp.float32), dy), argnums=(0, 1))(x, kernel)
    assert_rounded_once(dx, dx_ref, k * k * 8)
    assert_rounded_once(dk, dk_ref, int(np.prod(y.shape[:3])))


def test_distinct_paths_per_dtype():
    """avx512_bf16 differs from avx512 in its bfloat16 routines alone."""
    supported = sp.supported_simd_paths()
    float32, bfloat16 = (sp.runtime.distinct_simd_paths(d) for d in ("float32", "bfloat16"))
    assert bfloat16 == supported
    assert float32 == [p for p in supported if not (p == "avx512_bf16" and "avx512" in supported)]
    assert float32[-1] == "scalar"
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16'"):
        sp.runtime.distinct_simd_paths("float16")


def test_float16_is_refused_naming_the_supported_dtypes(rng):
    weight = sp.SparseWeight.from_dense(random_kernel(rng, 8, 4, 0.5))
    with pytest.raises(TypeError, match="float32 or bfloat16.*got float16"):
        sp.sparse_linear(jnp.ones((2, 8), jnp.float16), weight)
    with pytest.raises(TypeError, match="float32 or bfloat16.*got float16"):
        sp.sparse_linear(jnp.ones((2, 8)), weight.with_values(weight.values.astype(jnp.float16)))
