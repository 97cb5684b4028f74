"""Demo: `sparseprop-jax-demo` (or `python -m sparseprop_jax`) trains a sparse and a dense MLP.

Both models are 64 -> 256 -> 256 -> 10 MLPs trained with Adam on the same
batches of scikit-learn's bundled 8x8 digits (no download); in the sparse one
the two hidden layers are `SparseDense`. Prints test accuracy and the median
time of a jitted train step (compilation excluded).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparseprop_jax.nnx import SparseDense

HIDDEN = 256
BATCH_SIZE = 64
LEARNING_RATE = 1e-3


class MLP(nnx.Module):
    """64 -> 256 -> 256 -> 10 with ReLUs; `hidden_layer` builds the two hidden layers."""

    def __init__(self, n_in: int, n_classes: int, hidden_layer: Callable[..., nnx.Module],
                 rngs: nnx.Rngs):
        self.layers = nnx.List([hidden_layer(n_in, HIDDEN, rngs=rngs),
                                hidden_layer(HIDDEN, HIDDEN, rngs=rngs)])
        self.head = nnx.Linear(HIDDEN, n_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def load_digits(seed: int):
    """Standardised digits, split 75/25 (stratified): (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    to_f32 = lambda a: scaler.transform(a).astype(np.float32)  # noqa: E731
    return to_f32(x_train), y_train.astype(np.int32), to_f32(x_test), y_test.astype(np.int32)


def train(name: str, model: nnx.Module, data, epochs: int, seed: int) -> tuple[float, float]:
    """Trains `model` in place with Adam; returns (test accuracy, median ms per step)."""
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = data
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    # jax.jit on split state avoids nnx.jit's per-call graph traversal, which
    # would dominate the timing of such small steps.
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    steps_per_epoch = len(x_train) // BATCH_SIZE  # drop the ragged batch: one compilation
    order_rng = np.random.default_rng(seed)
    times = []
    with tqdm(total=epochs * steps_per_epoch, desc=name, unit="step") as bar:
        for _ in range(epochs):
            order = order_rng.permutation(len(x_train))
            for i in range(steps_per_epoch):
                batch = order[i * BATCH_SIZE:(i + 1) * BATCH_SIZE]
                start = time.perf_counter()
                state, loss = step(state, x_train[batch], y_train[batch])
                loss.block_until_ready()
                times.append(time.perf_counter() - start)
                bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
                bar.update()
    nnx.update((model, optimizer), state)

    logits = nnx.jit(lambda m, x: m(x))(model, x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == y_test))
    # The first step compiles; the median of the rest is the steady-state cost.
    ms_per_step = 1e3 * float(np.median(times[1:] if len(times) > 1 else times))
    return accuracy, ms_per_step


def main(argv: Optional[Sequence[str]] = None) -> dict[str, tuple[float, float]]:
    """Runs the demo; returns {model name: (test accuracy, ms per step)}."""
    parser = argparse.ArgumentParser(prog="sparseprop-jax-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--sparsity", type=float, default=0.9,
                        help="sparsity of the hidden layers, in [0, 1] (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split, init, order")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if not 0.0 <= args.sparsity <= 1.0:
        parser.error("--sparsity must be in [0, 1]")

    data = load_digits(args.seed)
    n_in, n_classes = data[0].shape[1], int(data[1].max()) + 1
    sparse_name = f"sparse ({args.sparsity:.0%})"
    builders = {
        sparse_name: lambda n, m, rngs: SparseDense(n, m, sparsity=args.sparsity, rngs=rngs),
        "dense": nnx.Linear,
    }
    results = {}
    for name, hidden_layer in builders.items():
        model = MLP(n_in, n_classes, hidden_layer, nnx.Rngs(args.seed))
        results[name] = train(name, model, data, args.epochs, args.seed)

    print(f"digits: {len(data[0])} train / {len(data[2])} test images, batch {BATCH_SIZE}, "
          f"{args.epochs} epochs, MLP {n_in}-{HIDDEN}-{HIDDEN}-{n_classes}")
    print(f"{'model':<14} {'test accuracy':>13} {'ms/step':>8}")
    for name, (accuracy, ms) in results.items():
        print(f"{name:<14} {accuracy:>13.2%} {ms:>8.3f}")
    return results


def cli() -> None:
    """The `sparseprop-jax-demo` command: the demo on the command line's arguments.

    A console script imports the installed package wherever it is run; `python
    -m sparseprop_jax` from the source checkout's root would import the source
    tree instead, which has no compiled extension.
    """
    main()


if __name__ == "__main__":
    cli()
