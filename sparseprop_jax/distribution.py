"""Sparsity distributions: how many weights each layer keeps, and which ones.

Magnitude pruning in three flavours, as plain NumPy functions of the dense
kernels:

- "uniform": every layer gets the target sparsity;
- "global": one magnitude threshold across all layers (large layers with
  small weights lose more);
- "erk": Erdos-Renyi-Kernel (Evci et al., 2020, "Rigging the Lottery"): a
  layer's density is proportional to `sum(shape) / prod(shape)`, scaled so the
  layers together hit the target; layers that would exceed density 1 stay
  dense and the rest share the remaining budget.

Pruning only adds zeros: an entry that is not `eligible` (an exact zero of a
dense kernel, or outside a sparse layer's pattern) is never kept, so a layer
that already has more zeros than its share keeps them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

#: The supported distributions.
DISTRIBUTIONS = ("uniform", "global", "erk")


def check_distribution(where: str, distribution: Any) -> str:
    """Returns `distribution` lowercased, or raises ValueError naming the choices."""
    if not isinstance(distribution, str) or distribution.lower() not in DISTRIBUTIONS:
        raise ValueError(f"{where}: distribution must be one of {DISTRIBUTIONS}, "
                         f"got {distribution!r}")
    return distribution.lower()


def check_target_sparsity(where: str, sparsity: Any, name: str = "sparsity") -> float:
    """Returns `sparsity` as a float in [0, 1), or raises naming the argument.

    A pruning target of 1 would remove every weight of every layer, which is
    never what is meant, so it is refused.
    """
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1), got {value}")
    return value


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float,
                  power_scale: float = 1.0) -> list[float]:
    """Per-layer densities of the Erdos-Renyi-Kernel distribution.

    Args:
      shapes: the kernel shapes, e.g. `(in, out)` or `(kh, kw, in, out)`.
      sparsity: the overall target sparsity in [0, 1).
      power_scale: exponent of the raw ERK score `sum(shape) / prod(shape)`
        (1 is ERK; 0 gives the uniform distribution).

    Returns:
      One density in [0, 1] per layer; `sum(density * size)` equals
      `(1 - sparsity) * sum(size)` (before rounding to whole weights).
    """
    sparsity = check_target_sparsity("erk_densities", sparsity)
    sizes = [float(np.prod(s)) for s in shapes]
    raw = [(float(np.sum(s)) / n) ** power_scale for s, n in zip(shapes, sizes)]
    dense: set[int] = set()
    while True:
        # Solve eps * sum(raw * size) = budget over the layers not yet dense.
        budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
        divisor = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / divisor if divisor > 0 else 0.0
        over = [i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        top = max(raw[i] for i in over)
        dense.update(i for i in over if raw[i] == top)


def keep_counts(sizes: Sequence[int], sparsity: float, distribution: str,
                shapes: Optional[Sequence[Sequence[int]]] = None) -> Optional[list[int]]:
    """How many weights each layer keeps under "uniform" or "erk" (None for "global").

    Args:
      sizes: the number of kernel entries of each layer.
      sparsity: the target sparsity in [0, 1).
      distribution: "uniform", "global" or "erk".
      shapes: the kernel shapes (needed by "erk").

    Returns:
      The per-layer counts, or None for "global" (whose counts follow from
      the magnitudes; see `magnitude_masks`).
    """
    distribution = check_distribution("keep_counts", distribution)
    if distribution == "global":
        return None
    if distribution == "uniform":
        return [int(n) - int(round(sparsity * n)) for n in sizes]
    densities = erk_densities(shapes, sparsity)
    return [min(int(n), int(round(d * n))) for d, n in zip(densities, sizes)]


def magnitude_masks(kernels: Sequence[Any], sparsity: float, distribution: str = "uniform",
                    eligible: Optional[Sequence[Optional[Any]]] = None) -> list[np.ndarray]:
    """Boolean masks keeping the largest-magnitude weights of each kernel.

    Ties are broken by position (the earlier entry in C order stays), so the
    result is deterministic.

    Args:
      kernels: dense kernels (any float arrays; only magnitudes matter).
      sparsity: the target sparsity in [0, 1): of each layer ("uniform"), of
        all the layers together ("global", exact to the weight unless too few
        entries are eligible), or overall with the ERK split ("erk").
      distribution: "uniform", "global" or "erk".
      eligible: optional boolean arrays (one per kernel, or None for "every
        nonzero") of the entries allowed to stay; by default a kernel's
        nonzeros. Nothing outside them is ever kept.

    Returns:
      One boolean mask per kernel, of its shape, True where the weight stays.
    """
    where = "magnitude_masks"
    sparsity = check_target_sparsity(where, sparsity)
    distribution = check_distribution(where, distribution)
    kernels = [np.asarray(k) for k in kernels]
    if eligible is None:
        eligible = [None] * len(kernels)
    if len(eligible) != len(kernels):
        raise ValueError(f"{where}: eligible must have one entry per kernel "
                         f"({len(kernels)}), got {len(eligible)}")
    allowed = [(k != 0) if e is None else np.asarray(e, dtype=bool)
               for k, e in zip(kernels, eligible)]
    for i, (k, e) in enumerate(zip(kernels, allowed)):
        if e.shape != k.shape:
            raise ValueError(f"{where}: eligible[{i}] must have the kernel's shape {k.shape}, "
                             f"got {e.shape}")
    # Magnitudes with the ineligible entries below every eligible one.
    scores = [np.where(e, np.abs(k.astype(np.float64)), -1.0).ravel()
              for k, e in zip(kernels, allowed)]
    sizes = [s.size for s in scores]
    counts = keep_counts(sizes, sparsity, distribution, [k.shape for k in kernels])
    if counts is None:  # global: one ranking over all layers
        total = sum(sizes)
        keep = total - int(round(sparsity * total))
        flat = np.concatenate(scores) if scores else np.zeros(0)
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[np.argsort(-flat, kind="stable")[:keep]] = True
        chosen &= flat >= 0
        bounds = np.cumsum([0] + sizes)
        return [chosen[bounds[i]:bounds[i + 1]].reshape(k.shape)
                for i, k in enumerate(kernels)]
    masks = []
    for score, count, k in zip(scores, counts, kernels):
        chosen = np.zeros(score.size, dtype=bool)
        chosen[np.argsort(-score, kind="stable")[:count]] = True
        masks.append((chosen & (score >= 0)).reshape(k.shape))
    return masks
