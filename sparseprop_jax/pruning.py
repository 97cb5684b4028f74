"""Gradual magnitude pruning (GMP): sparsity schedules and prune events.

The schedules are plain functions of the training step that return the
target sparsity. A prune event (`prune`) removes the smallest-magnitude
surviving weights to reach the schedule's new target and re-packs each
layer to its new, smaller number of nonzeros, so the steps that follow run
at the new sparsity's speed. The optimizer state (Adam's moments, or any
optax state shaped like the parameters) is carried over to the surviving
weights, not reset. Shapes only change at prune events, so a jitted train
step recompiles at most once per event::

    schedule = cubic_schedule(0.9, begin_step=200, end_step=2000, frequency=200)
    events = set(prune_steps(schedule, num_steps))
    for step in range(num_steps):
        if step in events:
            prune(model, schedule(step), optimizer=optimizer)   # nnx, in place
        train_step(model, optimizer, batch)

The first event turns the dense `Linear`/`Conv` layers into sparse ones
(dense warm-up before it); later events prune the sparse layers further.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparseprop_jax import _checks
from sparseprop_jax import sparsify as _sparsify
from sparseprop_jax.distribution import check_target_sparsity

Schedule = Callable[[Any], Any]


# -- schedules ----------------------------------------------------------------
def _check_step(where: str, name: str, value: Any, minimum: int) -> int:
    if not _checks.is_int(value) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _is_array(step: Any) -> bool:
    return isinstance(step, jax.Array)


def cubic_schedule(final_sparsity: float, begin_step: int, end_step: int, *,
                   initial_sparsity: float = 0.0, frequency: int = 1) -> Schedule:
    """The cubic sparsity schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    `s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`, updated
    every `frequency` steps from `t0 = begin_step` and reaching `s_f` at
    `t1 = end_step`. Before `begin_step` the model is dense (0).

    Args:
      final_sparsity: the sparsity reached at `end_step`, in [0, 1).
      begin_step: the end of the dense warm-up, where the schedule starts at
        `initial_sparsity`; with the default `initial_sparsity=0` the first
        event that prunes anything (see `prune_steps`) is `begin_step + frequency`.
      end_step: the step from which the sparsity stays at `final_sparsity`.
      initial_sparsity: the sparsity at `begin_step`, in [0, final_sparsity].
      frequency: steps between prune events.

    Returns:
      A function of the step (an int, or a jax array) giving the target
      sparsity (a float, or a jax array).
    """
    where = "cubic_schedule"
    s_f = check_target_sparsity(where, final_sparsity, "final_sparsity")
    s_i = check_target_sparsity(where, initial_sparsity, "initial_sparsity")
    if s_i > s_f:
        raise ValueError(f"{where}: initial_sparsity ({s_i}) must not exceed final_sparsity "
                         f"({s_f})")
    t0 = _check_step(where, "begin_step", begin_step, 0)
    t1 = _check_step(where, "end_step", end_step, t0 + 1)
    freq = _check_step(where, "frequency", frequency, 1)

    def schedule(step):
        if _is_array(step):
            t = jnp.asarray(step, jnp.float32)
            done = jnp.floor((t - t0) / freq) * freq / (t1 - t0)
            progress = jnp.where(t >= t1, 1.0, jnp.clip(done, 0.0, 1.0))
            return jnp.where(t < t0, 0.0, s_f + (s_i - s_f) * (1.0 - progress) ** 3)
        if step < t0:
            return 0.0
        progress = 1.0 if step >= t1 else min(1.0, math.floor((step - t0) / freq) * freq
                                              / (t1 - t0))
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3
    return schedule


def step_schedule(final_sparsity: float, begin_step: int, every: int,
                  num_prunes: int) -> Schedule:
    """A step schedule: dense warm-up, then prune every `every` steps to a final target.

    Events happen at `begin_step + k * every` for `k = 0 .. num_prunes - 1`;
    each removes the same fraction of the surviving weights, so the density
    after event `k` is `(1 - final_sparsity) ** ((k + 1) / num_prunes)` and
    the last event reaches `final_sparsity`. (With steps per epoch `E`,
    `every = k * E` prunes every `k` epochs.)

    Args:
      final_sparsity: the sparsity after the last event, in [0, 1).
      begin_step: the first event (the end of the dense warm-up).
      every: steps between events.
      num_prunes: the number of events.

    Returns:
      A function of the step (an int, or a jax array) giving the target sparsity.
    """
    where = "step_schedule"
    s_f = check_target_sparsity(where, final_sparsity, "final_sparsity")
    t0 = _check_step(where, "begin_step", begin_step, 0)
    every = _check_step(where, "every", every, 1)
    n = _check_step(where, "num_prunes", num_prunes, 1)

    def schedule(step):
        if _is_array(step):
            k = jnp.clip(jnp.floor((jnp.asarray(step, jnp.float32) - t0) / every), -1, n - 1)
            return jnp.where(k < 0, 0.0, 1.0 - (1.0 - s_f) ** ((k + 1) / n))
        if step < t0:
            return 0.0
        k = min(n - 1, (step - t0) // every)
        return 1.0 - (1.0 - s_f) ** ((k + 1) / n)
    return schedule


def prune_steps(schedule: Schedule, num_steps: int) -> list[int]:
    """The steps in `[0, num_steps)` at which `schedule` raises the sparsity (the prune events)."""
    num_steps = _check_step("prune_steps", "num_steps", num_steps, 0)
    events, previous = [], 0.0
    for step in range(num_steps):
        current = float(schedule(step))
        if current > previous:
            events.append(step)
        previous = max(previous, current)
    return events


# -- optimizer state ----------------------------------------------------------
@jax.tree_util.register_pytree_node_class
class _ParamsPlaceholder:
    """Stands for the whole parameter tree in `tx.init`, to find the params-shaped parts."""

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls()


def _key(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _same_shapes(a: Any, b: Any) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.shape(x) == np.shape(y) for x, y in zip(la, lb))


def _carry_params(old: Any, new: Any, moves: Mapping) -> Any:
    old_flat = {_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(old)[0]}
    new_flat, treedef = jax.tree_util.tree_flatten_with_path(new)
    out = []
    for path, leaf in new_flat:
        key = _key(path)
        value = leaf
        for n in range(len(key), 0, -1):
            if key[:n] in moves:
                old_path, fn = moves[key[:n]]
                source = tuple(old_path) + key[n:]
                if source in old_flat:
                    value = fn(old_flat[source])
                break
        else:
            if key in old_flat and np.shape(old_flat[key]) == np.shape(leaf):
                value = old_flat[key]
        if np.shape(value) != np.shape(leaf):
            raise ValueError(f"carry_opt_state: the state at {'/'.join(key)} has shape "
                             f"{np.shape(value)} after the move, expected {np.shape(leaf)}")
        out.append(jnp.asarray(value, dtype=jnp.result_type(leaf)))
    return jax.tree_util.tree_unflatten(treedef, out)


def carry_opt_state(tx: optax.GradientTransformation, opt_state: Any, new_params: Any,
                    moves: Mapping, *, wrap: Optional[Callable[[Any], Any]] = None) -> Any:
    """The optimizer state for re-packed parameters, carried over from the old one.

    Every part of the state shaped like the parameters (Adam's `mu` and
    `nu`, momentum traces, ...) is rebuilt for `new_params`: leaves of
    unchanged parameters are copied, leaves of moved parameters follow their
    move (e.g. the surviving entries of a pruned layer's values, or the
    entries of a dense kernel on the new pattern), anything else starts as
    `tx.init` makes it. The other parts (step counts, ...) are kept.

    Args:
      tx: the optax transformation that made `opt_state`.
      opt_state: the state before the parameters changed.
      new_params: the parameters after the change.
      moves: `{new parameter path: (old parameter path, function)}`, paths as
        tuples of str; the function maps an old leaf to the new one.
      wrap: applied to `tx.init(new_params)` (nnx wraps state in variables).

    Returns:
      The new optimizer state.
    """
    fresh = tx.init(new_params)
    if wrap is not None:
        fresh = wrap(fresh)
    try:
        template = tx.init(_ParamsPlaceholder())
    except Exception as err:  # the transformation looks inside the parameters
        raise TypeError("carry_opt_state: cannot find the parameter-shaped parts of this "
                        "optimizer's state (its init inspects the parameters)") from err

    def merge(t, old, new):
        if isinstance(t, _ParamsPlaceholder):
            return _carry_params(old, new, moves)
        return old if _same_shapes(old, new) else new
    return jax.tree.map(merge, template, opt_state, fresh,
                        is_leaf=lambda x: isinstance(x, _ParamsPlaceholder))


# -- prune events -------------------------------------------------------------
def prune(model: Any, sparsity: float, *, optimizer: Optional[nnx.Optimizer] = None,
          distribution: str = "uniform", skip: Any = (), min_sparsity: float = 0.0,
          variables: Optional[Mapping] = None, inputs: Any = None,
          call_kwargs: Optional[Mapping] = None, opt_state: Any = None,
          tx: Optional[optax.GradientTransformation] = None, conv_variant: str = "auto"):
    """A prune event: magnitude-prune to `sparsity` and carry the optimizer state over.

    Dense `Linear`/`Dense` and `Conv` layers become sparse; sparse layers
    lose their smallest surviving weights and are re-packed to the new nnz
    (a layer already at or above its target is left untouched, so an event
    that changes nothing causes no recompilation). The same options as
    `sparsify` choose the layers and the distribution.

    Args:
      model: an nnx model (changed in place), or a linen module (with
        `variables` and `inputs`).
      sparsity: the target sparsity in [0, 1), e.g. `schedule(step)`.
      optimizer: nnx: the `nnx.Optimizer` of the model; its `opt_state` is
        replaced by the carried-over state.
      distribution, skip, min_sparsity, inputs, call_kwargs, conv_variant:
        as in `sparsify` (min_sparsity defaults to 0: every layer is pruned).
      variables: linen: the current variables.
      opt_state: linen: the optax state of `variables['params']`.
      tx: linen: the optax transformation (needed with `opt_state`).

    Returns:
      nnx: the `SparsifyReport`. linen: `(variables, opt_state, report)`.
    """
    where = "prune"
    if isinstance(model, nn.Module):
        if opt_state is not None and tx is None:
            raise ValueError(f"{where}: give tx (the optax transformation) with opt_state")
        new_vars, report, moves = _sparsify._run(
            where, model, sparsity, distribution=distribution, skip=skip,
            min_sparsity=min_sparsity, only_where_faster=False, inputs=inputs,
            call_kwargs=call_kwargs, variables=variables, copy=False, timing_repeats=0,
            conv_variant=conv_variant)
        if opt_state is not None and moves:
            opt_state = carry_opt_state(tx, opt_state, new_vars["params"], moves)
        return new_vars, opt_state, report
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{where}: model must be a flax.nnx.Module or a flax.linen.Module, "
                        f"got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(f"{where}: optimizer must be an nnx.Optimizer, "
                        f"got {type(optimizer).__name__}")
    old_state = None if optimizer is None else optimizer.opt_state
    new_model, report, moves = _sparsify._run(
        where, model, sparsity, distribution=distribution, skip=skip, min_sparsity=min_sparsity,
        only_where_faster=False, inputs=None, call_kwargs=None, variables=None, copy=False,
        timing_repeats=0, conv_variant=conv_variant)
    if new_model is not model:
        raise ValueError(f"{where}: the model is itself a single layer, which cannot be "
                         "replaced in place; use sparsify, or hold it in a module")
    if optimizer is not None and moves:
        from flax.nnx.training.optimizer import to_opt_state

        graph = getattr(optimizer, "graph", None)
        new_params = nnx.state(model, optimizer.wrt, graph=graph)
        optimizer.opt_state = carry_opt_state(optimizer.tx, old_state, new_params, moves,
                                              wrap=to_opt_state)
    return report


__all__ = ["carry_opt_state", "cubic_schedule", "prune", "prune_steps", "step_schedule"]
