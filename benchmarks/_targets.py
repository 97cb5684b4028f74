"""The project's speed and memory targets, and the helpers that check them.

All speed targets are for 2 threads, float32, forward + backward
(`f+b` speedup = dense XLA f+b ms / sparse f+b ms) unless said otherwise:

  * linear 256x768->3072, 256x3072->768, 64x4096->4096: at least 4x at 90%
    sparsity, 8x at 95%, 16x at 98%, 25x at 99% (none at 80%);
  * linear 128x512->256: faster than dense (> 1x) from 90%, at least 3x at 99%;
  * linear forward: faster than `jax.experimental.sparse` BCSR @ dense at
    every sparsity >= 90%;
  * conv2d, batch 32, the seven ResNet18 layers, variant="auto": geometric
    mean over the layers of the f+b speedup at least 3x at 90%, 5x at 95%,
    10x at 98%; and no layer slower than dense (>= 1x) at 95%;
  * threads: sparse f+b at 95% at least 1.7x faster on 2 threads than on 1,
    on the three big linear shapes and on each of the seven conv layers;
  * end to end (`end_to_end.py`), a jitted training step (forward, loss,
    gradient, optax update) of the sparse model against the same model dense
    under XLA, batch 32: ResNet18 at 95% (every conv but the stem sparse) at
    least 2x faster at 64x64 and at 128x128; the MLP-Mixer at least 3x at 95%;
  * memory: the compiled sparse linear f+b has no dense in x out temporary;
    the training state (values, pattern, gradient, Adam moments) of a
    95%-sparse 4096x4096 layer is at most 15% of a dense one's.

Speed targets are only evaluated when the run uses exactly `TARGET_THREADS`
CPUs; otherwise the tables print "-" in the target and met columns.

This module must not import jax (plot.py and thread_scaling.py use it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable, Optional

TARGET_THREADS = 2

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Target:
    """A lower bound on a ratio: `value` x, or more than `value` x if `strict`."""

    value: float
    strict: bool = False

    def met(self, ratio: float) -> bool:
        return ratio > self.value if self.strict else ratio >= self.value

    def __str__(self) -> str:
        return f"{'>' if self.strict else ''}{self.value:g}x"


def _at(table: dict, sparsity: float) -> Optional[Target]:
    """The entry of `table` (keyed by sparsity) for this sparsity, if any."""
    for s, target in table.items():
        if math.isclose(s, sparsity, abs_tol=1e-9):
            return target
    return None


# -- linear ------------------------------------------------------------------

LINEAR_BIG_SHAPES = ((256, 768, 3072), (256, 3072, 768), (64, 4096, 4096))
LINEAR_SMALL_SHAPE = (128, 512, 256)
LINEAR_BIG_TARGETS = {0.9: Target(4), 0.95: Target(8), 0.98: Target(16), 0.99: Target(25)}
BCSR_FROM_SPARSITY = 0.9


def linear_fb_target(shape, sparsity: float) -> Optional[Target]:
    """The f+b speedup target of a linear shape (batch, in, out) at a sparsity."""
    shape = tuple(shape)
    if shape in LINEAR_BIG_SHAPES:
        return _at(LINEAR_BIG_TARGETS, sparsity)
    if shape == LINEAR_SMALL_SHAPE:
        if math.isclose(sparsity, 0.99, abs_tol=1e-9):
            return Target(3)
        if sparsity >= 0.9 - 1e-9:
            return Target(1, strict=True)
    return None


def linear_bcsr_target(sparsity: float) -> Optional[Target]:
    """Sparse forward vs BCSR forward (BCSR ms / sparse ms): more than 1x from 90%."""
    return Target(1, strict=True) if sparsity >= BCSR_FROM_SPARSITY - 1e-9 else None


# -- conv2d ------------------------------------------------------------------

CONV_LAYERS = ("56x56x64->64", "56x56x64->128/2", "28x28x128->128", "28x28x128->256/2",
               "14x14x256->256", "14x14x256->512/2", "7x7x512->512")
CONV_BATCH = 32
CONV_GEOMEAN_TARGETS = {0.9: Target(3), 0.95: Target(5), 0.98: Target(10)}
CONV_EVERY_LAYER_TARGETS = {0.95: Target(1)}


def conv_layer_target(label: str, batch: int, sparsity: float) -> Optional[Target]:
    """The per-layer target (auto f+b speedup): no layer slower than dense at 95%."""
    if label in CONV_LAYERS and batch == CONV_BATCH:
        return _at(CONV_EVERY_LAYER_TARGETS, sparsity)
    return None


def conv_min_target(labels: Iterable[str], batch: int, sparsity: float) -> Optional[Target]:
    """The target for the slowest of the layers, if `labels` are the seven ResNet18 layers."""
    if sorted(labels) == sorted(CONV_LAYERS) and batch == CONV_BATCH:
        return _at(CONV_EVERY_LAYER_TARGETS, sparsity)
    return None


def conv_geomean_target(labels: Iterable[str], batch: int,
                        sparsity: float) -> Optional[Target]:
    """The geomean target over the layers, if `labels` are the seven ResNet18 layers."""
    if sorted(labels) == sorted(CONV_LAYERS) and batch == CONV_BATCH:
        return _at(CONV_GEOMEAN_TARGETS, sparsity)
    return None


# -- end to end -------------------------------------------------------------

END_TO_END_BATCH = 32
END_TO_END_TARGETS = {("resnet18", 0.95): Target(2), ("mixer", 0.95): Target(3)}


def end_to_end_target(family: str, batch: int, sparsity: float,
                      full_size: bool) -> Optional[Target]:
    """The training-step speedup target of a model family ("resnet18", "mixer").

    Only for the full-size models (not `--quick`) at batch 32.
    """
    if not full_size or batch != END_TO_END_BATCH:
        return None
    for (name, s), target in END_TO_END_TARGETS.items():
        if name == family and math.isclose(s, sparsity, abs_tol=1e-9):
            return target
    return None


# -- threads and memory ------------------------------------------------------

THREAD_SCALING = Target(1.7)
THREAD_SCALING_SPARSITY = 0.95

TRAIN_STATE_SHAPE = (4096, 4096)
TRAIN_STATE_SPARSITY = 0.95
TRAIN_STATE_MAX_RATIO = 0.15


def thread_scaling_target(benchmark: str, row: dict) -> Optional[Target]:
    """The 2-thread over 1-thread target for a result row of linear.json / conv2d.json."""
    if not math.isclose(row["sparsity"], THREAD_SCALING_SPARSITY, abs_tol=1e-9):
        return None
    if benchmark == "linear":
        shape = (row["batch"], row["in_features"], row["out_features"])
        return THREAD_SCALING if shape in LINEAR_BIG_SHAPES else None
    if benchmark == "conv2d":
        return (THREAD_SCALING if row["layer"] in CONV_LAYERS and row["batch"] == CONV_BATCH
                else None)
    return None


# -- evaluation and output ---------------------------------------------------

def evaluates(threads: int) -> bool:
    """Whether speed targets apply to a run on `threads` CPUs."""
    return threads == TARGET_THREADS


def check(target: Optional[Target], ratio: Optional[float],
          active: bool = True) -> tuple[str, str, Optional[bool]]:
    """Table cells (target, met) and the JSON value of met (None: no target here)."""
    if target is None or not active:
        return "-", "-", None
    if ratio is None or math.isnan(ratio):
        return str(target), "-", None
    met = target.met(ratio)
    return str(target), "yes" if met else "no", met


def note(threads: int) -> str:
    """The header line saying whether targets are evaluated."""
    if evaluates(threads):
        return f"# targets (for {TARGET_THREADS} threads) are evaluated: this run uses {threads}"
    return (f"# targets apply to {TARGET_THREADS} threads only; this run uses {threads}, "
            f"so the target and met columns show '-'")


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    if not values or min(values) <= 0:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def default_json_path(benchmark: str, threads: int) -> str:
    """benchmarks/results/<benchmark>.json for 2 threads, else with -1thread / -Nthreads."""
    if threads == TARGET_THREADS:
        suffix = ""
    else:
        suffix = "-1thread" if threads == 1 else f"-{threads}threads"
    return os.path.join(RESULTS_DIR, f"{benchmark}{suffix}.json")
