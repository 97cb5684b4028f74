"""Dense parameters plus boolean masks <-> sparse layers.

Masked training and pruning libraries such as jaxpruner keep a model dense
and carry a tree of boolean masks shaped like the parameters (None where a
parameter is not pruned). `from_masks` turns such a pair into sparse layers
whose patterns are exactly the masks; `to_masks` gives the pair back::

    sparse_vars = from_masks(variables, masks)            # linen variables
    variables, masks = to_masks(sparse_vars)              # and back
    model = from_masks(model, masks)                      # nnx, in place
    model, masks = to_masks(model)

Masks may only cover the `kernel` of `Linear`/`Dense` and `Conv` layers; a
mask on any other parameter must be None or all True.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseprop_jax import _checks
from sparseprop_jax import _model_walk as ml
from sparseprop_jax.nnx import SparseConv, SparseDense
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern
from sparseprop_jax.sparsify import densify

PATTERN_COLLECTION = ml.PATTERN_COLLECTION


def _mask_leaves(where: str, masks: Any) -> dict[tuple, np.ndarray]:
    """`{path (tuple of str): boolean mask}` for the non-None leaves of a masks tree."""
    if isinstance(masks, nnx.State):
        masks = nnx.to_pure_dict(masks)
    if not isinstance(masks, Mapping):
        raise TypeError(f"{where}: masks must be a tree of dicts shaped like the parameters "
                        f"(boolean arrays, or None where not pruned), got "
                        f"{type(masks).__name__}")
    out = {}

    def walk(tree, path):
        if tree is None:
            return
        if isinstance(tree, nnx.Variable):
            tree = tree.get_value()
        if isinstance(tree, Mapping):
            for key, sub in tree.items():
                walk(sub, path + (str(key),))
            return
        mask = np.asarray(tree)
        if mask.dtype != np.bool_:
            raise TypeError(f"{where}: the mask at {ml.path_name(path)!r} must be boolean, "
                            f"got {mask.dtype}")
        out[path] = mask
    walk(masks, ())
    return out


def _kernel_masks(where: str, masks: Any, kernels: Mapping[tuple, tuple]) -> dict:
    """The masks of the layer kernels, by layer path; checks every other mask is all True.

    `kernels` maps each layer path (tuple of str) to its kernel shape.
    """
    out = {}
    for path, mask in _mask_leaves(where, masks).items():
        layer = path[:-1]
        if path[-1:] == ("kernel",) and layer in kernels:
            if mask.shape != tuple(kernels[layer]):
                raise ValueError(f"{where}: the mask at {ml.path_name(path)!r} must have the "
                                 f"kernel's shape {tuple(kernels[layer])}, got {mask.shape}")
            out[layer] = mask
        elif not mask.all():
            raise ValueError(f"{where}: the mask at {ml.path_name(path)!r} is not the kernel of "
                             "a Linear/Dense or 2-D Conv layer, so it cannot be made sparse "
                             "(give None, or an all-True mask, for parameters kept dense)")
    return out


def from_masks(model_or_variables: Any, masks: Any) -> Any:
    """Sparse layers from dense parameters and boolean masks.

    Args:
      model_or_variables: an nnx model (its masked `Linear`/`Conv` layers
        become `SparseDense`/`SparseConv`, in place), or linen variables
        (`{'params': ...}`; each masked 2-D kernel becomes a sparse Dense
        layer, each masked 4-D kernel a sparse Conv layer, to apply with
        `sparse_apply`).
      masks: a tree of dicts shaped like the parameters (`nnx.state(model,
        nnx.Param)` or `variables['params']`), with a boolean array of the
        kernel's shape for each layer to make sparse and None (or nothing)
        elsewhere. The mask is the pattern: kernel entries outside it are
        dropped, entries inside it are kept even if zero.

    Returns:
      The nnx model (the same object unless it is a single layer), or the
      new linen variables.
    """
    where = "from_masks"
    if isinstance(model_or_variables, nnx.Module):
        model = model_or_variables
        layers = {ml.norm_path(layer.path): layer for layer in ml.nnx_layers(model)}
        kernels = {p: layer.shape for p, layer in layers.items() if not layer.sparse}
        replacements = {}
        for path, mask in _kernel_masks(where, masks, kernels).items():
            layer = layers[path]
            if layer.error:
                raise ValueError(f"{where}: layer {layer.name!r} ({layer.type_name}) cannot be "
                                 f"made sparse: {layer.error}")
            cls = SparseDense if layer.kind == "dense" else SparseConv
            replacements[id(layer.module)] = cls.from_dense(layer.module, mask=mask)
        return ml.nnx_replace(model, replacements)
    if isinstance(model_or_variables, Mapping):
        new = ml.to_dicts(model_or_variables)
        params = new.get("params")
        if not isinstance(params, Mapping):
            raise ValueError(f"{where}: linen variables must have a 'params' collection, got "
                             f"{list(new)}")
        kernels = {}

        def walk(tree, path):
            if isinstance(tree, Mapping):
                if "kernel" in tree and np.ndim(tree["kernel"]) in (2, 4):
                    kernels[path] = np.shape(tree["kernel"])
                for key, sub in tree.items():
                    walk(sub, path + (key,))
        walk(params, ())
        patterns = new.setdefault(PATTERN_COLLECTION, {})
        for path, mask in _kernel_masks(where, masks, kernels).items():
            layer_params = ml.tree_get(params, path)
            kernel = np.asarray(layer_params["kernel"])
            _checks.check_dtype(where, f"the kernel at {ml.path_name(path + ('kernel',))!r}",
                                kernel)
            pattern = SparsityPattern.from_mask(mask)
            layer_params["values"] = SparseWeight.gather(jnp.asarray(kernel), pattern).values
            del layer_params["kernel"]
            ml.tree_set(patterns, path, pattern.to_arrays())
        if not patterns:
            del new[PATTERN_COLLECTION]
        return new
    raise TypeError(f"{where}: expected an nnx model or linen variables (a Mapping), got "
                    f"{type(model_or_variables).__name__}")


def to_masks(model_or_variables: Any) -> tuple[Any, dict]:
    """Dense parameters and boolean masks from sparse layers (the inverse of `from_masks`).

    Args:
      model_or_variables: an nnx model (densified in place), or linen
        variables made by `sparsify` or `from_masks`.

    Returns:
      `(model, masks)` or `(variables, masks)`: the dense model or variables
      (pruned weights as exact zeros) and a tree of dicts shaped like its
      parameters (`nnx.to_pure_dict(nnx.state(model, nnx.Param))` or
      `variables['params']`) holding each former sparse layer's pattern as a
      boolean mask at its `kernel`, and None everywhere else.
    """
    where = "to_masks"
    if isinstance(model_or_variables, nnx.Module):
        layer_masks = {ml.norm_path(layer.path): layer.pattern.mask()
                       for layer in ml.nnx_layers(model_or_variables) if layer.sparse}
        model = densify(model_or_variables)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return model, _masks_like(params, layer_masks)
    if isinstance(model_or_variables, Mapping):
        layer_masks = {}

        def walk(tree, path):
            if ml.is_pattern_entry(tree):
                layer_masks[tuple(str(p) for p in path)] = SparsityPattern.from_arrays(
                    tree, f"{where}: the pattern at {ml.path_name(path)!r}").mask()
                return
            if isinstance(tree, Mapping):
                for key, sub in tree.items():
                    walk(sub, path + (key,))
        walk(model_or_variables.get(PATTERN_COLLECTION, {}), ())
        variables = densify(model_or_variables)
        return variables, _masks_like(variables["params"], layer_masks)
    raise TypeError(f"{where}: expected an nnx model or linen variables (a Mapping), got "
                    f"{type(model_or_variables).__name__}")


def _masks_like(params: Mapping, layer_masks: Mapping[tuple, np.ndarray]) -> dict:
    def build(tree, path):
        if isinstance(tree, Mapping):
            return {k: (layer_masks[path] if k == "kernel" and path in layer_masks
                        else build(v, path + (str(k),))) for k, v in tree.items()}
        return None
    return build(params, ())


__all__ = ["from_masks", "to_masks"]
