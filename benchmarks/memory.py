"""Memory checks: no dense temporary in the sparse linear f+b; the sparse training state.

    python benchmarks/memory.py                 # default linear shapes, all sparsities
    python benchmarks/memory.py --shapes 64x256x128 --sparsities 0.9

1. For each linear shape (BATCHxINxOUT) and sparsity, compiles the sparse
   fwd+bwd that `linear.py` times (`jit(value_and_grad(loss, argnums=(0, 1)))`
   of `sparse_linear`, nothing is run) and reads XLA's
   `compile().memory_analysis().temp_size_in_bytes`: the scratch the compiled
   function needs besides its arguments and outputs. It must be smaller than
   one dense in x out float32 kernel (in * out * 4 bytes), i.e. the sparse
   step never materialises the dense kernel or its gradient. The dense XLA
   f+b's temp bytes are shown for comparison. (Scratch the FFI kernels
   allocate themselves is not in XLA's count; they allocate no dense in x out
   buffer either.)

2. The training state of a 95%-sparse 4096x4096 layer: the values, the
   pattern's arrays (indptr, indices, t_indptr, t_indices, t_perm), a
   gradient of the values and optax.adam's state (`optax.adam(1e-3).init`,
   counted with `.nbytes` over its leaves), against a dense 4096x4096 kernel,
   its gradient and its Adam state. Target: at most 15% of the dense bytes.

Exit status 1 if a check fails (these are deterministic, unlike the timings).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _targets  # noqa: E402
import _timing  # noqa: E402
import linear  # noqa: E402
from sparseprop_jax import SparseWeight, SparsityPattern  # noqa: E402

FLOAT32_BYTES = 4


def random_weight(shape, sparsity: float, rng: np.random.Generator) -> SparseWeight:
    """A uniformly random pattern with as many nonzeros as `SparseWeight.random` makes.

    Drawn with NumPy: the byte counts depend only on the shape and nnz, and
    `SparseWeight.random` (jax.random.choice without replacement) takes tens
    of seconds for a 4096x4096 kernel.
    """
    size = int(np.prod(shape))
    nnz = size - int(round(sparsity * size))
    mask = np.zeros(size, dtype=bool)
    mask[rng.choice(size, nnz, replace=False)] = True
    pattern = SparsityPattern.from_mask(mask.reshape(shape))
    return SparseWeight(jnp.asarray(rng.standard_normal(nnz, dtype=np.float32)), pattern)


def temp_bytes(jitted, *args):
    """XLA's temp bytes for the compiled `jitted(*args)`, or None if it does not say."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def check_temporaries(shapes, sparsities, key, rng) -> tuple[list[dict], bool]:
    """Part 1: prints a row per shape and sparsity; returns the rows and whether all passed."""
    print("# compiled sparse f+b (value_and_grad w.r.t. x and values, as linear.py times it): "
          "XLA temp bytes vs one dense in x out float32 kernel")
    table = _timing.TablePrinter([
        ("shape", 14, "s"), ("sparsity", 8, ".2f"), ("sparse f+b temp", 15, ",d"),
        ("dense kernel", 12, ",d"), ("temp / kernel", 13, ".3f"), ("dense f+b temp", 14, ",d"),
        ("no dense temp", 13, "s")])
    table.header()
    rows, ok = [], True
    for shape, k in zip(shapes, jax.random.split(key, len(shapes))):
        batch, n_in, n_out = shape
        kx, kk, kc = jax.random.split(k, 3)
        x = jax.random.normal(kx, (batch, n_in), jnp.float32)
        kernel = jax.random.normal(kk, (n_in, n_out), jnp.float32)
        ct = jax.random.normal(kc, (batch, n_out), jnp.float32)
        dense_temp = temp_bytes(linear.dense_fwdbwd, x, kernel, ct)
        kernel_bytes = n_in * n_out * FLOAT32_BYTES
        for sparsity in sparsities:
            weight = random_weight((n_in, n_out), sparsity, rng)
            temp = temp_bytes(linear.sparse_fwdbwd, x, weight.values, weight, ct)
            passed = None if temp is None else temp < kernel_bytes
            ok = ok and passed is not False
            table.row([linear.shape_label(shape), sparsity, temp, kernel_bytes,
                       None if temp is None else temp / kernel_bytes, dense_temp,
                       {None: "-", True: "OK", False: "not"}[passed]])
            rows.append({"batch": batch, "in_features": n_in, "out_features": n_out,
                         "sparsity": sparsity, "nnz": weight.nnz,
                         "sparse_fwdbwd_temp_bytes": temp, "dense_kernel_bytes": kernel_bytes,
                         "dense_fwdbwd_temp_bytes": dense_temp, "ok": passed})
    if any(r["ok"] is None for r in rows):
        print("# '-': this XLA gives no memory analysis")
    return rows, ok


def tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def check_train_state(rng) -> tuple[dict, bool]:
    """Part 2: prints the sparse and dense training state bytes; returns them and the verdict."""
    shape, sparsity = _targets.TRAIN_STATE_SHAPE, _targets.TRAIN_STATE_SPARSITY
    weight = random_weight(shape, sparsity, rng)
    optimizer = optax.adam(1e-3)
    sparse = {
        "values": weight.values.nbytes,
        "pattern": tree_bytes([getattr(weight.pattern, f) for f in weight.pattern.FIELDS]),
        "gradient": weight.values.nbytes,  # d loss / d values: same shape and dtype
        "adam": tree_bytes(optimizer.init(weight.values)),
    }
    kernel = jnp.zeros(shape, jnp.float32)
    dense = {"values": kernel.nbytes, "pattern": 0, "gradient": kernel.nbytes,
             "adam": tree_bytes(optimizer.init(kernel))}
    sparse["total"], dense["total"] = sum(sparse.values()), sum(dense.values())
    ratio = sparse["total"] / dense["total"]
    passed = ratio <= _targets.TRAIN_STATE_MAX_RATIO

    print(f"\n# training state of a {sparsity:.0%}-sparse {shape[0]}x{shape[1]} layer "
          f"(nnz {weight.nnz:,}) vs dense: values / kernel, pattern arrays "
          f"({', '.join(weight.pattern.FIELDS)}), gradient, optax.adam(1e-3) state")
    table = _timing.TablePrinter([("part", 8, "s"), ("sparse bytes", 12, ",d"),
                                  ("dense bytes", 12, ",d")])
    table.header()
    for part in sparse:
        table.row([part, sparse[part], dense[part]])
    print(f"# sparse / dense = {ratio:.1%}; target <= {_targets.TRAIN_STATE_MAX_RATIO:.0%}; "
          f"met: {'yes' if passed else 'no'}")
    return {"shape": list(shape), "sparsity": sparsity, "nnz": weight.nnz, "sparse": sparse,
            "dense": dense, "ratio": ratio, "target": _targets.TRAIN_STATE_MAX_RATIO,
            "met": passed}, passed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=_timing.comma_list(linear.parse_shape), default=None,
                        help="comma-separated BATCHxINxOUT shapes (default: linear.py's: "
                             + ",".join("x".join(map(str, s)) for s in linear.DEFAULT_SHAPES)
                             + ")")
    parser.add_argument("--sparsities", type=_timing.parse_sparsities, default=None,
                        help="comma-separated sparsities (default: linear.py's: "
                             + ",".join(map(str, linear.DEFAULT_SPARSITIES)) + ")")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results and machine info to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    info = _timing.machine_info()
    print(f"# memory: {_timing.machine_summary(info)}")
    rng = np.random.default_rng(args.seed)
    rows, temp_ok = check_temporaries(args.shapes or linear.DEFAULT_SHAPES,
                                      args.sparsities or linear.DEFAULT_SPARSITIES,
                                      jax.random.key(args.seed), rng)
    state, state_ok = check_train_state(rng)
    if args.json:
        _timing.write_json(args.json, {"benchmark": "memory", "machine": info,
                                       "temporaries": rows, "train_state": state})
        print(f"# wrote {args.json}")
    return 0 if temp_ok and state_ok else 1


if __name__ == "__main__":
    sys.exit(main())
