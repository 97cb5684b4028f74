"""Thread scaling: sparse f+b time on 1 thread / on 2 threads, from two result files.

    python benchmarks/thread_scaling.py        # the committed benchmarks/results/ files
    python benchmarks/thread_scaling.py /tmp/linear-1.json /tmp/linear-2.json

Reads JSON results of `linear.py` and/or `conv2d.py` run with `--threads 1`
and `--threads 2` (the thread count is read from each file, so the order of
the files does not matter), and prints per shape / layer at 95% sparsity (or
`--sparsity`): the sparse f+b median on 1 thread and on 2, their ratio (the
speedup from the second thread), the same ratio for dense XLA for comparison,
and the target (at least 1.7x at 95% on the three big linear shapes and on each
of the seven conv layers at batch 32) with whether it is met. For conv2d the
sparse time is variant="auto"'s, and a last row gives the geometric mean over
the layers (no target). With no files given it reads
benchmarks/results/{linear,conv2d}-1thread.json and {linear,conv2d}.json,
those that exist. Does not import jax.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _targets  # noqa: E402
from _timing import TablePrinter  # noqa: E402

# benchmark -> (row key function, sparse f+b ms field, dense f+b ms field, label)
_FIELDS = {
    "linear": (lambda r: (r["batch"], r["in_features"], r["out_features"], r["sparsity"]),
               "sparse_fwdbwd_ms", "dense_fwdbwd_ms",
               lambda r: f"{r['batch']}x{r['in_features']}->{r['out_features']}"),
    "conv2d": (lambda r: (r["layer"], r["batch"], r["sparsity"]),
               "auto_fb_ms", "dense_fb_ms", lambda r: r["layer"]),
}


def _threads(payload: dict) -> int:
    return payload.get("threads") or payload["machine"].get("usable_cpus") or 0


def compare(benchmark: str, one: tuple[str, dict], two: tuple[str, dict],
            sparsity: float) -> list[dict]:
    """Prints the 1-thread / 2-thread table of one benchmark; returns its rows."""
    key, sparse_field, dense_field, label = _FIELDS[benchmark]
    (path1, p1), (path2, p2) = one, two
    by_key = {key(r): r for r in p1["results"]}
    for field in ("cpu_model", "simd_path", "jax"):
        if p1["machine"].get(field) != p2["machine"].get(field):
            print(f"# warning: the files differ in {field}: {p1['machine'].get(field)} vs "
                  f"{p2['machine'].get(field)}")
    print(f"# {benchmark}: sparse f+b median at sparsity {sparsity:g}, 1 thread ({path1}) vs "
          f"2 threads ({path2}); ratio = 1-thread ms / 2-thread ms")
    table = TablePrinter([("shape" if benchmark == "linear" else "layer", 16, "s"),
                          ("sparsity", 8, ".2f"), ("1 thread ms", 11, ".3f"),
                          ("2 threads ms", 12, ".3f"), ("ratio", 5, ".2f"),
                          ("dense ratio", 11, ".2f"), ("target", 6, "s"), ("met", 3, "s")])
    table.header()
    rows = []
    for r2 in p2["results"]:
        if not math.isclose(r2["sparsity"], sparsity, abs_tol=1e-9):
            continue
        r1 = by_key.get(key(r2))
        if r1 is None:
            continue
        ratio = r1[sparse_field] / r2[sparse_field]
        dense_ratio = r1[dense_field] / r2[dense_field]
        target, met_cell, met = _targets.check(_targets.thread_scaling_target(benchmark, r2),
                                               ratio)
        table.row([label(r2), r2["sparsity"], r1[sparse_field], r2[sparse_field], ratio,
                   dense_ratio, target, met_cell])
        rows.append({"name": label(r2), "ratio": ratio, "dense_ratio": dense_ratio, "met": met})
    if not rows:
        print(f"# no shape / layer at sparsity {sparsity:g} in both files")
    elif benchmark == "conv2d":
        table.row(["geomean", sparsity, None, None, _targets.geomean(r["ratio"] for r in rows),
                   _targets.geomean(r["dense_ratio"] for r in rows), "-", "-"])
    checked = [r["met"] for r in rows if r["met"] is not None]
    if checked:
        print(f"# thread scaling targets: {sum(checked)}/{len(checked)} met")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*",
                        help="result files of linear.py / conv2d.py, one on 1 thread and one "
                             "on 2 per benchmark (default: the files in benchmarks/results/)")
    parser.add_argument("--sparsity", type=float, default=_targets.THREAD_SCALING_SPARSITY,
                        help="the sparsity to compare (targets are at 0.95)")
    args = parser.parse_args(argv)

    paths = args.json
    if not paths:
        paths = [os.path.join(_targets.RESULTS_DIR, f"{b}{suffix}.json")
                 for b in ("linear", "conv2d") for suffix in ("-1thread", "")]
        paths = [p for p in paths if os.path.exists(p)]
    files = defaultdict(dict)  # benchmark -> threads -> (path, payload)
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        benchmark = payload.get("benchmark")
        if benchmark not in _FIELDS:
            parser.error(f"{path}: not a linear.py or conv2d.py result")
        threads = _threads(payload)
        if threads in files[benchmark]:
            parser.error(f"{path} and {files[benchmark][threads][0]}: both {benchmark} on "
                         f"{threads} threads")
        files[benchmark][threads] = (path, payload)

    compared = 0
    for benchmark, by_threads in files.items():
        if 1 not in by_threads or 2 not in by_threads:
            have = ", ".join(f"{p} ({t} threads)" for t, (p, _) in sorted(by_threads.items()))
            print(f"# {benchmark}: need one result on 1 thread and one on 2, have {have}; "
                  f"run e.g. python benchmarks/{benchmark}.py --threads 1")
            continue
        if compared:
            print()
        compare(benchmark, by_threads[1], by_threads[2], args.sparsity)
        compared += 1
    if not compared:
        parser.error("no benchmark with results on both 1 and 2 threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
