"""Randomized differential tests: sparse_linear and sparse_conv2d against float64 NumPy.

Hypothesis draws the cases (shapes, sparsity, value magnitudes, padding,
strides, batch sizes including 0 and 1, jit on or off, tasks per call, the
SIMD path, which arguments are differentiated, vmap nesting); each case runs
the op and its VJP (dx, dvalues, dbias) in float32 and compares every output
element with a float64 NumPy reference. The tolerance is not fixed: each
element gets an error bound proportional to eps32 times the sum of the
absolute values of the terms that make it up (see `_bound`), so magnitudes
from 1e-15 to 1e12 and heavy cancellation are judged fairly, and a dropped,
duplicated or misplaced term still shows.

Examples are derandomized (the same cases every run, so CI is reproducible)
and no example database is written.

Environment:
  SPARSEPROP_FUZZ_EXAMPLES: an int; when set, every randomized test here runs
    that many examples per parametrization instead of its default (2 to 15;
    about 80 cases, some 35 seconds for the file on two cores). There are 18
    parametrizations at about half a second per case:
    `SPARSEPROP_FUZZ_EXAMPLES=75 pytest tests/test_differential.py
    --hypothesis-show-statistics` tries 1350 cases in about 12 minutes (the
    statistics count the cases tried).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import lax

import sparseprop_jax as sp
from conftest import tasks_per_call

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, twice the unit roundoff u
TINY32 = float(np.finfo(np.float32).tiny)  # smallest normal float32
PATHS = tuple(sp.runtime.distinct_simd_paths())
TASKS = (0, 1, 2, 3, 7)  # 0: the library's automatic split


def _examples(default: int) -> int:
    value = os.environ.get("SPARSEPROP_FUZZ_EXAMPLES")
    return int(value) if value else default


def _settings(default: int):
    return settings(max_examples=_examples(default), deadline=None, derandomize=True,
                    database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the error bound -----------------------------------------------------------
def _bound(abs_sum: np.ndarray, n_terms: int) -> np.ndarray:
    """Largest accepted |float32 result - float64 reference| per element.

    Every output element (forward, dx, dvalues, dbias) is a sum of at most
    `n_terms` products of float32 numbers, plus for y one bias; the float64
    reference of products of float32 inputs is exact to ~n * 2**-53.
    `abs_sum` is the same sum taken over the terms' absolute values (the
    "absolute-value" op, in float64). Summed in float32 in any order, blocked
    or split across tasks, with or without FMA, the rounding error is at most
    ~n * u * abs_sum (u = eps32 / 2, Higham's gamma_n) and in practice, with
    errors of random sign, about sqrt(n) * u * abs_sum. The bound
    (4 sqrt(n) + 8) * eps32 * abs_sum = (8 sqrt(n) + 16) u * abs_sum is at
    least the worst case for n <= 90, and many standard deviations of the
    random-sign error beyond; the + 8 covers the last rounding of the output,
    the bias add and the extra float32 sums vmap's transpose adds. The floor of
    2 (n + 1) smallest normals allows for products flushed to zero (FTZ) and
    nothing else: an output whose terms are all zero must come out (almost)
    exactly zero. A wrong term (dropped, doubled, misplaced, stale) moves an
    element by about that term's size, which is far beyond the bound unless
    the term is itself below ~c eps32 of the element's absolute sum.
    """
    n = max(int(n_terms), 1)
    return (4.0 * math.sqrt(n) + 8.0) * EPS32 * abs_sum + 2.0 * (n + 1) * TINY32


def _check(what: str, got, ref: np.ndarray, abs_sum: np.ndarray, n_terms: int,
           case: str) -> None:
    """Asserts float32 `got` lies within `_bound` of the float64 reference, elementwise."""
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32\n{case}"
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}\n{case}"
    err = np.abs(got.astype(np.float64) - ref)
    bound = _bound(abs_sum, n_terms)
    bad = ~(err <= bound)  # NaN and inf fail too
    if np.any(bad):
        idx = np.argwhere(bad)
        ratio = np.where(bad, err / np.maximum(bound, TINY32), 0.0)
        worst = np.unravel_index(np.nanargmax(np.where(np.isnan(ratio), np.inf, ratio)),
                                 ratio.shape)
        raise AssertionError(
            f"{what}: {len(idx)} of {got.size} elements beyond the bound (n_terms={n_terms}); "
            f"worst at {tuple(int(i) for i in worst)}: got {got[worst]!r}, "
            f"reference {ref[worst]!r}, |error| {err[worst]:.3e} > bound {bound[worst]:.3e} "
            f"(abs sum {abs_sum[worst]:.3e}); first bad {[tuple(map(int, i)) for i in idx[:5]]}"
            f"\n{case}")


# -- float64 references ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LinearOp:
    """y = x @ K on x [..., in]; its transposes for the gradients."""

    def forward(self, x, k):
        return x @ k

    def input_grad(self, dy, k, x_shape):
        return dy @ k.T

    def kernel_grad(self, x, dy, k_shape):
        return x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])

    def terms(self, x_shape, k_shape, y_shape):
        """Terms per element of y, dx and dK (upper bounds: the dense counts)."""
        return k_shape[0], k_shape[1], int(np.prod(x_shape[:-1]))

    def call(self, x, weight, bias):
        return sp.sparse_linear(x, weight, bias)


def conv_pads(h: int, w: int, kh: int, kw: int, stride: int, padding):
    """((top, bottom), (left, right)) as lax computes them ("SAME": TF's convention)."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        def same(size, k):
            total = max((-(-size // stride) - 1) * stride + k - size, 0)
            return (total // 2, total - total // 2)
        return (same(h, kh), same(w, kw))
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(tuple(p) for p in padding)


@dataclasses.dataclass(frozen=True)
class ConvOp:
    """NHWC x HWIO cross-correlation, by shifted matrix products (no lax)."""

    stride: int
    padding: object  # "SAME", "VALID", an int or ((t, b), (l, r)): hashable
    variant: str  # sparse_conv2d's kernel=
    stride_pair: bool = False  # pass strides as (s, s) rather than s

    def _geometry(self, x_shape, k_shape):
        _, h, w, _ = x_shape
        kh, kw = k_shape[:2]
        pads = conv_pads(h, w, kh, kw, self.stride, self.padding)
        ho = (h + sum(pads[0]) - kh) // self.stride + 1
        wo = (w + sum(pads[1]) - kw) // self.stride + 1
        return pads, ho, wo

    def _window(self, i, j, ho, wo):
        s = self.stride
        return (slice(None), slice(i, i + s * (ho - 1) + 1, s), slice(j, j + s * (wo - 1) + 1, s))

    def forward(self, x, k):
        pads, ho, wo = self._geometry(x.shape, k.shape)
        xp = np.pad(x, ((0, 0), *pads, (0, 0)))
        y = np.zeros((x.shape[0], ho, wo, k.shape[3]))
        for i in range(k.shape[0]):
            for j in range(k.shape[1]):
                y += xp[self._window(i, j, ho, wo)] @ k[i, j]
        return y

    def input_grad(self, dy, k, x_shape):
        pads, ho, wo = self._geometry(x_shape, k.shape)
        (pt, pb), (pl, pr) = pads
        n, h, w, c = x_shape
        dxp = np.zeros((n, h + pt + pb, w + pl + pr, c))
        for i in range(k.shape[0]):
            for j in range(k.shape[1]):
                dxp[self._window(i, j, ho, wo)] += dy @ k[i, j].T
        return dxp[:, pt:pt + h, pl:pl + w]

    def kernel_grad(self, x, dy, k_shape):
        pads, ho, wo = self._geometry(x.shape, k_shape)
        xp = np.pad(x, ((0, 0), *pads, (0, 0)))
        dk = np.zeros(k_shape)
        dy2 = dy.reshape(-1, k_shape[3])
        for i in range(k_shape[0]):
            for j in range(k_shape[1]):
                dk[i, j] = xp[self._window(i, j, ho, wo)].reshape(-1, k_shape[2]).T @ dy2
        return dk

    def terms(self, x_shape, k_shape, y_shape):
        kh, kw, _, _ = k_shape
        return kh * kw * k_shape[2], kh * kw * k_shape[3], int(np.prod(y_shape[:3]))

    def call(self, x, weight, bias):
        strides = (self.stride, self.stride) if self.stride_pair else self.stride
        return sp.sparse_conv2d(x, weight, bias, strides=strides, padding=self.padding,
                                variant=self.variant)


# -- vmap structures -------------------------------------------------------------
# f(x, values, bias) -> y. Each mode: (how to vmap f; the x and values leading
# dims, given the two sizes (a, j); and which x / values slice each output slice
# reads). The bias is never batched (in_axes None at every level).
def _vmapped(f: Callable, mode: str) -> Callable:
    def vm(g, xa, va):
        return jax.vmap(g, in_axes=(xa, va, None))

    return {
        "none": f,
        "x": vm(f, 0, None),
        "values": vm(f, None, 0),
        "both": vm(f, 0, 0),
        "x_then_values": vm(vm(f, None, 0), 0, None),  # y[a, j] = f(x[a], v[j])
        "values_then_x": vm(vm(f, 0, None), None, 0),  # y[j, a] = f(x[a], v[j])
        "x2_then_values": vm(vm(f, 0, 0), 0, None),  # y[a, j] = f(x[a, j], v[j])
    }[mode]


def _layout(mode: str, a: int, j: int):
    """(x lead dims, values lead dims, output grid, grid index -> (x index, values index))."""
    if mode == "none":
        return (), (), (), lambda t: ((), ())
    if mode == "x":
        return (a,), (), (a,), lambda t: (t, ())
    if mode == "values":
        return (), (j,), (j,), lambda t: ((), t)
    if mode == "both":
        return (a,), (a,), (a,), lambda t: (t, t)
    if mode == "x_then_values":
        return (a,), (j,), (a, j), lambda t: ((t[0],), (t[1],))
    if mode == "values_then_x":
        return (a,), (j,), (j, a), lambda t: ((t[1],), (t[0],))
    if mode == "x2_then_values":
        return (a, j), (j,), (a, j), lambda t: (t, (t[1],))
    raise ValueError(mode)


MODES = ("x", "values", "both", "x_then_values", "values_then_x", "x2_then_values")


def _evaluate(op, mode: str, wrt: tuple, pattern, x, values, bias, dy):
    """y and the cotangents of the `wrt` arguments for output cotangent dy."""

    def f(x, v, b):
        return op.call(x, sp.SparseWeight(v, pattern), b)

    g = _vmapped(f, mode)
    args = {"x": x, "values": values, "bias": bias}
    names = [n for n in wrt if args[n] is not None]

    def h(*diff):
        a = dict(args, **dict(zip(names, diff)))
        return g(a["x"], a["values"], a["bias"])

    y, vjp = jax.vjp(h, *(args[n] for n in names))
    return y, dict(zip(names, vjp(dy)))


_evaluate_jit = jax.jit(_evaluate, static_argnums=(0, 1, 2))


@jax.jit  # one compilation per shape instead of one per eager op
def _to_dense(stacked_values, pattern):
    """SparseWeight.to_dense of each row of stacked values."""
    return jax.vmap(lambda v: sp.SparseWeight(v, pattern).to_dense())(stacked_values)


# -- drawing arrays ----------------------------------------------------------------
def _array(rng, shape, exponent: int, spread: float, zeros: float = 0.0) -> np.ndarray:
    """float32 of magnitude 10**exponent * [0.5, 2) * 10**-U(0, spread), random signs;
    a fraction `zeros` of exact zeros."""
    mag = rng.uniform(0.5, 2.0, shape) * 10.0 ** (exponent - rng.uniform(0.0, spread, shape))
    a = mag * rng.choice([-1.0, 1.0], shape)
    if zeros:
        a = np.where(rng.random(shape) < zeros, 0.0, a)
    return a.astype(np.float32)


def _mask(rng, shape, sparsity: float) -> np.ndarray:
    """Exactly round(sparsity * size) zeros, uniformly placed (as conftest.random_kernel)."""
    size = int(np.prod(shape))
    nnz = size - int(round(sparsity * size))
    mask = np.zeros(size, bool)
    mask[rng.choice(size, nnz, replace=False)] = True
    return mask.reshape(shape)


# Exponents of x, the kernel, dy and the bias: every element is below 2e12,
# so products stay below 4e24 and sums of up to 1e5 of them below 1e30 (no
# float32 overflow); above 0.5e-17, so products stay normal (> 2.5e-35).
exponents = st.integers(-15, 12)
spreads = st.sampled_from([0.0, 2.0])  # decades of magnitude within one array
sparsities = st.one_of(st.sampled_from([0.0, 0.99, 1.0]),
                       st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))


@st.composite
def run_configs(draw):
    """How to run: tasks per call, SIMD path (jit is a test parameter)."""
    return dict(tasks=draw(st.sampled_from(TASKS)), path=draw(st.sampled_from(PATHS)))


@st.composite
def value_configs(draw, wrt):
    """Values: the seed of the arrays and their magnitudes; a bias always when its
    gradient is wanted."""
    return dict(seed=draw(st.integers(0, 2**32 - 1)), sparsity=draw(sparsities),
                ex=draw(exponents), ek=draw(exponents), edy=draw(exponents),
                eb=draw(exponents), spread=draw(spreads),
                x_zeros=draw(st.sampled_from([0.0, 0.0, 0.5])),
                bias="bias" in wrt or draw(st.booleans()))


features = st.one_of(st.integers(1, 16), st.integers(17, 300))
batches = st.sampled_from([0, 1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 33])


@st.composite
def linear_cases(draw, jit):
    n_in, n_out = draw(features), draw(features)
    lead = tuple(draw(st.lists(batches, min_size=0, max_size=2)))
    # Keep the work small: shrink the batch until x and y hold <= 12k floats.
    while lead and int(np.prod(lead)) * (n_in + n_out) > 12_000:
        lead = lead[:-1] + (lead[-1] // 2,)
    wrt = draw(st.sampled_from([("x", "values", "bias"), ("x",), ("values",),
                                ("x", "values"), ("values", "bias")]))
    return dict(kind="linear", n_in=n_in, n_out=n_out, lead=lead, wrt=wrt, jit=jit,
                **draw(value_configs(wrt)), **draw(run_configs()))


@st.composite
def conv_geometries(draw, variant, batch=st.sampled_from([1, 0, 1, 2, 3, 4, 5]),
                    channels=st.integers(1, 6), max_extra=7):
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stride = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["SAME", "VALID", "explicit", "int"]))
    if kind == "explicit":  # asymmetric; up to a whole kernel of padding per side
        pads = ((draw(st.integers(0, kh)), draw(st.integers(0, kh))),
                (draw(st.integers(0, kw)), draw(st.integers(0, kw))))
        padding = pads
    elif kind == "int":
        padding = draw(st.integers(0, max(kh, kw)))
        pads = ((padding, padding),) * 2
    else:
        pads, padding = ((0, 0), (0, 0)), kind
    # Only valid geometries: the kernel fits the padded input (SAME always fits).
    min_h = 1 if kind == "SAME" else max(1, kh - sum(pads[0]))
    min_w = 1 if kind == "SAME" else max(1, kw - sum(pads[1]))
    h = draw(st.integers(min_h, min_h + max_extra))
    w = draw(st.integers(min_w, min_w + max_extra))
    n = draw(batch)
    cin, cout = draw(channels), draw(channels)
    return dict(n=n, h=h, w=w, kh=kh, kw=kw, cin=cin, cout=cout, stride=stride,
                stride_pair=draw(st.booleans()), padding=padding, variant=variant)


@st.composite
def conv_cases(draw, jit, variant):
    wrt = draw(st.sampled_from([("x", "values", "bias"), ("x",), ("values",)]))
    return dict(kind="conv", **draw(conv_geometries(variant)), wrt=wrt, jit=jit,
                **draw(value_configs(wrt)), **draw(run_configs()))


@st.composite
def vmap_cases(draw, kind, mode):
    # With few examples per mode, even the first (simplest) one should tell the
    # slices apart: sizes of 2 come first, 1 last.
    sizes = st.sampled_from([2, 3, 1])
    if kind == "linear":
        geometry = dict(n_in=draw(st.integers(1, 40)), n_out=draw(st.integers(1, 40)),
                        lead=tuple(draw(st.lists(batches, min_size=0, max_size=1))))
    else:
        variant = draw(st.sampled_from(["batch", "width"]))
        geometry = draw(conv_geometries(variant, batch=st.sampled_from([2, 1, 0, 3]),
                                        channels=st.sampled_from([2, 1, 3, 4]), max_extra=4))
    wrt = ("x", "values", "bias")
    return dict(kind=kind, mode=mode, a=draw(sizes), j=draw(sizes),
                wrt=wrt, jit=draw(st.booleans()), **geometry, **draw(value_configs(wrt)),
                **draw(run_configs()))


# -- one case ------------------------------------------------------------------------
def _run_case(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    mode = case.get("mode", "none")
    x_lead, v_lead, grid, index = _layout(mode, case.get("a", 1), case.get("j", 1))
    if case["kind"] == "linear":
        op = LinearOp()
        x_shape, k_shape = case["lead"] + (case["n_in"],), (case["n_in"], case["n_out"])
    else:
        op = ConvOp(case["stride"], case["padding"], case["variant"], case["stride_pair"])
        x_shape = (case["n"], case["h"], case["w"], case["cin"])
        k_shape = (case["kh"], case["kw"], case["cin"], case["cout"])
    mask = _mask(rng, k_shape, case["sparsity"])
    spread = case["spread"]
    kernels = np.where(mask, _array(rng, v_lead + k_shape, case["ek"], spread), 0.0)
    kernels = kernels.astype(np.float32)
    pattern = sp.SparseWeight.from_dense(kernels[(0,) * len(v_lead)]).pattern
    assert np.array_equal(np.asarray(pattern.mask()), mask)
    to_values = lambda k: np.asarray(sp.SparseWeight.gather(k, pattern).values)  # noqa: E731
    values = np.stack([to_values(kernels[i]) for i in np.ndindex(v_lead)]).reshape(
        v_lead + (pattern.nnz,))
    x = _array(rng, x_lead + x_shape, case["ex"], spread, case["x_zeros"])
    bias = _array(rng, k_shape[-1:], case["eb"], spread) if case["bias"] else None

    # The float64 reference, one output slice at a time.
    x64, k64 = x.astype(np.float64), kernels.astype(np.float64)
    slices = {t: index(t) for t in np.ndindex(grid)}
    y_slice_shape = op.forward(x64[(0,) * len(x_lead)], k64[(0,) * len(v_lead)]).shape
    dy = _array(rng, grid + y_slice_shape, case["edy"], spread)
    dy64 = dy.astype(np.float64)
    y_ref, y_abs = np.zeros(dy.shape), np.zeros(dy.shape)
    dx_ref, dx_abs = np.zeros(x.shape), np.zeros(x.shape)
    dk_ref, dk_abs = np.zeros(kernels.shape), np.zeros(kernels.shape)
    for t, (xi, ki) in slices.items():
        xs, ks, dys = x64[xi], k64[ki], dy64[t]
        y_ref[t] = op.forward(xs, ks)
        y_abs[t] = op.forward(np.abs(xs), np.abs(ks))
        dx_ref[xi] += op.input_grad(dys, ks, xs.shape)
        dx_abs[xi] += op.input_grad(np.abs(dys), np.abs(ks), xs.shape)
        dk_ref[ki] += op.kernel_grad(xs, dys, k_shape)
        dk_abs[ki] += op.kernel_grad(np.abs(xs), np.abs(dys), k_shape)
    if bias is not None:
        y_ref += bias.astype(np.float64)
        y_abs += np.abs(bias.astype(np.float64))
    db_ref = dy64.reshape(-1, k_shape[-1]).sum(0)
    db_abs = np.abs(dy64).reshape(-1, k_shape[-1]).sum(0)
    # Terms per element: the op's own, times the slices that share an operand.
    n_y, n_dx, n_dk = op.terms(x_shape, k_shape, y_slice_shape)
    per_x = max(len(slices) // max(int(np.prod(x_lead)), 1), 1)
    per_k = max(len(slices) // max(int(np.prod(v_lead)), 1), 1)
    n_y, n_dx, n_dk = n_y + 1, n_dx * per_x, n_dk * per_k
    n_db = max(int(np.prod(dy.shape[:-1])), 1)

    description = f"case: {case}"
    evaluate = _evaluate_jit if case["jit"] else _evaluate
    with sp.use_simd_path(case["path"]), tasks_per_call(case["tasks"]):
        y, grads = jax.block_until_ready(evaluate(op, mode, case["wrt"], pattern, x, values,
                                                  bias, dy))
    _check("y", y, y_ref, y_abs, n_y, description)
    if "x" in case["wrt"]:
        _check("dx", grads["x"], dx_ref, dx_abs, n_dx, description)
    if "values" in case["wrt"]:
        dvalues = grads["values"]
        assert dvalues.shape == v_lead + (pattern.nnz,), (
            f"dvalues: shape {dvalues.shape}, expected {v_lead + (pattern.nnz,)}\n{description}")
        dense = np.asarray(_to_dense(
            dvalues.reshape(int(np.prod(v_lead)), pattern.nnz), pattern))
        dense = dense.reshape(kernels.shape)
        off = np.broadcast_to(~mask, dense.shape)
        assert np.all(dense[off] == 0), f"dvalues: nonzero off the pattern\n{description}"
        _check("dvalues (as a dense kernel)", dense, dk_ref * mask, dk_abs * mask, n_dk,
               description)
    if "bias" in case["wrt"] and bias is not None:
        _check("dbias", grads["bias"], db_ref, db_abs, n_db, description)


# -- the tests -----------------------------------------------------------------------
# jit, the conv kernel and the vmap structure are parameters rather than draws,
# so that every one of them is covered in a short run; hypothesis draws the rest.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@_settings(15)
@given(data=st.data())
def test_linear_matches_float64(jit, data):
    _run_case(data.draw(linear_cases(jit), label="case"))


@pytest.mark.parametrize("variant", ["batch", "width"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@_settings(7)
@given(data=st.data())
def test_conv_matches_float64(jit, variant, data):
    _run_case(data.draw(conv_cases(jit, variant), label="case"))


@pytest.mark.parametrize("mode", MODES)
@_settings(2)
@given(data=st.data())
def test_linear_under_vmap_matches_float64(mode, data):
    _run_case(data.draw(vmap_cases("linear", mode), label="case"))


@pytest.mark.parametrize("mode", MODES)
@_settings(2)
@given(data=st.data())
def test_conv_under_vmap_matches_float64(mode, data):
    _run_case(data.draw(vmap_cases("conv", mode), label="case"))


# -- the checker and the reference themselves ------------------------------------------
@pytest.mark.parametrize("geometry", [
    (2, 7, 5, 3, 2, 1, "SAME"), (1, 2, 3, 5, 7, 3, "SAME"), (3, 8, 9, 4, 3, 2, "VALID"),
    (2, 4, 6, 2, 5, 3, ((3, 0), (1, 2))), (1, 3, 3, 3, 3, 1, ((3, 3), (0, 3))),
    (2, 5, 4, 3, 2, 2, 2),
])
def test_numpy_conv_reference_matches_lax(geometry):
    """The NumPy conv reference and its two transposes agree with lax (float32, HIGHEST)."""
    n, h, w, kh, kw, stride, padding = geometry
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, h, w, 3)).astype(np.float32)
    k = rng.standard_normal((kh, kw, 3, 4)).astype(np.float32)
    op = ConvOp(stride, padding, "batch")
    if not isinstance(padding, str):
        padding = conv_pads(h, w, kh, kw, stride, padding)

    def conv(x, k):
        return lax.conv_general_dilated(x, k, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=lax.Precision.HIGHEST)

    y, vjp = jax.vjp(conv, x, k)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dk = vjp(dy)
    x64, k64, dy64 = (a.astype(np.float64) for a in (x, k, dy))
    for got, ref in ((y, op.forward(x64, k64)), (dx, op.input_grad(dy64, k64, x.shape)),
                     (dk, op.kernel_grad(x64, dy64, k.shape))):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_checker_rejects_a_wrong_result():
    """The bound is tight enough to catch one perturbed element or one dropped nonzero."""
    rng = np.random.default_rng(2)
    kernel = np.where(_mask(rng, (200, 30), 0.5), _array(rng, (200, 30), 3, 2.0), 0)
    kernel = kernel.astype(np.float32)
    weight = sp.SparseWeight.from_dense(kernel)
    x = _array(rng, (9, 200), -7, 2.0)
    y = np.asarray(sp.sparse_linear(x, weight))
    x64, k64 = x.astype(np.float64), kernel.astype(np.float64)
    ref, abs_sum = x64 @ k64, np.abs(x64) @ np.abs(k64)
    _check("y", y, ref, abs_sum, 200, "")  # the true result passes
    # One element off by 1e-4 of its absolute sum: caught.
    bad = y.copy()
    bad[4, 7] += np.float32(1e-4 * abs_sum[4, 7])
    with pytest.raises(AssertionError, match=r"y: 1 of 270 elements beyond the bound"):
        _check("y", bad, ref, abs_sum, 200, "")
    # The op run on a kernel missing its largest nonzero in one column: caught.
    col = 11
    row = int(np.argmax(np.abs(k64[:, col])))
    dropped = kernel.copy()
    dropped[row, col] = 0
    y_dropped = np.asarray(sp.sparse_linear(x, sp.SparseWeight.from_dense(dropped)))
    with pytest.raises(AssertionError, match="beyond the bound"):
        _check("y", y_dropped, ref, abs_sum, 200, "")
    # NaN fails; so does a nonzero where every term is zero.
    with pytest.raises(AssertionError):
        _check("y", np.float32([np.nan]), np.zeros(1), np.zeros(1), 1, "")
    with pytest.raises(AssertionError):
        _check("y", np.float32([1e-30]), np.zeros(1), np.zeros(1), 1, "")
