"""Argument checks shared by the ops, the weight type and the layers.

Every check raises before anything reaches C++, with a message that names the
argument and what was expected.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sparseprop_jax._targets import SUPPORTED_DTYPES

#: The dtype the package makes arrays in (parameters, random test data): the
#: first of the dtypes its compiled routines support.
DEFAULT_DTYPE = jnp.dtype(SUPPORTED_DTYPES[0])


def as_array(where: str, name: str, value: Any) -> Any:
    """`value` as a JAX array, or a TypeError naming the argument if it is not array-like."""
    if value is None:
        raise TypeError(f"{where}: {name} must be an array, got None")
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: {name} must be an array, got {type(value).__name__}: "
                        f"{err}") from None


def int32_indices(where: str, name: str, array: Any) -> np.ndarray:
    """A concrete integer array as int32, or an error if a value does not fit (never wraps).

    Pattern arrays must be int32 (the compiled routines read int32); wider integers, as
    a checkpoint may hold them, are converted only where every value fits.
    """
    array = np.asarray(array)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{where}: {name} must hold integers, got {array.dtype}")
    info = np.iinfo(np.int32)
    if array.size and (array.min() < info.min or array.max() > info.max):
        bad = array.min() if array.min() < info.min else array.max()
        raise ValueError(f"{where}: {name} holds {bad}, which does not fit the int32 a pattern "
                         "index must be")
    return array.astype(np.int32)


def is_supported_dtype(dtype: Any) -> bool:
    """Whether the compiled routines take arrays of `dtype`."""
    return jnp.dtype(dtype).name in SUPPORTED_DTYPES


def check_dtype(where: str, name: str, array: Any) -> None:
    """Raises TypeError unless `array`'s dtype is supported, naming the supported dtypes."""
    dtype = jnp.result_type(array)
    if not is_supported_dtype(dtype):
        raise TypeError(
            f"{where}: {name} must be {' or '.join(SUPPORTED_DTYPES)} (supported dtypes: "
            f"{', '.join(SUPPORTED_DTYPES)}), got {dtype}"
        )


def promote_to_common(*arrays: Any) -> tuple[Any, ...]:
    """`arrays` (of supported dtypes) cast to their common dtype, as `jnp.matmul` promotes:
    bfloat16 with float32 computes in float32. The casts are outside the ops'
    custom_vjp, so each gradient comes back in its own array's dtype."""
    dtype = jnp.result_type(*arrays)
    return tuple(a.astype(dtype) for a in arrays)


def check_shape(where: str, name: str, array: Any, expected: tuple[int, ...]) -> None:
    """Raises ValueError unless `array` has exactly the shape `expected`."""
    shape = tuple(np.shape(array))
    if shape != tuple(expected):
        raise ValueError(f"{where}: {name} must have shape {tuple(expected)}, got {shape}")


def check_sparsity(where: str, sparsity: Any) -> float:
    """Returns `sparsity` as a float, or raises ValueError if it is outside [0, 1]."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: sparsity must be a number in [0, 1], got {sparsity!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: sparsity must be in [0, 1], got {value}")
    return value


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, not for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_axis(where: str, name: str, axis: Any, ndim: int) -> int:
    """`axis` of an array with `ndim` dims as an index in [0, ndim), or an error naming it."""
    if not is_int(axis):
        raise TypeError(f"{where}: {name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{where}: {name}={axis} is out of range for an input with {ndim} "
                         f"dims")
    return int(axis) % ndim


def check_features(where: str, name: str, value: Any) -> int:
    """Returns `value` as a positive int, or raises ValueError."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def concrete(where: str, name: str, array: Any) -> np.ndarray:
    """Returns `array` as a NumPy array, or explains that it must not be traced.

    Patterns are built eagerly: their number of nonzeros fixes array shapes.
    """
    try:
        return np.asarray(array)
    except Exception as err:  # jax raises a TracerArrayConversionError subclass
        raise TypeError(
            f"{where}: {name} must be a concrete array (sparse patterns are built "
            "outside jit/grad/vmap, because the number of nonzeros fixes the shapes)"
        ) from err
