"""Keeping freed memory in the process, so that training steps stop faulting it back in.

XLA's CPU runtime allocates a step's buffers with the C library's `malloc`
and frees them when the step ends. glibc serves large blocks by mapping fresh
pages from the kernel and unmaps them on `free`, so every step touches those
pages for the first time again: a page fault and a page of zeros per 4 KiB.
A 95%-sparse ResNet18 step at 128x128, batch 32, re-faults about 390 MB a
step that way (benchmarks/results/NOTES.md).

`keep_freed_memory()` tells glibc's `malloc` to keep what is freed for the
next allocation instead: large blocks come from the heap, which is never
trimmed, and all threads share one arena. After a few steps the heap covers
the working set and steps fault nothing. The price: the process keeps its
peak memory until it exits. `KEEP_FREED_MEMORY_TUNABLES` is the same as a
`GLIBC_TUNABLES` value, for a program that cannot call it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import warnings

# mallopt parameters, from glibc's <malloc.h>, with their tunable names.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = (("arena_max", _M_ARENA_MAX, 1), ("mmap_max", _M_MMAP_MAX, 0),
             ("trim_threshold", _M_TRIM_THRESHOLD, 2**31 - 1))

#: The same settings as a value of the `GLIBC_TUNABLES` environment variable,
#: for a program run unchanged (glibc reads it when the process starts).
KEEP_FREED_MEMORY_TUNABLES = ":".join(f"glibc.malloc.{name}={value}"
                                      for name, _, value in _SETTINGS)


def _jax_has_started() -> bool:
    """Whether a JAX backend exists (its threads then already have their malloc arenas)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this query: assume not
        return False


def keep_freed_memory() -> bool:
    """Makes glibc's `malloc` keep freed memory for reuse, for the rest of the process.

    Call it at program start, before the first JAX computation: the threads
    XLA starts then share the one arena this sets up. Called later it changes
    nothing and warns. It changes how the whole process allocates, other
    libraries included, and memory once used is not returned to the system
    until the process exits.

    Returns:
      True where it took effect; False where it did not: the C library is not
      glibc, or JAX has already started (with a RuntimeWarning).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _jax_has_started():
        warnings.warn("keep_freed_memory() must run before the first JAX computation (XLA's "
                      "threads already allocate from arenas of their own); nothing was changed",
                      RuntimeWarning, stacklevel=2)
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return all(libc.mallopt(param, value) == 1 for _, param, value in _SETTINGS)
