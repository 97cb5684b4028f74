"""The smoke test of an installed wheel: import, one jitted jax.grad through SparseDense.

Run from outside the checkout (whose source tree has no compiled extension).
The gradient is checked against the same layer made dense (nnx.Linear).
"""

import sys

import jax
import jax.numpy as jnp
from flax import nnx

import sparseprop_jax as sp
from sparseprop_jax.nnx import SparseDense

layer = SparseDense(16, 8, sparsity=0.9, rngs=nnx.Rngs(0))
x = jnp.linspace(-1.0, 1.0, 64).reshape(4, 16)


def loss(model):
    return jnp.sum(model(x) ** 2)


grads = nnx.jit(nnx.grad(loss))(layer)
want = nnx.grad(loss)(layer.to_dense())
got = sp.SparseWeight(grads["values"][...], layer.pattern.get_value()).to_dense()
mask = layer.weight.to_dense() != 0
assert bool(jnp.all(jnp.isfinite(got))) and float(jnp.abs(got).max()) > 0
assert jnp.allclose(got, jnp.where(mask, want.kernel[...], 0), rtol=1e-5, atol=1e-5)
print(f"smoke test passed: Python {sys.version.split()[0]}, jax {jax.__version__}, "
      f"sparseprop_jax {sp.__version__}, {sp.simd_path()} path")
