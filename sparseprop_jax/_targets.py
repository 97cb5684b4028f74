"""Every XLA FFI target of the extension, declared once: name, operands, results, attributes.

Each operand and result names the dim that holds the batch (for vmap's leading
dims and for splitting a call over devices), or None when it does not depend
on the batch, or SUM for a result that sums over it (a weight gradient: per
shard a partial sum).

The C++ side declares each target's signature beside its handler (the dtypes
of its operands and results, its attributes' names: `xla_ffi/*_ffi.h`), and
the extension reports them. `check` compares the two at import, so a target
changed on one side only is an import error rather than a wrong call.

FLOAT stands for the call's floating dtype, one of `SUPPORTED_DTYPES`; index
arrays are int32, a max pool's taps int8. A target is built for the dtypes
its `dtypes` lists, each registered under its own name (`name_for`): the
sparse layers' for float32 and bfloat16; the dense convolution's and the
norm-pool backward's for float32, which their ops check before calling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional, Union

FLOAT = "float"
INT32 = "int32"
INT8 = "int8"
#: The floating dtypes the ops take: float32, and bfloat16 (products summed in float32).
SUPPORTED_DTYPES = ("float32", "bfloat16")
#: Each dtype's suffix on the name a target is registered under (float32's is none).
_SUFFIXES = {"float32": "", "bfloat16": "_bf16"}
#: A result that sums over the batch (a weight gradient).
SUM = "sum"
Dim = Union[int, str, None]


@dataclasses.dataclass(frozen=True)
class Array:
    """One operand or result: its name, dtype (FLOAT or INT32) and batch dim."""

    name: str
    dtype: str
    batch: Dim = None


@dataclasses.dataclass(frozen=True)
class Target:
    """One FFI target: the name it is registered under and its contract."""

    name: str
    operands: tuple[Array, ...]
    results: tuple[Array, ...]
    attrs: tuple[str, ...] = ()
    #: The floating dtypes the extension builds it for.
    dtypes: tuple[str, ...] = ("float32",)

    def name_for(self, dtype: str) -> str:
        """The name the target is registered under for `dtype` (one of `dtypes`)."""
        return self.name + _SUFFIXES[dtype]

    @property
    def batch_dims(self) -> tuple[tuple[Dim, ...], tuple[Dim, ...]]:
        """(operand dims, result dims): where each holds the batch (see the module doc)."""
        return tuple(a.batch for a in self.operands), tuple(r.batch for r in self.results)

    def result_dtypes(self, dtype: str) -> tuple[str, ...]:
        """The results' dtypes for a call whose floating dtype is `dtype`."""
        return tuple(dtype if r.dtype == FLOAT else r.dtype for r in self.results)


def _indices(*names: str) -> tuple[Array, ...]:
    return tuple(Array(n, INT32) for n in names)


PATTERN = _indices("indptr", "indices")
BOTH_PATTERNS = PATTERN + _indices("t_indptr", "t_indices", "t_perm")
VALUES = Array("values", FLOAT)

# -- the linear layer: x, y [B, features], x^T [in, B]; float32 and bfloat16 -------
BOTH_DTYPES = ("float32", "bfloat16")
LINEAR_FORWARD = Target("sparseprop_linear_forward",
                        (Array("x", FLOAT, 0), VALUES, *PATTERN), (Array("y", FLOAT, 0),),
                        dtypes=BOTH_DTYPES)
LINEAR_FORWARD_AND_XT = Target(
    "sparseprop_linear_forward_and_xt", (Array("x", FLOAT, 0), VALUES, *PATTERN),
    (Array("y", FLOAT, 0), Array("xt", FLOAT, 1)), dtypes=BOTH_DTYPES)
LINEAR_BACKWARD = Target(
    "sparseprop_linear_backward",
    (Array("dy", FLOAT, 0), Array("xt", FLOAT, 1), VALUES, *BOTH_PATTERNS),
    (Array("dx", FLOAT, 0), Array("dvalues", FLOAT, SUM)), dtypes=BOTH_DTYPES)
LINEAR_INPUT_GRAD = Target("sparseprop_linear_input_grad",
                           (Array("dy", FLOAT, 0), VALUES, *BOTH_PATTERNS),
                           (Array("dx", FLOAT, 0),), dtypes=BOTH_DTYPES)
LINEAR_WEIGHT_GRAD = Target("sparseprop_linear_weight_grad",
                            (Array("dy", FLOAT, 0), Array("xt", FLOAT, 1), *PATTERN),
                            (Array("dvalues", FLOAT, SUM),), dtypes=BOTH_DTYPES)

# -- the feature-major linear layer: x, y [G, features, n], a batch of G x n ------
LINEAR_FEATURE_MAJOR_FORWARD = Target(
    "sparseprop_linear_feature_major_forward", (Array("x", FLOAT, 0), VALUES, *PATTERN),
    (Array("y", FLOAT, 0),), dtypes=BOTH_DTYPES)
LINEAR_FEATURE_MAJOR_BACKWARD = Target(
    "sparseprop_linear_feature_major_backward",
    (Array("dy", FLOAT, 0), Array("x", FLOAT, 0), VALUES, *BOTH_PATTERNS),
    (Array("dx", FLOAT, 0), Array("dvalues", FLOAT, SUM)), dtypes=BOTH_DTYPES)
LINEAR_FEATURE_MAJOR_INPUT_GRAD = Target(
    "sparseprop_linear_feature_major_input_grad", (Array("dy", FLOAT, 0), VALUES, *BOTH_PATTERNS),
    (Array("dx", FLOAT, 0),), dtypes=BOTH_DTYPES)
