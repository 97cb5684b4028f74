"""Data-parallel training of a sparse MLP over several processes with `jax.distributed`.

Every process builds the same model (the sparsity pattern is drawn from the
same seed), holds a replica of the parameters and feeds its own shard of every
batch; the sparse layers compute on the local shard and each layer's values
gradient is all-reduced across processes once per step (CPU collectives over
gloo), so the replicas stay identical.

Run it on one machine (it starts the processes itself, then compares the result
with a single process trained on the full batches):

    python examples/data_parallel.py                      # 2 processes, jit + shardings
    python examples/data_parallel.py --mode shard_map     # the same step under shard_map

Or start one process per machine (or per terminal) yourself:

    python examples/data_parallel.py --coordinator 10.0.0.1:1234 --num-processes 2 \\
        --process-id 0 --out params0.npz     # on the first machine; --process-id 1 on the other
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

FEATURES, HIDDEN, CLASSES = 64, 256, 10
DATASET = 1024


# -- the model and the training step (shared by every process) ---------------------
def make_model(sparsity: float = 0.9):
    from flax import nnx

    from sparseprop_jax.nnx import SparseDense

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = SparseDense(FEATURES, HIDDEN, sparsity=sparsity, rngs=rngs)
            self.l2 = SparseDense(HIDDEN, HIDDEN, sparsity=sparsity, rngs=rngs)
            self.l3 = SparseDense(HIDDEN, CLASSES, sparsity=sparsity, rngs=rngs)

        def __call__(self, x):
            import jax
            return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))

    return MLP(nnx.Rngs(0))  # the same seed everywhere: the same pattern and values


def make_data(seed: int = 0):
    """A synthetic classification set: the labels of a random teacher network."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((DATASET, FEATURES)).astype(np.float32)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    labels = np.argmax(np.tanh(x) @ teacher, axis=1).astype(np.int32)
    return x, labels


def train(steps: int, batch: int, mesh=None, mode: str = "jit", log=print):
    """Trains from the same start for `steps`; returns the parameters (numpy) and the losses.

    With `mesh` (one axis, "data") every batch is split over the mesh's devices,
    which may belong to several processes; without it, one device runs it all.
    """
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    model = make_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.5, momentum=0.9)
    opt_state = tx.init(params)
    x_all, y_all = make_data()

    def loss_sum(params, rest, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if mode == "jit" or mesh is None:
        # Plain jit: the shardings of the arguments say how to split the work.
        @jax.jit
        def step(params, opt_state, rest, x, y):
            loss, grads = jax.value_and_grad(lambda p: loss_sum(p, rest, x, y) / batch)(params)
            return (*update(params, opt_state, grads), loss)
    elif mode == "shard_map":
        # Per-device code: psum of the local losses; with check_vma (the default)
        # JAX all-reduces the gradients of the replicated parameters itself.
        def local_step(params, opt_state, rest, x, y):
            def global_loss(p):
                return jax.lax.psum(loss_sum(p, rest, x, y), "data") / batch
            loss, grads = jax.value_and_grad(global_loss)(params)
            return (*update(params, opt_state, grads), loss)
        step = jax.jit(jax.shard_map(local_step, mesh=mesh,
                                     in_specs=(P(), P(), P(), P("data"), P("data")),
                                     out_specs=(P(), P(), P())))
    else:
        raise ValueError(f"mode must be 'jit' or 'shard_map', got {mode!r}")

    def put(tree, spec):
        if mesh is None:
            return jax.device_put(tree)
        sharding = NamedSharding(mesh, spec)
        # Every process holds the full (same) host data; each device gets its part.
        return jax.tree.map(lambda a: jax.make_array_from_callback(
            np.shape(a), sharding, lambda index: np.asarray(a)[index]), tree)

    params, opt_state, rest = put(params, P()), put(opt_state, P()), put(rest, P())
    losses = []
    for i in range(steps):
        start = (i * batch) % DATASET
        x, y = x_all[start:start + batch], y_all[start:start + batch]
        params, opt_state, loss = step(params, opt_state, rest, put(x, P("data")),
                                       put(y, P("data")))
        losses.append(float(_local(loss)))
        if i % 10 == 0 or i == steps - 1:
            log(f"step {i:3d}  loss {losses[-1]:.4f}")
    flat = {jax.tree_util.keystr(k): np.asarray(_local(v))
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    return flat, np.asarray(losses)


def _local(array):
    """A replicated array's value, read from this process's own copy."""
    return array.addressable_data(0)


# -- one process of the distributed run --------------------------------------------
def worker(args) -> None:
    if args.pin_core is not None:
        os.sched_setaffinity(0, {args.pin_core})
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.local_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    pid = jax.process_index()

    def log(msg):
        print(f"[process {pid}] {msg}", flush=True)

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    log(f"{jax.local_device_count()} local of {jax.device_count()} devices; "
        f"batch {args.batch} split over {jax.device_count()}")
    params, losses = train(args.steps, args.batch, mesh, args.mode, log)
    if args.out:
        np.savez(args.out, losses=losses, **params)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, steps: int, batch: int, mode: str, out_dir: str,
           timeout: float = 300, local_devices: int = 1, pin: bool = False) -> list[str]:
    """Runs `num_processes` workers on 127.0.0.1; returns their output files."""
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = [os.path.join(out_dir, f"params{i}.npz") for i in range(num_processes)]
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, os.path.abspath(__file__), "--coordinator", coordinator,
               "--num-processes", str(num_processes), "--process-id", str(i),
               "--steps", str(steps), "--batch", str(batch), "--mode", mode,
               "--local-devices", str(local_devices), "--out", outs[i]]
        if pin:
            cmd += ["--pin-core", str(cores[i % len(cores)])]
        procs.append(subprocess.Popen(cmd))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"processes {failed} failed (exit codes "
                           f"{[procs[i].returncode for i in failed]})")
    return outs


def compare(outs: list[str], reference: dict) -> float:
    """Checks the processes agree exactly; returns the largest deviation from `reference`."""
    results = [dict(np.load(f)) for f in outs]
    for other in results[1:]:
        for name in results[0]:
            if not np.array_equal(results[0][name], other[name]):
                raise AssertionError(f"{name} differs between processes")
    worst = 0.0
    for name, ref in reference.items():
        got = results[0][name]
        worst = max(worst, float(np.max(np.abs(got - ref)) / (1.0 + np.max(np.abs(ref)))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=None,
                        help="run one worker (else: start all on 127.0.0.1 and compare)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--mode", choices=("jit", "shard_map"), default="jit")
    parser.add_argument("--local-devices", type=int, default=1, help="CPU devices per process")
    parser.add_argument("--pin-core", type=int, default=None, help="pin this process to a core")
    parser.add_argument("--out", default=None, help="save the final parameters (.npz)")
    args = parser.parse_args()
    if args.process_id is not None:
        if args.coordinator is None:
            parser.error("--process-id needs --coordinator")
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        outs = launch(args.num_processes, args.steps, args.batch, args.mode, tmp,
                      local_devices=args.local_devices)
        print(f"{args.num_processes} processes trained {args.steps} steps in "
              f"{time.perf_counter() - start:.1f} s")
        reference, losses = train(args.steps, args.batch, log=lambda msg: None)
        worst = compare(outs, reference)
    print(f"parameters identical across processes; largest deviation from one process on "
          f"the full batches: {worst:.2e} (final loss {losses[-1]:.4f})")


if __name__ == "__main__":
    main()
