"""Reference models in flax.nnx for the end-to-end benchmarks and notebooks.

Both are built from the standard `nnx.Conv` / `nnx.Linear` layers, as a user's
model would be; `sparseprop_jax.sparsify.sparsify` then swaps in the sparse
layers. `SPARSIFY_SKIP` names the layers that stay dense in the benchmarks
(the stem and the classifier, as in the SparseProp paper).

- `ResNet18`: torchvision's ResNet-18 in NHWC with BatchNorm (7x7/2 stem,
  3x3/2 max pool, four stages of two basic blocks, global average pool). Its
  stem's BatchNorm, ReLU and max pool go through
  `sparseprop_jax.nnx.batch_norm_relu_max_pool`: Flax's values, gradients and
  running averages, with a faster backward.
- `MLPMixer`: an MLP-Mixer (Tolstikhin et al., 2021) over image patches: the
  token- and channel-mixing MLPs hold almost all of its weights and FLOPs. Its
  token mixing applies a sparse layer along the tokens axis in place
  (`feature_axis=-2`), a dense one between two swapaxes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparseprop_jax.nnx import SparseDense, batch_norm_relu_max_pool

# fnmatch patterns for `sparsify(skip=...)`: the layers kept dense.
RESNET18_SPARSIFY_SKIP = ("stem_conv", "head")
MLP_MIXER_SPARSIFY_SKIP = ("patch_embed", "head")


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, dtype, rngs: nnx.Rngs):
    """A bias-free conv with torchvision's symmetric padding, and its BatchNorm."""
    pad = (kernel - 1) // 2
    conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=dtype, rngs=rngs)
    # momentum 0.9 is PyTorch's 0.1 in flax's convention.
    return conv, nnx.BatchNorm(cout, momentum=0.9, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1/stride conv-BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride, dtype, rngs)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1, dtype, rngs)
        if stride != 1 or cin != cout:
            self.shortcut_conv, self.shortcut_bn = _conv_bn(cin, cout, 1, stride, dtype, rngs)
        else:
            self.shortcut_conv = self.shortcut_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return nnx.relu(y + shortcut)


class ResNet18(nnx.Module):
    """ResNet-18 for NHWC images; `model.train()` / `model.eval()` switch BatchNorm.

    `dtype` is every layer's computation dtype (Flax's; None infers it):
    `jnp.bfloat16` trains in mixed precision, the parameters staying float32.
    """

    def __init__(self, num_classes: int = 1000, *, in_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512), dtype=None, rngs: nnx.Rngs):
        self.stem_conv, self.stem_bn = _conv_bn(in_channels, widths[0], 7, 2, dtype, rngs)
        blocks = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, dtype=dtype, rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = batch_norm_relu_max_pool(self.stem_bn, self.stem_conv(x), (3, 3), strides=(2, 2),
                                     padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(-3, -2)))


def _across_tokens(layer: nnx.Module, x: jax.Array) -> jax.Array:
    """A linear layer along the tokens axis of `x` `[..., tokens, dim]`.

    A `SparseDense` contracts that axis in place (`feature_axis=-2`): no
    transposes around its custom calls. A dense `nnx.Linear` goes between two
    swapaxes, which XLA folds into its dots.
    """
    if isinstance(layer, SparseDense):
        return layer(x, feature_axis=-2)
    return jnp.swapaxes(layer(jnp.swapaxes(x, -1, -2)), -1, -2)


class MixerBlock(nnx.Module):
    """LayerNorm, token-mixing MLP (across patches), LayerNorm, channel-mixing MLP."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int, *,
                 dtype=None, rngs: nnx.Rngs):
        self.token_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.token_fc1 = nnx.Linear(tokens, token_hidden, dtype=dtype, rngs=rngs)
        self.token_fc2 = nnx.Linear(token_hidden, tokens, dtype=dtype, rngs=rngs)
        self.channel_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.channel_fc1 = nnx.Linear(dim, channel_hidden, dtype=dtype, rngs=rngs)
        self.channel_fc2 = nnx.Linear(channel_hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., tokens, dim]
        y = self.token_norm(x)
        x = x + _across_tokens(self.token_fc2, nnx.gelu(_across_tokens(self.token_fc1, y)))
        y = self.channel_norm(x)
        return x + self.channel_fc2(nnx.gelu(self.channel_fc1(y)))


class MLPMixer(nnx.Module):
    """MLP-Mixer for NHWC images of `image_size` x `image_size` pixels; `dtype` as in
    `ResNet18`."""

    def __init__(self, num_classes: int = 10, *, image_size: int = 32, patch_size: int = 4,
                 in_channels: int = 3, dim: int = 256, depth: int = 8, token_hidden: int = 128,
                 channel_hidden: int = 1024, dtype=None, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"MLPMixer: image_size ({image_size}) must be a multiple of "
                             f"patch_size ({patch_size})")
        self.patch_size = patch_size
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nnx.Linear(patch_size * patch_size * in_channels, dim, dtype=dtype,
                                      rngs=rngs)
        self.blocks = nnx.List([MixerBlock(tokens, dim, token_hidden, channel_hidden,
                                           dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        *batch, height, width, channels = x.shape
        p = self.patch_size
        patches = x.reshape(*batch, height // p, p, width // p, p, channels)
        patches = jnp.moveaxis(patches, -4, -3).reshape(*batch, (height // p) * (width // p),
                                                        p * p * channels)
        x = self.patch_embed(patches)
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=-2))