LINEAR_FEATURE_MAJOR_WEIGHT_GRAD = Target(
    "sparseprop_linear_feature_major_weight_grad",
    (Array("dy", FLOAT, 0), Array("x", FLOAT, 0), *PATTERN), (Array("dvalues", FLOAT, SUM),),
    dtypes=BOTH_DTYPES)

# -- the convolution: NHWC activations, one pair of targets per variant ------------
CONV_ATTRS = ("stride", "kh", "kw", "pad_top", "pad_bottom", "pad_left", "pad_right")


def _conv_forward(variant: str) -> Target:
    return Target(f"sparseprop_conv_{variant}_forward", (Array("x", FLOAT, 0), VALUES, *PATTERN),
                  (Array("y", FLOAT, 0),), CONV_ATTRS, BOTH_DTYPES)


def _conv_backward(variant: str) -> Target:
    return Target(f"sparseprop_conv_{variant}_backward",
                  (Array("x", FLOAT, 0), Array("dy", FLOAT, 0), VALUES, *BOTH_PATTERNS),
                  (Array("dx", FLOAT, 0), Array("dvalues", FLOAT, SUM)), CONV_ATTRS,
                  BOTH_DTYPES)


#: The convolution variants (which dims the SIMD lanes run over; see conv_variants.py).
CONV_VARIANTS = ("batch", "width")
CONV_FORWARD = {v: _conv_forward(v) for v in CONV_VARIANTS}
CONV_BACKWARD = {v: _conv_backward(v) for v in CONV_VARIANTS}

# -- the dense 2-D convolution: x (padded), y and dy NHWC, the kernel HWIO -----------
DENSE_CONV_FORWARD = Target(
    "sparseprop_dense_conv_forward", (Array("x", FLOAT, 0), Array("kernel", FLOAT)),
    (Array("y", FLOAT, 0),), ("stride_h", "stride_w"))
DENSE_CONV_WEIGHT_GRAD = Target(
    "sparseprop_dense_conv_weight_grad", (Array("x", FLOAT, 0), Array("dy", FLOAT, 0)),
    (Array("dkernel", FLOAT, SUM),), ("stride_h", "stride_w"))

# -- the backward of BatchNorm, ReLU and max pool: NHWC, taps int8 -------------------
NORM_POOL_ATTRS = ("window_h", "window_w", "stride_h", "stride_w", "pad_top", "pad_left")
NORM_POOL_GRAD_SUMS = Target(
    "sparseprop_norm_pool_grad_sums",
    (Array("dpool", FLOAT, 0), Array("pooled", FLOAT, 0), Array("taps", INT8, 0),
     Array("x", FLOAT, 0), Array("shift", FLOAT)),
    (Array("g", FLOAT, 0), Array("sum_g", FLOAT, SUM), Array("sum_gx", FLOAT, SUM)),
    NORM_POOL_ATTRS)
NORM_POOL_INPUT_GRAD = Target(
    "sparseprop_norm_pool_input_grad",
    (Array("g", FLOAT, 0), Array("taps", INT8, 0), Array("x", FLOAT, 0), Array("shift", FLOAT),
     Array("a", FLOAT), Array("b", FLOAT), Array("d", FLOAT)),
    (Array("dx", FLOAT, 0),), NORM_POOL_ATTRS)

ALL: tuple[Target, ...] = (LINEAR_FORWARD, LINEAR_FORWARD_AND_XT, LINEAR_BACKWARD,
                           LINEAR_INPUT_GRAD, LINEAR_WEIGHT_GRAD, LINEAR_FEATURE_MAJOR_FORWARD,
                           LINEAR_FEATURE_MAJOR_BACKWARD, LINEAR_FEATURE_MAJOR_INPUT_GRAD,
                           LINEAR_FEATURE_MAJOR_WEIGHT_GRAD,
                           *CONV_FORWARD.values(), *CONV_BACKWARD.values(), DENSE_CONV_FORWARD,
                           DENSE_CONV_WEIGHT_GRAD, NORM_POOL_GRAD_SUMS, NORM_POOL_INPUT_GRAD)


def _disagreement(target: Target, dtype: str, reported: Mapping) -> Optional[str]:
    for kind, ours in (("operands", target.operands), ("results", target.results)):
        theirs = tuple(reported[kind])
        mine = tuple(dtype if a.dtype == FLOAT else a.dtype for a in ours)
        if mine != theirs:
            return (f"{kind} {[a.name for a in ours]} are declared {list(mine)} here, "
                    f"{list(theirs)} in the extension")
    if tuple(reported["attrs"]) != target.attrs:
        return (f"attributes are declared {list(target.attrs)} here, "
                f"{list(reported['attrs'])} in the extension")
    return None


def check(reported: Mapping[str, Mapping]) -> None:
    """Raises ImportError unless `reported` (the extension's targets) matches ALL."""
    declared = {t.name_for(d): (t, d) for t in ALL for d in t.dtypes}
    problems = [f"{name}: registered by the extension, not declared in _targets.py"
                for name in sorted(set(reported) - set(declared))]
    problems += [f"{name}: declared in _targets.py, not registered by the extension"
                 for name in sorted(set(declared) - set(reported))]
    for name in sorted(set(declared) & set(reported)):
        problem = _disagreement(*declared[name], reported[name])
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        raise ImportError("sparseprop_jax: the extension's FFI targets disagree with their "
                          "declarations (rebuild the extension?):\n  " + "\n  ".join(problems))
