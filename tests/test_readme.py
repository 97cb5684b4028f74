"""The README's quick start runs as printed, and the values it quotes are the code's."""

from __future__ import annotations

import pathlib
import re

from sparseprop_jax.allocator import KEEP_FREED_MEMORY_TUNABLES

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python block"
    return blocks


def test_quick_start_runs(capsys):
    quick_start = _python_blocks()[0]
    assert len(quick_start.strip().splitlines()) <= 15
    exec(compile(quick_start, str(README), "exec"), {})
    assert "sparsity=0.95" in capsys.readouterr().out


def test_workflow_example_runs(capsys):
    """The sparse-training-workflow example: sparsify, GMP, checkpoint, densify."""
    (example,) = [b for b in _python_blocks() if "from sparseprop_jax.sparsify import" in b]
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    assert "hidden" in capsys.readouterr().out  # the printed sparsify report
    kernel = scope["dense_model"].hidden.kernel[...]  # densified after GMP to 90%
    assert float((kernel == 0).mean()) >= 0.89


def test_quotes_the_keep_freed_memory_tunables():
    assert f"GLIBC_TUNABLES={KEEP_FREED_MEMORY_TUNABLES}`" in README.read_text()


def test_mixed_precision_example_runs():
    """The bfloat16 section's layer: float32 values, bfloat16 outputs."""
    import jax.numpy as jnp
    from flax import nnx

    from sparseprop_jax.nnx import SparseDense

    (example,) = [b for b in _python_blocks() if "param_dtype=jnp.float32" in b]
    scope = {"jnp": jnp, "nnx": nnx, "SparseDense": SparseDense}
    exec(compile(example, str(README), "exec"), scope)
    layer = scope["layer"]
    assert layer.values[...].dtype == jnp.float32
    assert layer(jnp.ones((2, 784))).dtype == jnp.bfloat16
