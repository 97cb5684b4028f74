"""Dense parameters plus boolean masks (jaxpruner / masked training form) <-> sparse layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseprop_jax.linen import PATTERN_COLLECTION
from sparseprop_jax.masks import from_masks, to_masks
from sparseprop_jax.nnx import SparseConv, SparseDense
from sparseprop_jax.sparsify import sparse_apply

X = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(144, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


def _random_mask(shape, density, seed):
    return np.random.default_rng(seed).random(shape) < density


def test_linen_masks_round_trip_and_match_masked_dense():
    module = LinenNet()
    variables = module.init(jax.random.key(0), X)
    params = variables["params"]
    masks = {"Conv_0": {"kernel": _random_mask(params["Conv_0"]["kernel"].shape, 0.3, 1),
                        "bias": None},
             "Dense_0": {"kernel": _random_mask(params["Dense_0"]["kernel"].shape, 0.2, 2)}}
    sparse = from_masks(variables, masks)
    assert "kernel" not in sparse["params"]["Dense_0"]
    assert sparse["params"]["Dense_0"]["values"].shape == (masks["Dense_0"]["kernel"].sum(),)
    assert set(sparse[PATTERN_COLLECTION]) == {"Conv_0", "Dense_0"}
    masked = jax.tree.map(lambda a: a, variables)
    for name in masks:
        masked["params"][name]["kernel"] = params[name]["kernel"] * masks[name]["kernel"]
    expected = module.apply(masked, X)
    np.testing.assert_allclose(sparse_apply(module)(sparse, X), expected, rtol=1e-5, atol=1e-5)
    dense, back = to_masks(sparse)
    for name in masks:
        np.testing.assert_array_equal(back[name]["kernel"], masks[name]["kernel"])
        np.testing.assert_array_equal(dense["params"][name]["kernel"],
                                      masked["params"][name]["kernel"])
        assert back[name]["bias"] is None
    assert PATTERN_COLLECTION not in dense


def test_nnx_masks_round_trip_and_match_masked_dense():
    model = NnxNet(nnx.Rngs(0))
    expected_model = nnx.clone(model)
    masks = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = jax.tree.map(lambda _: None, masks)
    masks["head"]["kernel"] = _random_mask((144, 5), 0.25, 3)
    masks["conv"]["bias"] = np.ones(4, bool)  # all-True masks on other parameters are fine
    expected_model.head.kernel[...] = expected_model.head.kernel[...] * masks["head"]["kernel"]
    model = from_masks(model, masks)
    assert isinstance(model.head, SparseDense) and isinstance(model.conv, nnx.Conv)
    assert model.head.nnz == masks["head"]["kernel"].sum()
    np.testing.assert_allclose(model(X), expected_model(X), rtol=1e-5, atol=1e-5)
    model, back = to_masks(model)
    assert isinstance(model.head, nnx.Linear)
    np.testing.assert_array_equal(back["head"]["kernel"], masks["head"]["kernel"])
    assert back["conv"]["kernel"] is None
    np.testing.assert_array_equal(model.head.kernel[...], expected_model.head.kernel[...])
    conv_mask = {"conv": {"kernel": _random_mask((3, 3, 3, 4), 0.5, 4)}}
    assert isinstance(from_masks(model, conv_mask).conv, SparseConv)


@pytest.mark.parametrize("masks, error, match", [
    ({"Dense_0": {"bias": np.zeros(5, bool)}}, ValueError, "is not the kernel"),
    ({"Dense_0": {"kernel": np.ones((3, 3), bool)}}, ValueError,
     r"must have the kernel's shape \(144, 5\)"),
    ({"Dense_0": {"kernel": np.ones((144, 5))}}, TypeError, "must be boolean"),
    ([np.ones(3, bool)], TypeError, "masks must be a tree of dicts"),
])
def test_bad_masks(masks, error, match):
    module = LinenNet()
    variables = module.init(jax.random.key(0), X)
    with pytest.raises(error, match=match):
        from_masks(variables, masks)


def test_from_masks_needs_a_model_or_variables():
    with pytest.raises(TypeError, match="from_masks: expected an nnx model or linen variables"):
        from_masks(jnp.ones(3), {})
