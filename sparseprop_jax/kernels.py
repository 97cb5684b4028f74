"""Which kernel instruction set runs: ask, list, force.

The best path the CPU supports is chosen when the extension loads; the
environment variable `SPARSEPROP_JAX_SIMD` (scalar, avx2, avx512 or auto)
overrides it at import. Switching takes effect for every later call, compiled
functions included, because the handlers dispatch at run time.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from sparseprop_jax._ffi import _ext


def simd_path() -> str:
    """The active kernel path: "avx512", "avx2" or "scalar"."""
    return _ext.simd_path()


def supported_simd_paths() -> list[str]:
    """The paths this CPU can run, best first ("scalar" always included)."""
    return list(_ext.supported_simd_paths())


def set_simd_path(name: str) -> None:
    """Forces a kernel path by name, or "auto" for the best supported one.

    Raises:
      ValueError: `name` is unknown or the CPU cannot run it.
    """
    if name != "auto" and name not in supported_simd_paths():
        raise ValueError(f"set_simd_path: name must be 'auto' or one of "
                         f"{supported_simd_paths()} on this CPU, got {name!r}")
    _ext.set_simd_path(name)


@contextlib.contextmanager
def use_simd_path(name: str) -> Iterator[None]:
    """Context manager that runs its body on the given kernel path."""
    previous = simd_path()
    set_simd_path(name)
    try:
        yield
    finally:
        set_simd_path(previous)
