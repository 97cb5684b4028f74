"""`--threads N`: run a benchmark on N CPUs. Import and call before jax.

XLA's CPU client sizes its thread pool (which runs dense XLA ops and the
sparse kernels' tasks alike) from the process's CPU affinity when it starts,
so the affinity must be set before jax is imported. The benchmarks call
`limit_from_argv()` at the top of the script, before `import jax`, and check
with `check()` after parsing their arguments (the same option, read by
argparse) that the restriction took effect.

This module must not import jax.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def available() -> list[int]:
    """The CPUs this process may run on, in ascending order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def usable() -> int:
    """How many CPUs this process may run on (what XLA sizes its thread pool from)."""
    return len(available())


def _threads_in(argv: Sequence[str]) -> Optional[int]:
    """The value of `--threads N` / `--threads=N` in `argv`; None if absent or not a number.

    An invalid value is left for argparse to report.
    """
    value = None
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def limit_from_argv(argv: Optional[Sequence[str]] = None) -> Optional[int]:
    """Restricts this process to the first N of its CPUs if `argv` has `--threads N`.

    Must run before jax is imported. Returns N, or None if not given (or not
    applicable: the value is invalid or more than the CPUs available, which
    `check` then reports).
    """
    if "jax" in sys.modules:
        raise RuntimeError("_threads.limit_from_argv must run before jax is imported")
    n = _threads_in(sys.argv[1:] if argv is None else argv)
    cpus = available()
    if n is None or not 1 <= n <= len(cpus):
        return None
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
    return n


def check(requested: Optional[int]) -> Optional[str]:
    """An error message if `--threads` was asked but the process is not on that many CPUs."""
    if requested is None:
        return None
    if requested < 1:
        return f"--threads must be at least 1, got {requested}"
    have = usable()
    if have != requested:
        more = (" (more than this process may use)" if requested > have else
                " (--threads is applied before jax is imported, so it must be spelled out "
                "in full on the script's command line)")
        return f"--threads {requested}: the process runs on {have} CPUs{more}"
    return None
