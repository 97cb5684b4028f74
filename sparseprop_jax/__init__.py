"""sparseprop_jax: sparse backpropagation for JAX and Flax on CPUs.

Sparse layers whose forward pass, input gradient and weight gradient all cost
O(batch x nnz), run by C++ routines registered as XLA FFI custom calls.
"""

from sparseprop_jax.runtime import (
    cached_memory_bytes,
    release_cached_memory,
    set_simd_path,
    set_tasks_per_call,
    tasks_per_call,
    use_simd_path,
    simd_path,
    supported_simd_paths,
)
from sparseprop_jax.allocator import keep_freed_memory
from sparseprop_jax.conv import sparse_conv2d
from sparseprop_jax.dense_conv import conv_general_dilated
from sparseprop_jax.linear import sparse_linear
from sparseprop_jax.norm_pool import batch_norm_relu_max_pool
from sparseprop_jax.pooling import max_pool
from sparseprop_jax.sparse_weight import SparseWeight, SparsityPattern

__version__ = "0.1.0"

__all__ = [
    "SparseWeight",
    "SparsityPattern",
    "batch_norm_relu_max_pool",
    "cached_memory_bytes",
    "conv_general_dilated",
    "keep_freed_memory",
    "max_pool",
    "release_cached_memory",
    "set_simd_path",
    "simd_path",
    "sparse_conv2d",
    "sparse_linear",
    "supported_simd_paths",
    "set_tasks_per_call",
    "tasks_per_call",
    "use_simd_path",
]
