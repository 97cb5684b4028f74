"""The run-time switches of the C++ routines: SIMD path, tasks per call, cached memory.

The routines are compiled once per instruction set (SIMD path); the paths
this build has are the ones `known_simd_paths()` lists, read from the
extension's dispatch table. The best path the CPU supports is chosen when the
extension loads; the environment variable `SPARSEPROP_JAX_SIMD` (one of those
names, or auto) overrides it at import. Switching takes effect for every call that runs later,
compiled functions included, because the handlers dispatch at run time. JAX
dispatches asynchronously: a computation started before a switch may still
run after it, so block on its results (`jax.block_until_ready`) before
switching again.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from sparseprop_jax._checks import is_int
from sparseprop_jax._ffi import _ext


def simd_path() -> str:
    """The active SIMD path, one of the paths `known_simd_paths()` lists."""
    return _ext.simd_path()


def known_simd_paths() -> list[str]:
    """Every SIMD path this build has, best first, whether this CPU runs it or not."""
    return list(_ext.known_simd_paths())


def supported_simd_paths() -> list[str]:
    """The paths this CPU can run, best first ("scalar" always included)."""
    return list(_ext.supported_simd_paths())


def distinct_simd_paths(dtype: str = "float32") -> list[str]:
    """The supported paths whose routines for `dtype` ("float32" or "bfloat16") are their
    own, best first: running on each of them runs every distinct implementation.

    avx512_bf16 differs from avx512 only in its bfloat16 routines, so it is
    listed for "bfloat16" alone. Tests that check every path use this.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"distinct_simd_paths: dtype must be 'float32' or 'bfloat16', got "
                         f"{dtype!r}")
    return list(_ext.distinct_simd_paths(dtype))


def set_simd_path(name: str) -> None:
    """Forces a SIMD path by name, or "auto" for the best supported one.

    Raises:
      ValueError: `name` is unknown or the CPU cannot run it.
    """
    if name != "auto" and name not in supported_simd_paths():
        raise ValueError(f"set_simd_path: name must be 'auto' or one of "
                         f"{supported_simd_paths()} on this CPU, got {name!r}")
    _ext.set_simd_path(name)


@contextlib.contextmanager
def use_simd_path(name: str) -> Iterator[None]:
    """Context manager that runs its body on the given SIMD path.

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
    """Tasks each custom call is split into; 0 means one per XLA pool thread."""
    return _ext.tasks_per_call()


#: The most tasks a call may be split into (the extension counts them in a C int).
MAX_TASKS_PER_CALL = 2**31 - 1


def set_tasks_per_call(n: int) -> None:
    """Splits every custom call into exactly `n` tasks on XLA's pool (0: automatic).

    `n=1` runs each call on one thread, which is how the benchmarks measure
    single-thread speed. Results do not depend on `n`. Like `set_simd_path`,
    it applies to the calls that run after it (dispatch is asynchronous).

    Raises:
      ValueError: `n` is not an int in [0, MAX_TASKS_PER_CALL].
    """
    if not is_int(n) or not 0 <= n <= MAX_TASKS_PER_CALL:
        raise ValueError(f"set_tasks_per_call: n must be an int in [0, {MAX_TASKS_PER_CALL}], "
                         f"got {n!r}")
    _ext.set_tasks_per_call(int(n))


def cached_memory_bytes() -> int:
    """Bytes of scratch memory the C++ handlers keep between calls for reuse.

    The handlers lay activations out in scratch buffers; freeing and mapping
    them anew on every call would cost more than the sparse products. Kept
    buffers are bounded (512 MiB at most, and a buffer no call has reused for
    10 seconds is freed at the next call); `release_cached_memory` frees them
    now.
    """
    return _ext.cached_scratch_bytes()


def release_cached_memory() -> None:
    """Frees the scratch memory the C++ handlers keep for reuse (see `cached_memory_bytes`).

    Buffers in use by a running call are freed when it ends. Later calls
    allocate again, so this is for the end of a phase of work (after
    training, before a long evaluation with other shapes), not for every step.
    """
    _ext.release_scratch()
