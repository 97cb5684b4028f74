"""Shared helpers for the benchmarks: timing, tables and machine info.

Timing model: every case is a jitted function plus its arguments. A case is
compiled and warmed up first (`Case.warm`), which also estimates its run time;
`run_interleaved` then takes each case's samples in one merged, evenly spread
schedule, so slow drifts of the machine (another process, frequency changes)
hit all cases alike; `run_rounds` does that for several groups of cases in
rounds, so each group's samples also spread over the whole run. Each sample
is one call timed with `time.perf_counter` up to `jax.block_until_ready`.
Report medians; nothing here asserts on speed.

jax is imported lazily (when a case is made, or machine info is read), so the
scripts that only read results (plot.py, thread_scaling.py) can use the table
printer without loading jax, and `--threads` can be applied before jax starts.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence


class Case:
    """A function and its arguments, timed one call at a time."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any):
        import jax

        self._block_until_ready = jax.block_until_ready
        self.name = name
        self.fn = fn
        self.args = args
        self.compile_s: Optional[float] = None
        self.estimate_s: Optional[float] = None

    def call(self) -> float:
        """Runs once and returns the seconds it took, output ready."""
        start = time.perf_counter()
        self._block_until_ready(self.fn(*self.args))
        return time.perf_counter() - start

    def warm(self, warmup_time: float = 0.05, min_calls: int = 2) -> float:
        """Compiles (first call), then warms up; returns the estimated seconds per call.

        Only the first call is counted as compile time (it includes one run).
        """
        if self.compile_s is None:
            self.compile_s = self.call()
        times = []
        start = time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - start < warmup_time:
            times.append(self.call())
        self.estimate_s = statistics.median(times)
        return self.estimate_s


def repeats_for(estimate_s: float, min_time: float, min_repeats: int, max_repeats: int) -> int:
    """Samples to take so a measurement lasts about `min_time`, within the bounds."""
    wanted = math.ceil(min_time / max(estimate_s, 1e-9))
    return max(min_repeats, min(max_repeats, wanted))


