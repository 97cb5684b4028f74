"""Checkpoints of sparse models with orbax-checkpoint: values, patterns, optimizer state.

`save_checkpoint` writes any mix of nnx models and optimizers and plain
pytrees (linen variables, optax states) with orbax, every sparsity pattern as
the arrays of `SparsityPattern.to_arrays`, plus a small JSON record of every
pattern (its kernel shape and nnz). `restore_checkpoint` reads them back into
a target of the same kind::

    save_checkpoint(path, {"model": model, "optimizer": optimizer})
    # ... in another process: build the same architecture, then
    restore_checkpoint(path, {"model": model, "optimizer": optimizer})

nnx models and optimizers are updated in place. A sparse nnx layer whose
kernel shape matches the checkpoint's takes the checkpoint's pattern even if
its own number of nonzeros differs (so a freshly built and sparsified model
can receive a pruned checkpoint); a pattern whose kernel shape does not match
the target's, or a sparse layer where the target has a dense one, is a clear
`ValueError` naming the layer. Plain pytrees must match the checkpoint's
shapes exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparseprop_jax import _checks
from sparseprop_jax import _model_walk as ml
from sparseprop_jax.sparse_weight import SparsityPattern

FORMAT = "sparseprop_jax"
#: 2: patterns stored with their kernel shape (`SparsityPattern.to_arrays`); 1 lacked it.
VERSION = 2
_STATE, _META = "state", "sparsity"


def _is_node(obj: Any) -> bool:
    """An nnx graph node whose state we save (a Module, an Optimizer)."""
    return isinstance(obj, (nnx.Module, nnx.Optimizer))


def _saveable(obj: Any) -> Any:
    """The tree orbax writes: nnx nodes as pure dicts, their patterns as dicts of arrays."""
    if _is_node(obj):
        pure = nnx.to_pure_dict(nnx.state(obj))
        return jax.tree.map(lambda x: x.to_arrays() if isinstance(x, SparsityPattern) else x,
                            pure, is_leaf=lambda x: isinstance(x, SparsityPattern))
    if isinstance(obj, Mapping) and any(_is_node(v) or isinstance(v, (Mapping, list, tuple))
                                        for v in obj.values()):
        return {str(k): _saveable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields") \
            and any(_is_node(v) for v in obj):
        return {str(i): _saveable(v) for i, v in enumerate(obj)}
    return obj


def _leaves(tree: Any) -> dict[tuple, Any]:
    return {tuple(str(p) for p in _key(path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _key(path) -> tuple:
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(k)
    return tuple(out)


def _patterns(where: str, saveable: Any, nodes: Mapping[tuple, Any]) -> dict[str, dict]:
    """`{path: {"shape": kernel shape, "nnz": n}}` of every pattern in a saveable tree.

    `nodes` maps the paths of nnx nodes to the nodes; the other patterns are
    read from their stored arrays.
    """
    found = {}
    for prefix, node in nodes.items():
        for layer in ml.nnx_layers(node) if isinstance(node, nnx.Module) else ():
            if layer.sparse:
                path = prefix + ml.norm_path(layer.path) + ("pattern",)
                found[ml.path_name(path)] = {"shape": list(layer.pattern.shape),
                                             "nnz": layer.pattern.nnz}

    def walk(tree, path):
        if ml.is_pattern_entry(tree):
            name = ml.path_name(path)
            if name not in found:
                pattern = SparsityPattern.from_arrays(tree, f"{where}: {name}")
                found[name] = {"shape": list(pattern.shape), "nnz": pattern.nnz}
            return
        if isinstance(tree, Mapping):
            for key, sub in tree.items():
                walk(sub, path + (str(key),))
    walk(saveable, ())
    return found


def _nodes(target: Any, path: tuple = ()) -> dict[tuple, Any]:
    """The nnx nodes of a target, by their path in its saveable tree."""
    if _is_node(target):
        return {path: target}
    out = {}
    if isinstance(target, Mapping):
        for k, v in target.items():
            out.update(_nodes(v, path + (str(k),)))
    elif isinstance(target, (list, tuple)) and not hasattr(target, "_fields"):
        for i, v in enumerate(target):
            out.update(_nodes(v, path + (str(i),)))
    return out


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
        _STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}))


def save_checkpoint(directory: Any, target: Any, *, force: bool = False) -> str:
    """Saves a sparse model, its patterns and its optimizer state with orbax.

    Args:
      directory: the checkpoint directory (created; must not exist unless
        `force`).
      target: what to save: an nnx model or optimizer, a dict / list of them
        (e.g. `{"model": model, "optimizer": optimizer}`), or any pytree
        (linen variables, optax state), or a mix.
      force: overwrite an existing checkpoint.

    Returns:
      The absolute checkpoint path.
    """
    path = os.path.abspath(os.fspath(directory))
    saveable = _saveable(target)
    meta = {"format": FORMAT, "version": VERSION,
            "patterns": _patterns("save_checkpoint", saveable, _nodes(target))}
    _checkpointer().save(path, ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(saveable), _META: ocp.args.JsonSave(meta)}), force=force)
    return path


def _placeholder_pattern(shape: tuple, nnz: int) -> SparsityPattern:
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[:nnz] = True
    return SparsityPattern.from_mask(mask.reshape(shape))


def _adapt_nodes(nodes: Mapping[tuple, Any], saved: Mapping[str, dict]) -> list:
    """Re-packs sparse nnx layers whose nnz differs from the checkpoint's (same kernel shape).

    Optimizer states are rebuilt (for the shapes only: restoring fills
    them) when their model changed. Checks every layer before changing any.

    Returns:
      Functions that undo the changes, in order.
    """
    from flax.nnx.training.optimizer import to_opt_state

    repack = []
    for prefix, node in nodes.items():
        if not isinstance(node, nnx.Module):
            continue
        for layer in ml.nnx_layers(node):
            name = ml.path_name(prefix + ml.norm_path(layer.path) + ("pattern",))
            if not layer.sparse or name not in saved:
                continue
            shape, nnz = tuple(saved[name]["shape"]), int(saved[name]["nnz"])
            if shape != layer.pattern.shape:
                raise ValueError(
                    f"restore_checkpoint: the checkpoint's sparsity pattern of layer "
                    f"{ml.path_name(prefix + ml.norm_path(layer.path))!r} is for a kernel of "
                    f"shape {shape} ({nnz} nonzeros), but the target's layer has kernel shape "
                    f"{layer.pattern.shape}")
            if nnz != layer.pattern.nnz:
                repack.append((layer.module, shape, nnz))
    if not repack:
        return []
    models = [n for n in nodes.values() if isinstance(n, nnx.Module)]
    optimizers = [n for n in nodes.values() if isinstance(n, nnx.Optimizer)]
    if optimizers and len(models) != 1:
        raise ValueError("restore_checkpoint: the checkpoint's patterns have other nnz than the "
                         "target's; to rebuild the optimizer state for them, the target must "
                         "hold exactly one model next to the optimizer")
    undo = []
    for module, shape, nnz in repack:
        pattern, values = module.pattern.get_value(), module.values.get_value()
        undo.append(lambda m=module, p=pattern, v=values: (m.pattern.set_value(p),
                                                           m.values.set_value(v)))
        module.pattern.set_value(_placeholder_pattern(shape, nnz))
        module.values.set_value(jnp.zeros((nnz,), _checks.DEFAULT_DTYPE))
    for node in optimizers:
        undo.append(lambda o=node, s=node.opt_state: setattr(o, "opt_state", s))
        params = nnx.state(models[0], node.wrt, graph=getattr(node, "graph", None))
        node.opt_state = to_opt_state(node.tx.init(params))
    return undo


def _describe(name: str, entry: Optional[dict]) -> str:
    if entry is None:
        return ("no pattern there (a dense layer, or no layer; to restore a sparse layer into "
                "an nnx model, sparsify the model first, at any sparsity)")
    return f"kernel shape {tuple(entry['shape'])} with {entry['nnz']} nonzeros"


def _check_match(saved_tree: Any, target_tree: Any, saved_patterns: Mapping,
                 target_patterns: Mapping) -> None:
    """A clear ValueError unless the target's leaves have the checkpoint's paths and shapes."""
    if isinstance(saved_tree, Mapping) and isinstance(target_tree, Mapping):
        saved_keys = {str(k) for k in saved_tree}
        target_keys = {str(k) for k in target_tree}
        if saved_keys != target_keys:
            raise ValueError(f"restore_checkpoint: the checkpoint holds {sorted(saved_keys)}, "
                             f"the target {sorted(target_keys)}")
    for name in sorted(set(saved_patterns) | set(target_patterns)):
        s, t = saved_patterns.get(name), target_patterns.get(name)
        if s is None or t is None or tuple(s["shape"]) != tuple(t["shape"]) \
                or s["nnz"] != t["nnz"]:
            layer = name[:-len("/pattern")] if name.endswith("/pattern") else name
            raise ValueError(
                f"restore_checkpoint: the sparsity pattern of layer {layer!r} does not match "
                f"the target: the checkpoint has {_describe(name, s)}, the target has "
                f"{_describe(name, t)}")
    saved, target = _leaves(saved_tree), _leaves(target_tree)
    problems = []
    for key in sorted(set(saved) | set(target)):
        name = "/".join(key)
        if key not in target:
            problems.append(f"{name}: in the checkpoint, not in the target")
        elif key not in saved:
            problems.append(f"{name}: in the target, not in the checkpoint")
        elif tuple(saved[key].shape) != tuple(np.shape(target[key])):
            problems.append(f"{name}: shape {tuple(saved[key].shape)} in the checkpoint, "
                            f"{tuple(np.shape(target[key]))} in the target")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("restore_checkpoint: the checkpoint does not match the target: "
                         + "; ".join(problems[:5]) + more)


def _write_back(target: Any, restored: Any) -> Any:
    """Puts restored values into the target's nnx nodes (in place); returns the new target."""
    if _is_node(target):
        state = nnx.state(target)
        patterns = _pattern_paths(nnx.to_pure_dict(state))

        def fix(tree, path):
            if path in patterns:
                return SparsityPattern.from_arrays(tree, f"restore_checkpoint: {'/'.join(path)}")
            if isinstance(tree, Mapping):
                return {k: fix(v, path + (str(k),)) for k, v in tree.items()}
            return tree
        nnx.replace_by_pure_dict(state, fix(restored, ()))
        nnx.update(target, state)
        return target
    if isinstance(target, Mapping) and _nodes(target):
        return {k: _write_back(v, restored[k if k in restored else str(k)])
                for k, v in target.items()}
    if isinstance(target, (list, tuple)) and not hasattr(target, "_fields") and _nodes(target):
        return type(target)(_write_back(v, restored[str(i)]) for i, v in enumerate(target))
    return restored


