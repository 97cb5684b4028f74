"""Gradual magnitude pruning: schedules, prune events, optimizer state, recompilations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseprop_jax import linen as sp_linen
from sparseprop_jax.nnx import SparseDense
from sparseprop_jax.pruning import (carry_opt_state, cubic_schedule, prune, prune_steps,
                                    step_schedule)
from sparseprop_jax.sparsify import sparse_apply


# -- schedules ----------------------------------------------------------------
def test_cubic_schedule_follows_zhu_and_gupta():
    schedule = cubic_schedule(0.9, begin_step=10, end_step=50, initial_sparsity=0.1,
                              frequency=10)
    assert schedule(0) == schedule(9) == 0.0  # dense warm-up
    assert schedule(10) == pytest.approx(0.1)
    for t in (20, 30, 40):
        assert schedule(t) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 10) / 40) ** 3)
        assert schedule(t + 9) == schedule(t)  # constant between events
    assert schedule(50) == schedule(10_000) == pytest.approx(0.9)
    values = [schedule(t) for t in range(60)]
    assert values == sorted(values)
    steps = jnp.arange(60)
    np.testing.assert_allclose(jax.vmap(schedule)(steps), values, rtol=1e-6)
    assert prune_steps(schedule, 60) == [10, 20, 30, 40, 50]


def test_step_schedule_prunes_a_fixed_fraction_every_k_steps():
    schedule = step_schedule(0.875, begin_step=100, every=50, num_prunes=3)
    assert schedule(99) == 0.0
    assert [round(schedule(t), 6) for t in (100, 149, 150, 200, 1000)] == \
        [0.5, 0.5, 0.75, 0.875, 0.875]
    assert prune_steps(schedule, 400) == [100, 150, 200]
    assert float(jax.jit(schedule)(jnp.asarray(160))) == pytest.approx(0.75)


@pytest.mark.parametrize("make, match", [
    (lambda: cubic_schedule(1.0, 0, 10), r"final_sparsity must be in \[0, 1\)"),
    (lambda: cubic_schedule(0.5, 10, 10), "end_step must be an integer >= 11"),
    (lambda: cubic_schedule(0.5, 0, 10, initial_sparsity=0.6), "must not exceed"),
    (lambda: cubic_schedule(0.5, 0, 10, frequency=0), "frequency"),
    (lambda: step_schedule(-0.5, 0, 10, 3), r"final_sparsity must be in \[0, 1\)"),
    (lambda: step_schedule(0.5, 0, 10, 0), "num_prunes"),
])
def test_bad_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- nnx ----------------------------------------------------------------------
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(16, 48, rngs=rngs)
        self.out = nnx.Linear(48, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    return x, jnp.tanh(x[:, :4] - x[:, 4:8])


def _survivor_positions(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Positions in the old values (column-major order) of the entries that stay."""
    old = before.T.ravel() != 0
    new = after.T.ravel() != 0
    assert np.all(old[new]), "a pruned weight came back"
    return np.flatnonzero(new[old])


def test_gmp_nnx_reaches_the_schedule_carries_adam_and_recompiles_only_at_events():
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, optimizer):
        traces.append(None)  # runs once per trace
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    schedule = cubic_schedule(0.9, begin_step=4, end_step=16, frequency=4,
                              initial_sparsity=0.5)
    events = prune_steps(schedule, 24)
    assert events == [4, 8, 12, 16]
    for step in range(24):
        if step in events:
            before = {n: np.asarray(getattr(model, n).kernel[...] if step == events[0]
                                    else getattr(model, n).weight.to_dense())
                      for n in ("hidden", "out")}
            mu = optimizer.opt_state[0].mu
            old_mu = {n: np.asarray(mu[n]["kernel" if step == events[0] else "values"][...])
                      for n in ("hidden", "out")}
            old_count = int(optimizer.opt_state[0].count[...])
            report = prune(model, schedule(step), optimizer=optimizer)
            for layer in report:  # uniform: every layer exactly at the schedule
                assert layer.nnz == np.prod(layer.shape) - round(schedule(step) *
                                                                 np.prod(layer.shape))
            for name in ("hidden", "out"):
                layer = getattr(model, name)
                assert isinstance(layer, SparseDense)
                after = np.asarray(layer.weight.to_dense())
                new_mu = np.asarray(optimizer.opt_state[0].mu[name]["values"][...])
                assert new_mu.shape == (layer.nnz,)
                if step == events[0]:  # dense moments gathered on the new pattern
                    np.testing.assert_array_equal(new_mu, old_mu[name].T[after.T != 0])
                else:  # the survivors keep their moments
                    keep = _survivor_positions(before[name], after)
                    np.testing.assert_array_equal(new_mu, old_mu[name][keep])
                np.testing.assert_array_equal(after[after != 0], before[name][after != 0])
            assert int(optimizer.opt_state[0].count[...]) == old_count  # not reset
        loss = train_step(model, optimizer)
    assert model.hidden.sparsity == pytest.approx(0.9, abs=1e-3)
    assert model.out.sparsity == pytest.approx(0.9, abs=1e-2)
    assert len(traces) == 1 + len(events)  # once at the start, once per prune event
    # An event that changes nothing re-packs nothing: no recompilation.
    prune(model, 0.9, optimizer=optimizer)
    train_step(model, optimizer)
    assert len(traces) == 1 + len(events)
    assert np.isfinite(float(loss))


