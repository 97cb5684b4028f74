"""`sparse_conv2d`: 2-D convolution with a sparse HWIO kernel on NHWC activations.

A direct convolution over the nonzeros (no im2col): forward, input gradient and
weight gradient each cost O(batch x output pixels x nnz). Two variants differ
in which dimensions the SIMD lanes run over ("batch": runs of output width x
batch; "width": runs of one output row of one image); `conv_variants` says
which runs a call. Both take the NHWC operands as they are and lay them out
inside their FFI calls (xla_ffi/conv_*_ffi.cc).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import numpy as np
from jax import lax

from sparseprop_jax import _checks, _ffi, _targets, conv_variants
from sparseprop_jax.sparse_weight import SparseWeight

Array = jax.Array
Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]
#: Canonical padding: "SAME", "VALID" or ((top, bottom), (left, right)).
ConvPadding = Union[str, tuple[tuple[int, int], tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Static description of one convolution call (hashable: a custom_vjp nondiff arg)."""

    variant: str  # one of conv_variants.VARIANTS
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
    def attrs(self) -> dict[str, np.int64]:
        """The calls' attributes (`_targets.CONV_ATTRS`)."""
        (pt, pb), (pl, pr) = self.pads
        return dict(stride=np.int64(self.stride), kh=np.int64(self.kh), kw=np.int64(self.kw),
                    pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
                    pad_right=np.int64(pr))

    def output_shape(self) -> tuple[int, ...]:
        return (self.n, self.ho, self.wo, self.kernel_shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv_op(geometry, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    """The differentiable call on the geometry's variant (arguments checked by the caller)."""
    return _ffi.call(_targets.CONV_FORWARD[geometry.variant], geometry.output_shape(), x, values,
                     indptr, indices, **geometry.attrs)


def _conv_fwd(geometry, x, values, indptr, indices, t_indptr, t_indices, t_perm):
    y = conv_op(geometry, x, values, indptr, indices, t_indptr, t_indices, t_perm)
    return y, (x, values, indptr, indices, t_indptr, t_indices, t_perm)


def _conv_bwd(geometry, residuals, dy):
    x, values, *pattern = residuals
    dx, dvalues = _ffi.call(_targets.CONV_BACKWARD[geometry.variant], (x.shape, values.shape), x,
                            dy, values, *pattern, **geometry.attrs)
    return dx, dvalues, None, None, None, None, None


conv_op.defvjp(_conv_fwd, _conv_bwd)


def sparse_conv2d(x: Any, weight: SparseWeight, bias: Optional[Any] = None,
                  strides: Union[int, Sequence[int]] = 1, padding: Padding = "SAME", *,
                  variant: str = "auto") -> Array:
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
      variant: which variant of the convolution runs (`conv_variants`):
        "batch" or "width" (which dims the SIMD lanes run over), "auto"
        (`conv_variants.auto_variant`'s rule: the batch variant) or "measure"
        (time both on random data of this shape and nnz the first time it is
        met, also while tracing under jit, and keep the faster for every later
        call).

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
    _checks.check_dtype(where, "x", x)
    if x.ndim != 4:
        raise ValueError(f"{where}: x must be 4-D NHWC [N, H, W, {cin}], got shape {x.shape}")
    if x.shape[-1] != cin:
        raise ValueError(f"{where}: x must have {cin} channels (the kernel's in), got shape "
                         f"{x.shape}")
    if bias is not None:
        bias = _checks.as_array(where, "bias", bias)
        _checks.check_dtype(where, "bias", bias)
        _checks.check_shape(where, "bias", bias, (cout,))
    stride = parse_strides(where, strides)[0]
    pads = explicit_pads(parse_padding(where, padding), x.shape[1:3], (kh, kw), stride)
    if variant not in conv_variants.CHOICES:
        raise ValueError(f"{where}: variant must be one of {conv_variants.CHOICES}, got "
                         f"{variant!r}")
    geometry = ConvGeometry("batch", x.shape[0], x.shape[1], x.shape[2], weight.shape, stride,
                            pads)
    if geometry.ho < 1 or geometry.wo < 1:
        raise ValueError(f"{where}: the {kh}x{kw} kernel is larger than the padded input "
                         f"{geometry.hp}x{geometry.wp} (x {x.shape[1]}x{x.shape[2]}, padding "
                         f"{pads})")
    geometry = dataclasses.replace(
        geometry, variant=conv_variants.choose(variant, geometry, weight.nnz))
    p = weight.pattern
    x, values = _checks.promote_to_common(x, weight.values)
    # Under shard_map: the weight made varying like x, so its gradient is all-reduced once.
    y = conv_op(geometry, *_ffi.match_vma(x, values, p.indptr, p.indices, p.t_indptr,
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