def run_interleaved(cases: Sequence[Case], *, min_time: float = 0.5, min_repeats: int = 5,
                    max_repeats: int = 10000,
                    repeats: Optional[int] = None) -> dict[str, list[float]]:
    """Samples every case, interleaved; returns seconds per call, by case name.

    Each case gets `repeats` samples if given, else enough for about
    `min_time` seconds (at least `min_repeats`, at most `max_repeats`). The
    samples of all cases are spread evenly over one schedule: a case with n
    samples runs at fractions 0, 1/n, 2/n, ... of it. Cases are warmed first
    (compiling them if needed); the garbage collector is off while timing.
    """
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"run_interleaved: case names must be unique, got {names}")
    schedule = []
    for order, case in enumerate(cases):
        estimate = case.warm()
        n = repeats if repeats is not None else repeats_for(estimate, min_time, min_repeats,
                                                            max_repeats)
        schedule.extend(((k + 0.5 * order / len(cases)) / n, order) for k in range(n))
    schedule.sort()
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _, order in schedule:
            samples[names[order]].append(cases[order].call())
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def run_rounds(case_lists: Sequence[Sequence[Case]], *, rounds: int = 1, min_time: float = 0.5,
               min_repeats: int = 5, max_repeats: int = 10000) -> list[dict[str, list[float]]]:
    """Samples each list of cases interleaved (`run_interleaved`), list after list, in rounds.

    Returns each list's samples, by case name. Each of the `rounds` rounds runs
    every list once and takes 1/rounds of its samples (about min_time / rounds
    seconds, at least min_repeats / rounds samples), so a list's samples come
    from `rounds` moments spread over the whole run: a burst of load on the
    host that lasts about one list's measurement moves a part of its samples,
    not its median.
    """
    if rounds < 1:
        raise ValueError(f"run_rounds: rounds must be >= 1, got {rounds}")
    per_round = {"min_time": min_time / rounds, "min_repeats": -(-min_repeats // rounds),
                 "max_repeats": max(1, max_repeats // rounds)}
    merged: list[dict[str, list[float]]] = [{c.name: [] for c in cases} for cases in case_lists]
    for _ in range(rounds):
        for cases, into in zip(case_lists, merged):
            for name, samples in run_interleaved(cases, **per_round).items():
                into[name].extend(samples)
    return merged


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, quartiles (milliseconds) and count of samples in seconds."""
    ms = sorted(s * 1e3 for s in samples)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4)
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "p25_ms": q1, "p75_ms": q3,
            "n": len(ms)}


def median_ms(samples: Iterable[float]) -> float:
    return statistics.median(samples) * 1e3


# -- tables ------------------------------------------------------------------

class TablePrinter:
    """Prints a fixed-width table row by row (so long runs show progress).

    Columns are (header, width, format); text columns use format "s". Rows
    are right-aligned except the first column.
    """

    def __init__(self, columns: Sequence[tuple[str, int, str]], file=None):
        self.columns = [(h, max(w, len(h)), f) for h, w, f in columns]
        self.file = file if file is not None else sys.stdout

    def _line(self, cells: Sequence[str]) -> str:
        parts = []
        for i, (cell, (_, width, _)) in enumerate(zip(cells, self.columns)):
            parts.append(cell.ljust(width) if i == 0 else cell.rjust(width))
        return "  ".join(parts).rstrip()

    def header(self) -> None:
        print(self._line([h for h, _, _ in self.columns]), file=self.file)
        print(self._line(["-" * w for _, w, _ in self.columns]), file=self.file, flush=True)

    def row(self, values: Sequence[Any]) -> None:
        cells = []
        for value, (_, _, fmt) in zip(values, self.columns):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
            else:
                cells.append(format(value, fmt))
        print(self._line(cells), file=self.file, flush=True)


# -- machine info ------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        # The results folder is left out: the README's `| tee benchmarks/results/X.txt`
        # rewrites a tracked file there before the run reads this.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", ":(top,exclude)benchmarks/results"],
                               cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, kernel path, versions, date."""
    import jax
    import jaxlib
    import numpy as np

    import sparseprop_jax

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        # XLA's CPU thread pool (dense ops and the sparse kernels' tasks) has this many threads.
        "threads": usable,
        "simd_path": sparseprop_jax.simd_path(),
        "supported_simd_paths": sparseprop_jax.supported_simd_paths(),
        "tasks_per_call": sparseprop_jax.tasks_per_call(),
        "sparseprop_jax": sparseprop_jax.__version__,
        "git_commit": _git_commit(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax_devices": [str(d) for d in jax.devices()],
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "SPARSEPROP_JAX_SIMD",
                                           "OMP_NUM_THREADS") if k in os.environ},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_summary(info: dict[str, Any]) -> str:
    threads = info["usable_cpus"]
    return (f"{info['cpu_model']}, {threads}/{info['cpu_count']} cpus "
            f"({threads} thread{'' if threads == 1 else 's'}), "
            f"simd={info['simd_path']}, tasks_per_call={info['tasks_per_call']}, "
            f"jax {info['jax']} / jaxlib {info['jaxlib']}, {info['date']}")


# -- command line and output helpers -----------------------------------------

def parse_sparsities(text: str) -> tuple[float, ...]:
    """Comma-separated sparsities in [0, 1), for argparse `type=`."""
    import argparse

    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsities must be comma-separated numbers, "
                                         f"got {text!r}") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie in [0, 1), got {text!r}")
    return values


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON, creating the directory if needed."""
    import json

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def custom_call_targets(jitted: Callable[..., Any], *args: Any) -> list[str]:
    """The custom-call targets left in the compiled HLO of `jitted(*args)`, in order.

    Shows which FFI kernels a jitted function really runs after XLA's dead-code
    elimination (e.g. `grad` of a loss linear in the output drops the forward).
    """
    import re

    text = jitted.lower(*args).compile().as_text()
    return re.findall(r'custom_call_target="([^"]+)"', text)


def comma_list(parse_item):
    """An argparse `type=` for comma-separated items, each read by `parse_item`."""
    return lambda text: tuple(parse_item(s) for s in text.split(",") if s.strip())


def add_common_arguments(parser, quick_help: str, default_sparsities) -> None:
    """The options both benchmarks take: sparsities, sampling, output, SIMD and task switches."""
    # The --simd names come from the extension's dispatch table (imported here:
    # jax loads with it, and this module imports jax lazily).
    from sparseprop_jax.runtime import known_simd_paths

    parser.add_argument("--sparsities", type=parse_sparsities, default=None,
                        help="comma-separated sparsities (default: "
                             + ",".join(map(str, default_sparsities)) + ")")
    parser.add_argument("--repeats", type=int, default=None,
                        help="minimum samples per measurement (default 5; 3 with --quick)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="target seconds per measurement (default 0.4; 0.02 with --quick)")
    parser.add_argument("--max-repeats", type=int, default=10000,
                        help="maximum samples per measurement")
    parser.add_argument("--rounds", type=int, default=None,
                        help="take each measurement's samples in this many rounds over all "
                             "sparsities of a shape or layer, so that a burst of load on the "
                             "host moves a part of them, not the median (default 3; 2 with "
                             "--quick)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the results and machine info to this JSON file (default: "
                             "benchmarks/results/<name>.json, with a -1thread / -Nthreads "
                             "suffix unless on 2 threads, for a run of the default "
                             "configuration only)")
    parser.add_argument("--no-json", action="store_true",
                        help="write no JSON file, not even for a default run")
    parser.add_argument("--plot", action="store_true",
                        help="also write a PNG plot next to the JSON file (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None,
                        help="run on this many CPUs (sets the CPU affinity before jax is "
                             "imported; XLA sizes its thread pool from it; default: all "
                             "usable CPUs); targets are for 2")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--simd", choices=("auto", *known_simd_paths()), default=None,
                        help="force the SIMD path (default: as loaded)")
    parser.add_argument("--tasks-per-call", type=int, default=None,
                        help="split each custom call into N tasks, 1 = single thread "
                             "(default: as loaded, 0 = automatic)")
    parser.add_argument("--seed", type=int, default=0)


def sampling(parser, args) -> tuple[int, float, int]:
    """(repeats, min_time, rounds): the options of `add_common_arguments` or their defaults.

    Exits through `parser.error` where they are out of range.
    """
    quick = args.quick
    repeats = args.repeats if args.repeats is not None else (3 if quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.02 if quick else 0.4)
    rounds = args.rounds if args.rounds is not None else (2 if quick else 3)
    if repeats < 1 or args.max_repeats < repeats or min_time < 0 or rounds < 1:
        parser.error("need 1 <= --repeats <= --max-repeats, --min-time >= 0, --rounds >= 1")
    return repeats, min_time, rounds


def apply_kernel_options(args) -> None:
    """`--simd` and `--tasks-per-call`, if given."""
    import sparseprop_jax

    if args.simd is not None:
        sparseprop_jax.set_simd_path(args.simd)
    if args.tasks_per_call is not None:
        sparseprop_jax.set_tasks_per_call(args.tasks_per_call)


def prepare_run(parser, args, benchmark: str, default_run: bool) -> tuple[int, Optional[str]]:
    """Checks `--threads` and `--plot`, applies `--simd` / `--tasks-per-call`.

    Returns the number of threads the run uses (the CPUs the process may run
    on) and where to write its JSON results (None: nowhere).
    """
    import _threads

    error = _threads.check(args.threads)
    if error:
        parser.error(error)
    threads = _threads.usable()
    path = json_path(args, benchmark, default_run, threads)
    check_plot_option(parser, args, path)
    apply_kernel_options(args)
    return threads, path


def json_path(args, benchmark: str, default_run: bool, threads: int) -> Optional[str]:
    """Where to write the JSON results: `--json`, else the committed file for a default run.

    A default run is one of the default configuration (not `--quick`, no
    option changing what is measured), so quick and partial runs never
    overwrite the committed results unless `--json` says so.
    """
    import _targets

    if args.no_json:
        return None
    if args.json:
        return args.json
    return _targets.default_json_path(benchmark, threads) if default_run else None


def finish(args, path: Optional[str], payload: dict) -> None:
    """Writes the JSON results to `path` (if any) and, with `--plot`, the plot next to it."""
    if path is None:
        return
    write_json(path, payload)
    print(f"# wrote {path}", flush=True)
    if args.plot:
        import plot

        print(f"# wrote {plot.plot_file(path)}", flush=True)


def check_plot_option(parser, args, path: Optional[str]) -> None:
    """`--plot` needs a JSON file to write the plot next to, and matplotlib."""
    if not args.plot:
        return
    if path is None:
        parser.error("--plot needs a JSON output: give --json PATH (quick and partial runs "
                     "write none by default)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("--plot needs matplotlib: pip install -e '.[bench]'")