def _pattern_paths(pure: Any, path: tuple = ()) -> set[tuple]:
    """The paths of the `SparsityPattern`s in a pure dict of nnx state."""
    if isinstance(pure, SparsityPattern):
        return {path}
    out = set()
    if isinstance(pure, Mapping):
        for k, v in pure.items():
            out |= _pattern_paths(v, path + (str(k),))
    return out


def restore_checkpoint(directory: Any, target: Any = None) -> Any:
    """Restores a checkpoint written by `save_checkpoint` into `target`.

    Args:
      directory: the checkpoint directory.
      target: what was saved, built afresh: nnx models and optimizers are
        updated in place (sparse layers take the checkpoint's patterns, see
        the module docs); pytrees give the structure and shapes of what is
        returned. None returns the saved tree as nested dicts of arrays
        (enough for linen variables).

    Returns:
      The target with the restored values (the same nnx objects), or the
      saved tree when `target` is None.

    Raises:
      ValueError: a pattern of the checkpoint does not fit the target's
        layer (other kernel shape, a dense layer where the checkpoint has a
        sparse one, or another nnz in a pytree), or other leaves differ.
    """
    path = os.path.abspath(os.fspath(directory))
    checkpointer = _checkpointer()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"restore_checkpoint: no checkpoint at {path}")
    try:
        meta = checkpointer.restore(path, ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        meta = meta[_META] or {}
    except (KeyError, ValueError, FileNotFoundError):
        meta = {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"restore_checkpoint: {path} is not a checkpoint written by "
                         "sparseprop_jax.checkpoint.save_checkpoint")
    saved_patterns = meta.get("patterns", {})
    if target is None:
        restored = checkpointer.restore(path, ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore()}))
        return restored[_STATE]
    if meta.get("version", 1) < VERSION and saved_patterns:
        raise ValueError(f"restore_checkpoint: {path} was written by an older sparseprop_jax "
                         f"(checkpoint version {meta.get('version', 1)}, this one reads "
                         f"{VERSION}), which stored sparsity patterns without their kernel "
                         "shape; restore_checkpoint(path) without a target still returns its "
                         "arrays")
    nodes = _nodes(target)
    undo = _adapt_nodes(nodes, saved_patterns)
    try:
        saveable = _saveable(target)
        saved_tree = checkpointer.metadata(path).item_metadata[_STATE]
        saved_tree = getattr(saved_tree, "tree", saved_tree)
        _check_match(saved_tree, saveable, saved_patterns,
                     _patterns("restore_checkpoint", saveable, nodes))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
        restored = checkpointer.restore(path, ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
    except BaseException:
        for fn in reversed(undo):  # leave the target as it was
            fn()
        raise
    return _write_back(target, restored)


__all__ = ["restore_checkpoint", "save_checkpoint"]
