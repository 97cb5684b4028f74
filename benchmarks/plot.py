"""Plots speedup vs sparsity from the benchmarks' JSON results, one PNG per file.

    python benchmarks/plot.py                          # every benchmarks/results/*.json
    python benchmarks/plot.py /tmp/linear.json --out /tmp/linear.png

For `linear.py` results: per shape, the f+b speedup over dense XLA (solid),
the forward speedup (dashed) and, in results that have it, the traffic
floor's speedup (thin dotted: the bound on the f+b speedup). For `conv2d.py`
results: per layer, the variant="auto" f+b speedup (solid) and the best forward
speedup (dashed), plus their geometric means over the layers (black, thick).
Both have the ideal 1/density line (dotted), the dense parity line (1x) and the
f+b targets (stars, for 2 threads). The y axis is logarithmic. Each PNG is
written next to its JSON file (same name, .png) unless `--out` is given.

Needs matplotlib (`pip install -e '.[bench]'`); uses the Agg backend, no display.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _targets  # noqa: E402


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _threads(payload: dict) -> int:
    return payload.get("threads") or payload["machine"].get("usable_cpus") or 0


def _title(what: str, payload: dict) -> str:
    m = payload["machine"]
    threads = _threads(payload)
    quick = ", --quick" if payload.get("config", {}).get("quick") else ""
    return (f"{what}\n{m['cpu_model']}, {threads} thread{'' if threads == 1 else 's'}, "
            f"simd={m['simd_path']}, jax {m['jax']}, {m['date'][:10]}{quick}")


def _ideal(ax, rows: list[dict]) -> None:
    """The 1/density line over the sparsities present (mean density per sparsity)."""
    by_sparsity = defaultdict(list)
    for r in rows:
        by_sparsity[r["sparsity"]].append(r["density"])
    xs = sorted(by_sparsity)
    ax.plot(xs, [len(by_sparsity[s]) / sum(by_sparsity[s]) for s in xs], ":", color="0.3",
            marker=".", label="ideal: 1 / density")


def _targets_points(ax, points: list[tuple[float, float]], label: str, color: str) -> None:
    if points:
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, linestyle="none", marker="*", markersize=12, color=color, label=label,
                zorder=5)


def _finish(plt, fig, ax, out: str) -> str:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axhline(1.0, color="0.6", linewidth=1, label="dense XLA (1x)")
    ax.set_xlabel("sparsity")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_linear(payload: dict, out: str) -> str:
    plt = _pyplot()
    rows = payload["results"]
    by_shape = defaultdict(list)
    for r in rows:
        by_shape[(r["batch"], r["in_features"], r["out_features"])].append(r)
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    has_floor = all("floor_fwdbwd_speedup" in r for r in rows)  # results since the floor
    big, small = [], []
    for i, (shape, shape_rows) in enumerate(by_shape.items()):
        shape_rows.sort(key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in shape_rows]
        color = colors[i % len(colors)]
        label = f"{shape[0]}x{shape[1]}->{shape[2]}"
        ax.plot(xs, [r["fwdbwd_speedup"] for r in shape_rows], "-o", color=color,
                label=f"{label} f+b")
        ax.plot(xs, [r["fwd_speedup"] for r in shape_rows], "--x", color=color, alpha=0.7,
                label=f"{label} fwd")
        if has_floor:
            ax.plot(xs, [r["floor_fwdbwd_speedup"] for r in shape_rows], ":", color=color,
                    linewidth=1)
        for s in xs:
            target = _targets.linear_fb_target(shape, s)
            if target is not None and target.value > 1:
                (big if shape in _targets.LINEAR_BIG_SHAPES else small).append((s, target.value))
    if has_floor:  # one legend entry for all the floor lines
        ax.plot([], [], ":", color="0.3", linewidth=1, label="traffic floor (bound on f+b)")
    _ideal(ax, rows)
    _targets_points(ax, sorted(set(big)), "f+b target, 3 big shapes", "black")
    _targets_points(ax, sorted(set(small)), "f+b target, 128x512->256", "0.5")
    ax.set_ylabel("speedup over dense XLA")
    ax.set_title(_title("sparse_linear vs dense XLA: f+b (solid), forward (dashed), "
                        "traffic floor (dotted)", payload),
                 fontsize=10)
    return _finish(plt, fig, ax, out)


def plot_conv2d(payload: dict, out: str) -> str:
    plt = _pyplot()
    rows = payload["results"]
    by_layer = defaultdict(list)
    for r in rows:
        by_layer[r["layer"]].append(r)
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    has_fwd = all("best_fwd_speedup" in r for r in rows)
    for i, (layer, layer_rows) in enumerate(by_layer.items()):
        layer_rows.sort(key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in layer_rows]
        color = colors[i % len(colors)]
        ax.plot(xs, [r["auto_fb_speedup"] for r in layer_rows], "-o", color=color,
                linewidth=1, markersize=4, label=f"{layer} f+b (auto)")
        if has_fwd:
            ax.plot(xs, [r["best_fwd_speedup"] for r in layer_rows], "--x", color=color,
                    linewidth=1, markersize=4, alpha=0.6)
    # Geometric means over the layers, at the sparsities every layer has.
    sparsities = sorted({r["sparsity"] for r in rows})
    full = [s for s in sparsities
            if sum(math.isclose(r["sparsity"], s) for r in rows) == len(by_layer)]
    at = {s: [r for r in rows if math.isclose(r["sparsity"], s)] for s in full}
    batch = payload.get("config", {}).get("batch", rows[0]["batch"] if rows else 0)
    if full:
        ax.plot(full, [_targets.geomean(r["auto_fb_speedup"] for r in at[s]) for s in full],
                "-o", color="black", linewidth=3, label="geomean f+b (auto)")
        if has_fwd:
            ax.plot(full, [_targets.geomean(r["best_fwd_speedup"] for r in at[s]) for s in full],
                    "--x", color="black", linewidth=2, label="geomean fwd (best)")
    points = []
    for s in full:
        target = _targets.conv_geomean_target(by_layer, batch, s)
        if target is not None:
            points.append((s, target.value))
    _ideal(ax, rows)
    _targets_points(ax, points, "geomean f+b target", "red")
    ax.set_ylabel("speedup over dense XLA conv")
    ax.set_title(_title(f"sparse_conv2d vs dense XLA, batch {batch}: f+b (solid), "
                        f"forward (dashed)", payload), fontsize=10)
    return _finish(plt, fig, ax, out)


def plot_file(path: str, out: str | None = None) -> str:
    """Plots one JSON result file; returns the PNG's path (default: next to the JSON)."""
    with open(path) as f:
        payload = json.load(f)
    out = out or os.path.splitext(path)[0] + ".png"
    benchmark = payload.get("benchmark")
    if benchmark == "linear":
        return plot_linear(payload, out)
    if benchmark == "conv2d":
        return plot_conv2d(payload, out)
    raise ValueError(f"{path}: not a linear.py or conv2d.py result (benchmark={benchmark!r})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*",
                        help="result files of linear.py / conv2d.py (default: "
                             "benchmarks/results/linear*.json and conv2d*.json)")
    parser.add_argument("--out", default=None,
                        help="the PNG to write (only with one JSON file; default: next to it)")
    args = parser.parse_args(argv)
    paths = args.json or sorted(glob.glob(os.path.join(_targets.RESULTS_DIR, "linear*.json"))
                                + glob.glob(os.path.join(_targets.RESULTS_DIR, "conv2d*.json")))
    if not paths:
        parser.error(f"no JSON files given and none in {_targets.RESULTS_DIR}")
    if args.out and len(paths) != 1:
        parser.error("--out needs exactly one JSON file")
    try:
        _pyplot()
    except ImportError:
        parser.error("needs matplotlib: pip install -e '.[bench]'")
    for path in paths:
        print(f"wrote {plot_file(path, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
