"""The reference models (sparseprop_jax.reference_models): shapes, and sparse == densified dense.

The models are what the end-to-end benchmark and notebook 04 time; here a
narrow ResNet18 and a small MLP-Mixer are sparsified as the benchmark does
(stem and classifier kept dense) and compared with their densified copies:
the same weights as dense arrays, run by XLA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparseprop_jax import SparseWeight, reference_models
from sparseprop_jax.nnx import SparseConv, SparseDense
from sparseprop_jax.sparsify import densify, sparsify


def _resnet():
    return reference_models.ResNet18(10, widths=(8, 16, 16, 24), rngs=nnx.Rngs(0))


def _mixer():
    return reference_models.MLPMixer(10, image_size=12, patch_size=4, dim=16, depth=2,
                                     token_hidden=8, channel_hidden=24, rngs=nnx.Rngs(0))


def _images(n, size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3),
                                                                   dtype=np.float32))


def test_resnet18_is_resnet18():
    model = reference_models.ResNet18(1000, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    # torchvision's resnet18 has 11,689,512 parameters.
    assert sum(p.size for p in jax.tree.leaves(params)) == 11_689_512
    model.eval()
    assert model(_images(1, 64)).shape == (1, 1000)


def test_resnet18_downsamples_like_torchvision():
    model = _resnet()
    model.eval()
    # 7x7/2 stem, 3x3/2 max pool, three stride-2 stages: 32x smaller; odd sizes round up.
    shapes = []
    for size in (33, 64):
        x = _images(2, size)
        x = nnx.max_pool(nnx.relu(model.stem_bn(model.stem_conv(x))), (3, 3), strides=(2, 2),
                         padding=((1, 1), (1, 1)))
        for block in model.blocks:
            x = block(x)
        shapes.append(x.shape)
    assert shapes == [(2, 2, 2, 24), (2, 2, 2, 24)]


def test_mixer_checks_patch_size():
    with pytest.raises(ValueError, match="image_size .* multiple of patch_size"):
        reference_models.MLPMixer(10, image_size=30, patch_size=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("make, skip, size, n_sparse", [
    (_resnet, reference_models.RESNET18_SPARSIFY_SKIP, 32, 19),
    (_mixer, reference_models.MLP_MIXER_SPARSIFY_SKIP, 12, 8),
], ids=["resnet18", "mixer"])
def test_sparse_model_trains_like_its_densified_copy(make, skip, size, n_sparse):
    sparse, report = sparsify(make(), 0.9, skip=skip)
    assert sum(r.is_sparse for r in report) == n_sparse
    assert {r.name for r in report if not r.is_sparse} == set(skip)
    dense = densify(sparse, copy=True)
    kinds = (SparseConv, SparseDense)
    assert not any(isinstance(m, kinds) for _, m in nnx.iter_modules(dense))
    x = _images(5, size)
    y = jnp.arange(5) % 10

    def loss_and_grads(model):
        """Train-mode loss and parameter gradients, as {path: array}."""
        model.train()

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
        return float(loss), {tuple(str(k.key) for k in path): np.asarray(g) for path, g in flat}

    sparse_loss, sparse_grads = loss_and_grads(sparse)
    dense_loss, dense_grads = loss_and_grads(dense)
    assert sparse_loss == pytest.approx(dense_loss, rel=1e-5)
    layers = {tuple(str(k) for k in path): m for path, m in nnx.iter_modules(sparse)
              if isinstance(m, kinds)}
    assert len(layers) == n_sparse
    # Some gradients are zero up to rounding (e.g. a bias whose effect a LayerNorm removes):
    # the absolute tolerance is relative to the largest gradient of the model.
    atol = 1e-5 * max(float(np.max(np.abs(g))) for g in dense_grads.values())
    compared = 0
    for path, grad in sparse_grads.items():
        if path[-1] == "values":
            # The sparse gradient is the dense kernel's gradient on the pattern.
            want = SparseWeight.gather(dense_grads[path[:-1] + ("kernel",)],
                                       layers[path[:-1]].weight.pattern).values
        else:
            want = dense_grads[path]
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=atol, err_msg=str(path))
        compared += 1
    assert compared == len(dense_grads)
