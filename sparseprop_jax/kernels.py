"""Which kernel instruction set runs: ask, list, force.

The best path the CPU supports is chosen when the extension loads; the
environment variable `SPARSEPROP_JAX_SIMD` (scalar, avx2, avx512 or auto)
overrides it at import. Switching takes effect for every call that runs later,
compiled functions included, because the handlers dispatch at run time. JAX
dispatches asynchronously: a computation started before a switch may still
run after it, so block on its results (`jax.block_until_ready`) before
switching again.
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
    """Context manager that runs its body on the given kernel path.

    Block on the body's results (`jax.block_until_ready`) inside it: a
    computation still queued when the body ends runs on the restored path.
    """
    previous = simd_path()
    set_simd_path(name)
    try:
        yield
    finally:
        set_simd_path(previous)


def tasks_per_call() -> int:
    """Tasks each kernel call is split into; 0 means one per XLA pool thread."""
    return _ext.tasks_per_call()


def set_tasks_per_call(n: int) -> None:
    """Splits every kernel call into exactly `n` tasks on XLA's pool (0: automatic).

    `n=1` runs each call on one thread, which is how the benchmarks measure
    single-thread speed. Results do not depend on `n`. Like `set_simd_path`,
    it applies to the calls that run after it (dispatch is asynchronous).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"set_tasks_per_call: n must be a non-negative int, got {n!r}")
    _ext.set_tasks_per_call(n)
