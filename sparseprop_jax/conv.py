"""`sparse_conv2d`: 2-D convolution with a sparse HWIO kernel on NHWC activations.

A direct convolution over the nonzeros (no im2col): forward, input gradient and
weight gradient each cost O(batch x output pixels x nnz). Two kernels differ
in which dimensions the SIMD lanes run over:

- "batch": the batch is the minor dimension and each image row of a channel
  one run (layout H, C, W, N, strided columns split into phases), so a tap
  covers a whole output row x batch in one contiguous run.
- "width": the output width is the contiguous dimension (layout N, C, H, W,
  strided columns split into phases); runs of one output row of one image.

"auto" runs "batch" (see `_auto_variant`); "measure" times both on the first
call with a shape and remembers the faster.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparseprop_jax import _checks, _ffi
from sparseprop_jax.runtime import simd_path
from sparseprop_jax.sparse_weight import SparseWeight

Array = jax.Array
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
#: Canonical padding: "SAME", "VALID" or ((top, bottom), (left, right)).
ConvPadding = Union[str, tuple[tuple[int, int], tuple[int, int]]]

KERNELS = ("auto", "measure", "batch", "width")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static description of one convolution call (hashable: a custom_vjp nondiff arg)."""

    variant: str  # "batch" or "width"
    n: int
    h: int
    w: int
    kernel_shape: tuple[int, int, int, int]  # (kh, kw, cin, cout)
    stride: int
    pads: tuple[tuple[int, int], tuple[int, int]]

    @property
    def kh(self) -> int:
        return self.kernel_shape[0]

    @property
    def kw(self) -> int:
        return self.kernel_shape[1]

    @property
    def hp(self) -> int:
        return self.h + sum(self.pads[0])

    @property
    def wp(self) -> int:
        return self.w + sum(self.pads[1])

    @property
    def ho(self) -> int:
        return (self.hp - self.kh) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.wp - self.kw) // self.stride + 1

    @property
    def wq(self) -> int:
        """Width-minor layout: columns per stride phase, enough for every window."""
        return max(-(-self.wp // self.stride), self.wo + (self.kw - 1) // self.stride)

    @property
    def attrs(self) -> dict[str, np.int64]:
        """Attributes of the width variant's calls, which take its own layouts."""
        return dict(stride=np.int64(self.stride), kh=np.int64(self.kh), kw=np.int64(self.kw))

    @property
    def nhwc_attrs(self) -> dict[str, np.int64]:
        """Attributes of the batch variant's calls, which take NHWC operands."""
        (pt, pb), (pl, pr) = self.pads
        return dict(stride=np.int64(self.stride), kh=np.int64(self.kh), kw=np.int64(self.kw),
                    pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
                    pad_right=np.int64(pr))

    def nhwc_output_shape(self) -> tuple[int, ...]:
        return (self.n, self.ho, self.wo, self.kernel_shape[3])

    # -- the width variant's layouts (the batch variant's handlers take NHWC) ----
    def input_to_layout(self, x: Array) -> Array:
        """NHWC input -> padded (N, C, Hp, s, Wq), strided columns split into phases."""
        (pt, pb), (pl, pr) = self.pads
        s, wq = self.stride, self.wq
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr + s * wq - self.wp), (0, 0)))
        xp = xp.reshape(self.n, self.hp, wq, s, x.shape[-1])
        return xp.transpose(0, 4, 1, 3, 2)

    def input_from_layout(self, xl: Array) -> Array:
        """Padded kernel layout -> NHWC, padding cropped."""
        (pt, _), (pl, _) = self.pads
        xp = xl.transpose(0, 2, 4, 3, 1).reshape(self.n, self.hp, self.stride * self.wq,
                                                  self.kernel_shape[2])
        return xp[:, pt:pt + self.h, pl:pl + self.w, :]

    def output_shape(self) -> tuple[int, ...]:
        return (self.n, self.kernel_shape[3], self.ho, self.wo)

    def output_from_layout(self, yl: Array) -> Array:
        return yl.transpose(0, 2, 3, 1)

    def output_to_layout(self, y: Array) -> Array:
        return y.transpose(0, 3, 1, 2)

    def padded_output_grad(self, dyl: Array) -> Array:
        """The output gradient padded as the phase-split input gradient reads it."""
        s = self.stride
        p, q = -(-self.kh // s) - 1, -(-self.kw // s) - 1
        hd = max(self.ho, -(-self.hp // s)) + p
        wd = max(self.wo, self.wq) + q
        rows, cols = (p, hd - p - self.ho), (q, wd - q - self.wo)
        return jnp.pad(dyl, ((0, 0), (0, 0), rows, cols))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(geometry, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    y, _ = _conv_fwd(geometry, x, values, indptr, indices, t_indptr, t_indices, t_perm)
    return y


def _conv_fwd(geometry, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    if geometry.variant == "batch":  # the handlers lay NHWC out themselves
        y = _ffi.call(_ffi.CONV_NHWC_FORWARD, geometry.nhwc_output_shape(), x, values, indptr,
                      indices, **geometry.nhwc_attrs)
        return y, (x, values, indptr, indices, t_indptr, t_indices, t_perm)
    xl = geometry.input_to_layout(x)
    yl = _ffi.call(_ffi.CONV_FORWARD, geometry.output_shape(), xl, values, indptr, indices,
                   **geometry.attrs)
    return geometry.output_from_layout(yl), (xl, values, indptr, indices, t_indptr, t_indices,
                                             t_perm)


def _conv_bwd(geometry, residuals, dy):
    if geometry.variant == "batch":
        x, values, *pattern = residuals
        dx, dvalues = _ffi.call(_ffi.CONV_NHWC_BACKWARD, (x.shape, values.shape), x, dy, values,
                                *pattern, **geometry.nhwc_attrs)
        return dx, dvalues, None, None, None, None, None
    xl, values, indptr, indices, t_indptr, t_indices, t_perm = residuals
    dyl = geometry.output_to_layout(dy)
    dvalues = _ffi.call(_ffi.CONV_WEIGHT_GRAD, values.shape, dyl, xl, indptr, indices,
                        **geometry.attrs)
    dxl = _ffi.call(_ffi.CONV_INPUT_GRAD, xl.shape, geometry.padded_output_grad(dyl),
                    values, indptr, indices, t_indptr, t_indices, t_perm, **geometry.attrs)
    return geometry.input_from_layout(dxl), dvalues, None, None, None, None, None


_conv.defvjp(_conv_fwd, _conv_bwd)


def sparse_conv2d(x: Any, weight: SparseWeight, bias: Optional[Any] = None,
                  strides: Union[int, Sequence[int]] = 1, padding: Padding = "SAME", *,
                  kernel: str = "auto") -> Array:
    """2-D convolution of NHWC `x` with a sparse HWIO kernel, in O(batch x pixels x nnz).

    Equals `lax.conv_general_dilated(x, weight.to_dense(), strides, padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias`. Differentiable
    (`jax.custom_vjp`) with respect to `x`, `weight.values` and `bias`; works
    under `jit`, `grad`, `vmap` and `checkpoint`. The weight gradient is
    deterministic (bit-identical on every run).

    Args:
      x: float32 `[N, H, W, C_in]`.
      weight: sparse kernel of shape `(kh, kw, C_in, C_out)`.
      bias: optional float32 `[C_out]`.
      strides: an int or `(stride_h, stride_w)`; both must be equal.
      padding: "SAME", "VALID", an int, or `((top, bottom), (left, right))`
        (each element may also be one int for both sides), as in `flax.nnx.Conv`.
      kernel: "batch" or "width" (the vectorisation, see the module doc),
        "auto" (the batch kernel) or "measure" (time both on random data of this
        shape and nnz the first time it is met, also while tracing under
        jit, and keep the faster for every later call).

    Returns:
      float32 `[N, H_out, W_out, C_out]`.
    """
    where = "sparse_conv2d"
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"{where}: weight must be a SparseWeight, got {type(weight).__name__}")
    if len(weight.shape) != 4:
        raise ValueError(f"{where}: weight must be a 4-D HWIO kernel (kh, kw, in, out), got shape "
                         f"{weight.shape} (sparse_linear takes 2-D kernels)")
    weight.check(where)
    kh, kw, cin, cout = weight.shape
    x = _checks.as_array(where, "x", x)
    _checks.check_float32(where, "x", x)
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be 4-D NHWC [N, H, W, {cin}], got shape {x.shape}")
    if x.shape[-1] != cin:
        raise ValueError(f"{where}: x must have {cin} channels (the kernel's in), got shape "
                         f"{x.shape}")
    if bias is not None:
        bias = _checks.as_array(where, "bias", bias)
        _checks.check_float32(where, "bias", bias)
        _checks.check_shape(where, "bias", bias, (cout,))
    stride = parse_strides(where, strides)[0]
    pads = explicit_pads(parse_padding(where, padding), x.shape[1:3], (kh, kw), stride)
    if kernel not in KERNELS:
        raise ValueError(f"{where}: kernel must be one of {KERNELS}, got {kernel!r}")
    geometry = _Geometry("batch", x.shape[0], x.shape[1], x.shape[2], weight.shape, stride, pads)
    if geometry.ho < 1 or geometry.wo < 1:
        raise ValueError(f"{where}: the {kh}x{kw} kernel is larger than the padded input "
                         f"{geometry.hp}x{geometry.wp} (x {x.shape[1]}x{x.shape[2]}, padding "
                         f"{pads})")
    variant = _choose_variant(kernel, geometry, weight)
    geometry = dataclasses.replace(geometry, variant=variant)
    p = weight.pattern
    # Under shard_map: the weight made varying like x, so its gradient is all-reduced once.
    y = _conv(geometry, *_ffi.match_vma(x, weight.values, p.indptr, p.indices, p.t_indptr,
                                        p.t_indices, p.t_perm))
    return y if bias is None else y + bias


# -- argument parsing (shared with the Flax conv layers) -----------------------
def conv_pair(where: str, name: str, value: Any) -> tuple[Any, ...]:
    """An int (or None, flax's 1) broadcast to both spatial dims, or a pair."""
    if value is None:
        value = 1
    if _checks.is_int(value):
        return (int(value), int(value))
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{where}: {name} must be an int or a pair of ints (one per spatial "
                         f"dim; only 2-D convolutions are supported), got {value!r}")
    return tuple(value)


def parse_strides(where: str, strides: Any, name: str = "strides") -> tuple[int, int]:
    """`(s, s)` from an int, None (1) or an equal pair."""
    pair = conv_pair(where, name, strides)
    if not all(_checks.is_int(s) and s >= 1 for s in pair):
        raise ValueError(f"{where}: {name} must be positive ints, got {strides!r}")
    if pair[0] != pair[1]:
        raise ValueError(f"{where}: {name}={strides!r} is not supported: the strides along "
                         "height and width must be equal")
    return (int(pair[0]), int(pair[1]))


def parse_padding(where: str, padding: Any, name: str = "padding") -> ConvPadding:
    """"SAME", "VALID" or `((top, bottom), (left, right))` from flax's padding forms."""
    if isinstance(padding, str):
        upper = padding.upper()
        if upper in ("SAME", "VALID"):
            return upper
        if upper in ("CIRCULAR", "REFLECT", "CAUSAL", "SAME_LOWER"):
            raise ValueError(f"{where}: {name}={padding!r} is not supported (use 'SAME', "
                             "'VALID', an int or ((top, bottom), (left, right)))")
        raise ValueError(f"{where}: {name} must be 'SAME', 'VALID', an int or ((top, bottom), "
                         f"(left, right)), got {padding!r}")
    if _checks.is_int(padding):
        pads = ((padding, padding),) * 2
    else:
        pads = None
        if isinstance(padding, Sequence) and len(padding) == 2:
            pads = tuple((p, p) if _checks.is_int(p) else tuple(p)
                         if isinstance(p, Sequence) and not isinstance(p, str) else None
                         for p in padding)
        if pads is None or any(p is None or len(p) != 2 or not all(map(_checks.is_int, p))
                               for p in pads):
            raise ValueError(f"{where}: {name} must be 'SAME', 'VALID', an int or "
                             f"((top, bottom), (left, right)), got {padding!r}")
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{where}: {name} must be non-negative, got {padding!r}")
    return tuple((int(a), int(b)) for a, b in pads)  # type: ignore[return-value]


def explicit_pads(padding: ConvPadding, spatial, window, stride: int):
    """((top, bottom), (left, right)) pads, as lax.conv_general_dilated computes them."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(spatial, window, (stride, stride), padding)
        return tuple(tuple(int(v) for v in p) for p in pads)
    return padding


def _choose_variant(kernel: str, geometry: _Geometry, weight: SparseWeight) -> str:
    if kernel in ("batch", "width"):
        return kernel
    if kernel == "measure":
        # Needs only static facts (shapes, nnz), so it also works while tracing.
        return _measured_variant(geometry, weight.nnz)
    return _auto_variant(geometry)


def _auto_variant(g: _Geometry) -> str:
    """The variant kernel="auto" runs: always "batch".

    Per nonzero and output row, the batch kernel streams one run of wo x n
    floats and the width kernel n runs of wo, so the batch kernel never needs
    more vector operations, and it lays the activations out inside its FFI
    calls. Measured (2 threads, the seven ResNet18 layers of
    benchmarks/conv2d.py at 90% and 98%): at batch 4 the batch kernel was 1.3
    to 7.6x faster on every layer; at batch 1, where the operation counts
    tie, either won by up to 2x depending on the layer, which is what
    kernel="measure" is for.
    """
    del g  # the rule needs no geometry today; the benchmark asks through it
    return "batch"


_MEASURED: dict[tuple, str] = {}


def _measured_variant(g: _Geometry, nnz: int) -> str:
    """Times forward + backward of both variants once per shape; caches the faster."""
    key = (g.n, g.h, g.w, g.kernel_shape, g.stride, g.pads, nnz, simd_path())
    if key not in _MEASURED:
        # Evaluate eagerly even when called while tracing an enclosing jit.
        with jax.ensure_compile_time_eval():
            _MEASURED[key] = _time_variants(g, nnz)
    return _MEASURED[key]


def _time_variants(g: _Geometry, nnz: int) -> str:
    """The faster variant for forward + backward on random data of this geometry."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((g.n, g.h, g.w, g.kernel_shape[2]), np.float32))
    weight = SparseWeight.random(g.kernel_shape, 1.0 - nnz / np.prod(g.kernel_shape),
                                 jax.random.key(0))
    times = {}
    for variant in ("batch", "width"):
        geometry = dataclasses.replace(g, variant=variant)
        p = weight.pattern

        def loss(x, values, geometry=geometry, p=p):
            y = _conv(geometry, x, values, p.indptr, p.indices, p.t_indptr, p.t_indices,
                      p.t_perm)
            return jnp.sum(y)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(step(x, weight.values))  # compile
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(step(x, weight.values))
            samples.append(time.perf_counter() - start)
        times[variant] = min(samples)
    return min(times, key=times.get)
