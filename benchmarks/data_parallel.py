"""Data-parallel scaling: a sparse MLP's training step on 1 vs 2 devices.

The step (forward, backward and an SGD update of a SparseDense MLP, batch
split over the devices, parameters replicated, values gradients all-reduced)
is timed in these configurations, each in fresh processes:

| config       | what                                                                    |
| ------------ | ----------------------------------------------------------------------- |
| 1dev-1core   | one device, the process pinned to one core (the per-device baseline)    |
| 1dev-2cores  | one device on two cores (XLA's intra-op pool runs the sparse kernels)    |
| 2dev-1proc   | two host devices in one process on two cores (`jax_num_cpu_devices=2`)   |
| 2proc-pinned | two processes, each pinned to its own core, `jax.distributed` over gloo |

Scaling = 1dev-1core ms / config ms (ideal for two devices: 2x). Each step is
jitted once and timed `--steps` times after `--warmup` steps; medians are
reported. Nothing here asserts on speed.

    python benchmarks/data_parallel.py                       # all configs, MLP 784-2048-2048-10
    python benchmarks/data_parallel.py --quick               # a smoke run: few, small steps
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = ("1dev-1core", "1dev-2cores", "2dev-1proc", "2proc-pinned")


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# -- one timed process ------------------------------------------------------------
def run(args) -> None:
    cores = _cores()
    config = args.run
    if config == "1dev-1core":
        os.sched_setaffinity(0, {cores[0]})
    elif config == "2proc-pinned":
        os.sched_setaffinity(0, {cores[args.process_id % len(cores)]})
    # Before jax starts: XLA sizes its thread pool from the affinity.
    import jax

    if config == "2dev-1proc":
        jax.config.update("jax_num_cpu_devices", 2)
    if config == "2proc-pinned":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2,
                                   process_id=args.process_id)
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sparseprop_jax.nnx import SparseDense

    sizes = [int(s) for s in args.sizes.split(",")]

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([SparseDense(a, b, sparsity=args.sparsity, rngs=rngs)
                                    for a, b in zip(sizes[:-1], sizes[1:])])

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == len(self.layers) - 1 else jax.nn.relu(layer(x))
            return x

    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.sgd(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rest, x, y):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], args.batch).astype(np.int32)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))

    def put(tree, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.tree.map(lambda a: jax.make_array_from_callback(
            np.shape(a), sharding, lambda index: np.asarray(a)[index]), tree)

    state = (put(params, P()), put(opt_state, P()))
    rest, x, y = put(rest, P()), put(x, P("data")), put(y, P("data"))
    samples = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        *state, value = step(*state, rest, x, y)
        jax.block_until_ready((state, value))
        if i >= args.warmup:
            samples.append(time.perf_counter() - start)
    if jax.process_index() == 0 and args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(config=config, devices=jax.device_count(),
                           cores=len(os.sched_getaffinity(0)) * jax.process_count(),
                           samples=samples), f)
    if config == "2proc-pinned":
        jax.distributed.shutdown()


# -- the driver --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: str, args, tmp: str) -> dict:
    out = os.path.join(tmp, f"{config}.json")
    common = [sys.executable, os.path.abspath(__file__), "--run", config, "--sizes", args.sizes,
              "--sparsity", str(args.sparsity), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--json-out", out]
    if config == "2proc-pinned":
        coordinator = f"127.0.0.1:{_free_port()}"
        cmds = [common + ["--coordinator", coordinator, "--process-id", str(i)]
                for i in range(2)]
    else:
        cmds = [common]
    procs = [subprocess.Popen(cmd) for cmd in cmds]
    try:
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"{config}: exit codes {[p.returncode for p in procs]}")
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784,2048,2048,10", help="MLP layer widths")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per config")
    parser.add_argument("--quick", action="store_true", help="a smoke run (small and short)")
    parser.add_argument("--json", default=None, help="also write the results here")
    # internal: one timed process
    parser.add_argument("--run", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args)
        return
    if args.quick:
        args.sizes, args.steps, args.warmup = "256,512,10", 5, 2
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    if len(_cores()) < 2:
        print(f"note: this process may use only {len(_cores())} core(s); the 2-core "
              "configurations share it")
    print(f"MLP {args.sizes} at {args.sparsity:.0%} sparsity, global batch {args.batch}, "
          f"{args.steps} timed steps (median)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            rows.append(measure(config, args, tmp))
    base = next((r for r in rows if r["config"] == "1dev-1core"), None)
    base_ms = None if base is None else statistics.median(base["samples"]) * 1e3
    print(f"{'config':<14}{'devices':>8}{'cores':>6}{'ms/step':>10}{'p25':>8}{'p75':>8}"
          f"{'examples/s':>12}{'scaling':>9}")
    for r in rows:
        ms = sorted(s * 1e3 for s in r["samples"])
        med = statistics.median(ms)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
        scaling = f"{base_ms / med:.2f}x" if base_ms else "-"
        r["median_ms"] = med
        print(f"{r['config']:<14}{r['devices']:>8}{r['cores']:>6}{med:>10.2f}{q[0]:>8.2f}"
              f"{q[2]:>8.2f}{args.batch / med * 1e3:>12.0f}{scaling:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