def test_prune_global_and_skip_keep_the_rest_training():
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(1e-2, momentum=0.9), wrt=nnx.Param)
    report = prune(model, 0.8, optimizer=optimizer, distribution="global", skip="out")
    assert isinstance(model.out, nnx.Linear) and report["out"].decision == "dense (skipped)"
    assert model.hidden.sparsity == pytest.approx(0.8, abs=1 / 768)
    trace = optimizer.opt_state[0].trace
    assert trace["hidden"]["values"][...].shape == (model.hidden.nnz,)
    assert trace["out"]["kernel"][...].shape == (48, 4)


# -- linen --------------------------------------------------------------------
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(48)(x)))


def test_gmp_linen_reaches_the_schedule_and_recompiles_only_at_events():
    x, y = _data()
    module = LinenMLP()
    variables = module.init(jax.random.key(0), x)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables["params"])
    apply = sparse_apply(module)
    traces = []

    @jax.jit
    def train_step(variables, opt_state):
        traces.append(None)

        def loss(params):
            return jnp.mean((apply({**variables, "params": params}, x) - y) ** 2)
        value, grads = jax.value_and_grad(loss)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state)
        return {**variables, "params": optax.apply_updates(variables["params"], updates)}, \
            opt_state, value

    schedule = step_schedule(0.9, begin_step=3, every=3, num_prunes=3)
    events = prune_steps(schedule, 12)
    for step in range(12):
        if step in events:
            old_params, old_state = variables["params"], opt_state
            variables, opt_state, report = prune(module, schedule(step), variables=variables,
                                                 inputs=x, opt_state=opt_state, tx=tx)
            for layer in report:
                assert layer.is_sparse
                assert layer.nnz == np.prod(layer.shape) - round(schedule(step) *
                                                                 np.prod(layer.shape))
            if step > events[0]:  # Adam's second moments follow the survivors
                for name in ("Dense_0", "Dense_1"):
                    old_v = np.asarray(old_params[name]["values"])
                    new_v = np.asarray(variables["params"][name]["values"])
                    old_nu = np.asarray(old_state[0].nu[name]["values"])
                    new_nu = np.asarray(opt_state[0].nu[name]["values"])
                    index = {v: i for i, v in enumerate(old_v.tolist())}
                    moved = [index[v] for v in new_v.tolist()]
                    np.testing.assert_array_equal(new_nu, old_nu[moved])
        variables, opt_state, loss = train_step(variables, opt_state)
    assert len(traces) == 1 + len(events)
    assert variables["params"]["Dense_1"]["values"].shape == (77,)  # 10% of 16 * 48
    assert np.isfinite(float(loss))


def test_carry_opt_state_moves_leaves_and_keeps_counts():
    tx = optax.adam(1e-3)
    old_params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": jnp.ones(2)}
    state = tx.init(old_params)
    state = state[0]._replace(mu={"a": {"kernel": old_params["a"]["kernel"] * 2},
                                  "b": jnp.full(2, 5.0)}), state[1]
    new_params = {"a": {"values": jnp.zeros(2)}, "b": jnp.ones(2)}
    moves = {("a", "values"): (("a", "kernel"), lambda k: jnp.asarray(k).ravel()[np.array([1, 4])])}
    new = carry_opt_state(tx, state, new_params, moves)
    np.testing.assert_array_equal(new[0].mu["a"]["values"], [2.0, 8.0])
    np.testing.assert_array_equal(new[0].mu["b"], [5.0, 5.0])
    np.testing.assert_array_equal(new[0].nu["a"]["values"], [0.0, 0.0])


def test_prune_bad_inputs():
    with pytest.raises(ValueError, match=r"prune: sparsity must be in \[0, 1\)"):
        prune(MLP(nnx.Rngs(0)), 1.0)
    with pytest.raises(TypeError, match="optimizer must be an nnx.Optimizer"):
        prune(MLP(nnx.Rngs(0)), 0.5, optimizer=optax.adam(1e-3))
    with pytest.raises(ValueError, match="give tx"):
        module = LinenMLP()
        x = jnp.ones((1, 16))
        prune(module, 0.5, variables=module.init(jax.random.key(0), x), inputs=x,
              opt_state=())
    with pytest.raises(TypeError, match="prune: model must be"):
        prune(object(), 0.5)


def test_prune_linen_sparse_layers_keeps_their_form():
    module = sp_linen.SparseDense(features=8, sparsity=0.5)
    x = jnp.ones((2, 10))
    variables = module.init(jax.random.key(0), x)
    new, _, report = prune(module, 0.75, variables=variables, inputs=x)
    assert report[0].layer_type == "linen.SparseDense" and report[0].nnz == 20
    assert set(new[sp_linen.PATTERN_COLLECTION]) == set(variables[sp_linen.PATTERN_COLLECTION])
    weight = sp_linen.SparseDense.weight(new)
    np.testing.assert_allclose(module.apply(new, x), x @ weight.to_dense() + new["params"]["bias"],
                               rtol=1e-5)
    old = np.asarray(sp_linen.SparseDense.weight(variables).to_dense())
    kept = np.asarray(weight.to_dense()) != 0
    assert np.all(np.abs(old[kept]).min() >= np.abs(old[(old != 0) & ~kept]).max())
