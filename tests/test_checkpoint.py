"""orbax checkpoints of sparse models: patterns, values and optimizer state round trip."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseprop_jax.checkpoint import restore_checkpoint, save_checkpoint
from sparseprop_jax.sparsify import sparse_apply, sparsify

# The model and one train step, run in this process and in a fresh one.
SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.head = nnx.Linear(6 * 5 * 5, 4, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.conv(x)))
            return self.head(x.reshape(x.shape[0], -1))

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 5, 3)), jnp.float32)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
""")

RESTORE = SETUP + textwrap.dedent("""
    import sys
    from sparseprop_jax.checkpoint import restore_checkpoint
    from sparseprop_jax.sparsify import sparsify
    model, _ = sparsify(Net(nnx.Rngs(7)), 0.5)  # another pattern and nnz: replaced
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    restore_checkpoint(sys.argv[1], {"model": model, "optimizer": optimizer})
    model.eval()
    before = model(x)
    model.train()
    train_step(model, optimizer)
    model.eval()
    np.savez(sys.argv[2], before=before, after=model(x), nnz=model.head.nnz)
""")


def _trained_model():
    scope: dict = {}
    exec(SETUP, scope)
    model, _ = sparsify(scope["Net"](nnx.Rngs(0)), 0.8, distribution="global")
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    for _ in range(3):
        scope["train_step"](model, optimizer)
    return scope, model, optimizer


def test_nnx_round_trip_in_a_fresh_process_is_bit_identical(tmp_path):
    scope, model, optimizer = _trained_model()
    save_checkpoint(tmp_path / "ckpt", {"model": model, "optimizer": optimizer})
    out = tmp_path / "out.npz"
    # cwd: `python -c` puts the working directory first on sys.path, where the
    # repository's source folder would shadow the installed package.
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path / "ckpt"), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    x = scope["x"]
    model.eval()
    before = model(x)
    model.train()
    scope["train_step"](model, optimizer)  # the same step, on the restored optimizer state
    model.eval()
    result = np.load(out)
    assert int(result["nnz"]) == model.head.nnz
    np.testing.assert_array_equal(result["before"], before)
    np.testing.assert_array_equal(result["after"], model(x))


def test_nnx_restore_in_process_restores_patterns_and_optimizer(tmp_path):
    scope, model, optimizer = _trained_model()
    path = save_checkpoint(tmp_path / "ckpt", {"model": model, "optimizer": optimizer})
    fresh, _ = sparsify(scope["Net"](nnx.Rngs(1)), 0.3)
    fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.Param)
    target = {"model": fresh, "optimizer": fresh_opt}
    assert restore_checkpoint(path, target)["model"] is fresh
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(fresh))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(optimizer.opt_state), jax.tree.leaves(fresh_opt.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert fresh.conv.weight.pattern.shape == (3, 3, 3, 6)


def test_mismatched_patterns_give_clear_errors(tmp_path):
    scope, model, optimizer = _trained_model()
    path = save_checkpoint(tmp_path / "ckpt", {"model": model})

    class Wider(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8 * 5 * 5, 4, rngs=rngs)
    wider, _ = sparsify(Wider(nnx.Rngs(0)), 0.8)
    with pytest.raises(ValueError, match=r"sparsity pattern of layer 'model/conv' is for a "
                                         r"kernel of shape \(3, 3, 3, 6\).*\(3, 3, 3, 8\)"):
        restore_checkpoint(path, {"model": wider})
    # A failed restore leaves the target as it was (even the layers it had re-packed).
    fresh, _ = sparsify(scope["Net"](nnx.Rngs(1)), 0.3)
    nnz, values = fresh.head.nnz, np.asarray(fresh.head.values[...])
    fresh_opt = nnx.Optimizer(fresh, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    with pytest.raises(ValueError, match=r"checkpoint holds \['model'\], the target \['model', "
                                         r"'optimizer'\]"):
        restore_checkpoint(path, {"model": fresh, "optimizer": fresh_opt})
    assert fresh.head.nnz == nnz and fresh_opt.opt_state[0].trace["head"]["values"].shape == \
        (nnz,)
    np.testing.assert_array_equal(fresh.head.values[...], values)
    dense = scope["Net"](nnx.Rngs(0))
    with pytest.raises(ValueError, match="pattern of layer 'model/conv' does not match.*"
                                         "sparsify the model first"):
        restore_checkpoint(path, {"model": dense})
    with pytest.raises(ValueError, match="not a checkpoint written by sparseprop_jax"):
        import orbax.checkpoint as ocp
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp_path / "plain", {"a": jnp.ones(2)})
        restore_checkpoint(tmp_path / "plain", {"a": jnp.ones(2)})


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def test_linen_round_trip_and_nnz_mismatch(tmp_path):
    module = LinenNet()
    x = jnp.ones((2, 8))
    variables, _ = sparsify(module, 0.7, variables=module.init(jax.random.key(0), x), inputs=x)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables["params"])
    path = save_checkpoint(tmp_path / "ckpt", {"variables": variables, "opt_state": opt_state})
    restored = restore_checkpoint(path, {"variables": variables, "opt_state": opt_state})
    assert type(restored["opt_state"]) is type(opt_state)
    expected = {"variables": variables, "opt_state": opt_state}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    raw = restore_checkpoint(path)  # no target: nested dicts, enough for linen variables
    np.testing.assert_array_equal(sparse_apply(module)(raw["variables"], x),
                                  sparse_apply(module)(variables, x))
    other, _ = sparsify(module, 0.9, variables=module.init(jax.random.key(0), x), inputs=x)
    with pytest.raises(ValueError, match=r"pattern of layer 'variables/sparsity_pattern/"
                                         r"Dense_0' does not match.*with 14 nonzeros.*"
                                         r"with 5 nonzeros"):
        restore_checkpoint(path, {"variables": other, "opt_state": tx.init(other["params"])})


def test_version_1_checkpoint_with_patterns_restores_only_without_target(tmp_path, monkeypatch):
    from sparseprop_jax import checkpoint

    model, _ = sparsify(LinenNet(), 0.5, variables=LinenNet().init(
        jax.random.key(0), jnp.ones((2, 8))), inputs=jnp.ones((2, 8)))
    monkeypatch.setattr(checkpoint, "VERSION", 1)
    path = save_checkpoint(tmp_path / "v1", model)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="checkpoint version 1.*without a target"):
        restore_checkpoint(path, model)
    assert set(restore_checkpoint(path)) == set(model)
