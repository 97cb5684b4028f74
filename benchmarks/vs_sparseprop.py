"""Benchmark: whole models' training steps and inference against PyTorch and SparseProp.

For ResNet18 and the MLP-Mixer of `benchmarks/end_to_end.py`, in one process,
samples interleaved, on inputs of the same shapes:

  * PyTorch dense: the same architecture in PyTorch (written out here:
    torchvision does not import beside the CPU build of torch this project
    uses; the ResNet is torchvision's resnet18, NCHW), with the optimizer of
    end_to_end.py (SGD with momentum for ResNet18, AdamW for the Mixer);
  * SparseProp (PyTorch): that model pruned by magnitude to the sparsity on
    every layer `sparsify` makes sparse (not the stem or patch embedding, not
    the classifier), then `sparseprop.utils.swap_modules_with_sparse`, as its
    users run it (it keeps a layer dense where dense measured faster);
  * XLA dense: the `sparseprop_jax.reference_models` model under XLA;
  * sparseprop_jax: that model after `sparsify` at the same sparsity,
    skipping the same layers.

Train step: forward, loss, backward and optimizer update. Inference: the
eval-mode forward (BatchNorm on running averages), in images per second.

Then each layer alone (`--layers`; the shapes of `benchmarks/linear.py` and
the ResNet18 conv layers of `benchmarks/conv2d.py`, at the same sparsity):
forward and both gradients (input and weight), pruned by magnitude, for the
same four peers. SparseProp's layer is what `swap_modules_with_sparse` makes
of it (it may keep the layer dense, as it would in a model).
Needs the `compare` extra (see the README: torch 2.13.0 CPU and
sparseprop 0.1.14, which builds against it).

    python benchmarks/vs_sparseprop.py --threads 2 --json benchmarks/results/vs_sparseprop.json \
        | tee benchmarks/results/vs_sparseprop.txt
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _threads  # noqa: E402

if __name__ == "__main__":
    _threads.limit_from_argv()  # --threads N: before jax and torch size their thread pools

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _timing  # noqa: E402
import conv2d  # noqa: E402
import end_to_end  # noqa: E402
import linear  # noqa: E402
from sparseprop_jax import SparseWeight, keep_freed_memory  # noqa: E402
from sparseprop_jax.distribution import magnitude_masks  # noqa: E402
from sparseprop_jax.sparsify import sparsify  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from sparseprop.utils import swap_modules_with_sparse
except ImportError as err:
    raise SystemExit(f"vs_sparseprop.py needs torch and sparseprop ({err}); install them as "
                     "the README's Benchmarks section says") from None

NUM_CLASSES = end_to_end.NUM_CLASSES


class BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(torch.nn.Module):
    """torchvision's resnet18 (same layers, names and initialisation of the convs)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        layers, cin = [], 64
        for stage, width in enumerate((64, 128, 256, 512)):
            blocks = [BasicBlock(cin, width, 2 if stage > 0 else 1), BasicBlock(width, width, 1)]
            layers.append(torch.nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = torch.nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MixerBlock(torch.nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.token_norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.token_fc1 = torch.nn.Linear(tokens, token_hidden)
        self.token_fc2 = torch.nn.Linear(token_hidden, tokens)
        self.channel_norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.channel_fc1 = torch.nn.Linear(dim, channel_hidden)
        self.channel_fc2 = torch.nn.Linear(channel_hidden, dim)

    def forward(self, x):  # x: [batch, tokens, dim]
        y = self.token_norm(x).transpose(1, 2)
        y = self.token_fc2(F.gelu(self.token_fc1(y), approximate="tanh"))
        x = x + y.transpose(1, 2)
        y = self.channel_fc2(F.gelu(self.channel_fc1(self.channel_norm(x)), approximate="tanh"))
        return x + y


class TorchMLPMixer(torch.nn.Module):
    """`reference_models.MLPMixer` (LayerNorm epsilon and tanh GELU as Flax's)."""

    def __init__(self, num_classes: int, image_size: int, patch_size: int = 4, dim: int = 256,
                 depth: int = 8, token_hidden: int = 128, channel_hidden: int = 1024):
        super().__init__()
        self.patch_size = patch_size
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = torch.nn.Linear(patch_size * patch_size * 3, dim)
        self.blocks = torch.nn.Sequential(*[
            MixerBlock(tokens, dim, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x):  # x: NCHW images
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        x = self.patch_embed(patches.reshape(b, (h // p) * (w // p), p * p * c))
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


@dataclasses.dataclass(frozen=True)
class Family:
    """A model in both frameworks, the layers both leave dense, and its optimizer."""

    name: str
    config: end_to_end.Config  # the JAX model and optimizer
    torch_skip: tuple[str, ...]  # as the config's skip, in the PyTorch model's names

    def torch_model(self) -> torch.nn.Module:
        if self.config.family == "resnet18":
            return TorchResNet18(NUM_CLASSES)
        return TorchMLPMixer(NUM_CLASSES, self.config.image_size)

    def torch_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        if self.config.family == "resnet18":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)


FAMILIES = {
    "resnet18-64": Family("resnet18 64x64", end_to_end.CONFIGS[0], ("conv1", "fc")),
    "resnet18-128": Family("resnet18 128x128", end_to_end.CONFIGS[1], ("conv1", "fc")),
    "mixer": Family("mixer 32x32", end_to_end.CONFIGS[2], ("patch_embed", "head")),
}


@torch.no_grad()
def prune(model: torch.nn.Module, sparsity: float, skip: tuple[str, ...]) -> None:
    """Uniform magnitude pruning of every conv and linear layer not in `skip`."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name not in skip:
            w = module.weight
            k = int(round(sparsity * w.numel()))
            threshold = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= threshold] = 0.0


class TorchTrainStep:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x, y):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y
        self.model.train()

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class TorchInference:
    def __init__(self, model: torch.nn.Module, x):
        self.model, self.x = model, x

    @torch.no_grad()
    def __call__(self):
        self.model.eval()
        return self.model(self.x)


def run(family: Family, sparsity: float, batch: int, min_time: float,
        min_repeats: int) -> dict:
    size = family.config.image_size
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch)

    torch.manual_seed(0)
    torch_dense = family.torch_model()
    torch_sparse = family.torch_model()
    torch_sparse.load_state_dict(torch_dense.state_dict())
    prune(torch_sparse, sparsity, family.torch_skip)
    with contextlib.redirect_stdout(io.StringIO()) as log:  # it prints a line per layer
        torch_sparse = swap_modules_with_sparse(torch_sparse, (batch, 3, size, size),
                                                inplace=True,
                                                skip_modules=",".join(family.torch_skip))
    swapped = sum("replaced" in line for line in log.getvalue().splitlines())
    tx = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ty = torch.from_numpy(labels)

    jax_dense = family.config.build(0)
    jax_sparse, report = sparsify(jax_dense, sparsity, skip=family.config.skip, copy=True)
    jx, jy = jax.numpy.asarray(images), jax.numpy.asarray(labels)
    peers = {"pytorch dense": torch_dense, "sparseprop": torch_sparse,
             "xla dense": jax_dense, "sparseprop_jax": jax_sparse}
    step_cases, infer_cases = [], []
    for name, model in peers.items():
        if isinstance(model, torch.nn.Module):
            step = TorchTrainStep(model, family.torch_optimizer(model), tx, ty)
            step_cases.append(_timing.Case(name, step))
            infer_cases.append(_timing.Case(name, TorchInference(model, tx)))
        else:
            loop = end_to_end.TrainLoop(model, family.config.optimizer(), jx, jy)
            step_cases.append(_timing.Case(name, loop))
            fn, state = end_to_end.forward_fn(model)
            infer_cases.append(_timing.Case(name, fn, state, jx))
    timing = dict(min_time=min_time, min_repeats=min_repeats)
    steps = _timing.run_interleaved(step_cases, **timing)
    forwards = _timing.run_interleaved(infer_cases, **timing)
    return {"model": family.name, "sparsity": sparsity, "batch": batch,
            "sparseprop_sparse_layers": swapped,
            "sparseprop_jax_sparse_layers": sum(r.is_sparse for r in report),
            "train_step": {k: _timing.summarize(v) for k, v in steps.items()},
            "inference": {k: _timing.summarize(v) for k, v in forwards.items()}}


# -- single layers -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer of the per-layer section: a linear shape or a 3x3 conv layer."""

    label: str
    kernel_shape: tuple[int, ...]  # Flax's: (in, out) or HWIO
    x_shape: tuple[int, ...]  # NHWC for convs
    y_shape: tuple[int, ...]
    stride: int = 1


def layer_cases(batch: int) -> list[LayerCase]:
    cases = [LayerCase(f"linear {b}x{i}->{o}", (i, o), (b, i), (b, o))
             for b, i, o in linear.DEFAULT_SHAPES]
    cases += [LayerCase(f"conv {layer.label} B={batch}", layer.kernel_shape,
                        (batch, layer.h, layer.w, layer.cin),
                        (batch, *layer.out_hw, layer.cout), layer.stride)
              for layer in conv2d.DEFAULT_LAYERS]
    return cases


class TorchLayerPass:
    """Forward and both gradients of one torch layer."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, ct_shape):
        self.module, self.x = module, x.clone().requires_grad_(True)
        self.ct = torch.randn(ct_shape)

    def __call__(self):
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)
        y = self.module(self.x)
        y.backward(self.ct)
        return y.detach()


def _torch_layer(case: LayerCase, kernel: np.ndarray) -> torch.nn.Module:
    conv = len(case.kernel_shape) == 4
    if conv:
        kh, _, cin, cout = case.kernel_shape
        module = torch.nn.Conv2d(cin, cout, kh, stride=case.stride, padding=kh // 2, bias=False)
        weight = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    else:
        module = torch.nn.Linear(*case.kernel_shape, bias=False)
        weight = kernel.T
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    return module


def run_layer(case: LayerCase, sparsity: float, min_time: float, min_repeats: int) -> dict:
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal(case.kernel_shape, dtype=np.float32)
              / np.sqrt(np.prod(case.kernel_shape[:-1])))
    kernel = np.where(magnitude_masks([kernel], sparsity)[0], kernel, 0.0).astype(np.float32)
    x = rng.standard_normal(case.x_shape, dtype=np.float32)
    conv = len(case.kernel_shape) == 4
    torch_x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if conv else x)
    dense = _torch_layer(case, kernel)
    sparse = torch.nn.Sequential(_torch_layer(case, kernel))
    with contextlib.redirect_stdout(io.StringIO()) as log:
        sparse = swap_modules_with_sparse(sparse, tuple(torch_x.shape), inplace=True)
    kept_dense = "replaced" not in log.getvalue()
    torch_ct = tuple(dense(torch_x).shape)

    jx, jkernel = jax.numpy.asarray(x), jax.numpy.asarray(kernel)
    weight = SparseWeight.from_dense(jkernel)
    ct = jax.numpy.asarray(rng.standard_normal(case.y_shape, dtype=np.float32))
    if conv:
        xla = (conv2d.dense_fns(case.stride)["fb"], jx, jkernel, ct)
        ours = (conv2d.sparse_fns("auto", case.stride)["fb"], jx, weight.values, weight, ct)
    else:
        xla = (linear.dense_fwdbwd, jx, jkernel, ct)
        ours = (linear.sparse_fwdbwd, jx, weight.values, weight, ct)
    cases = [_timing.Case("pytorch dense", TorchLayerPass(dense, torch_x, torch_ct)),
             _timing.Case("sparseprop", TorchLayerPass(sparse, torch_x, torch_ct)),
             _timing.Case("xla dense", *xla), _timing.Case("sparseprop_jax", *ours)]
    samples = _timing.run_interleaved(cases, min_time=min_time, min_repeats=min_repeats)
    return {"layer": case.label, "sparsity": sparsity, "sparseprop_kept_dense": kept_dense,
            "fwd_bwd": {k: _timing.summarize(v) for k, v in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_timing.comma_list(str), default=tuple(FAMILIES),
                        help=f"comma-separated, of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=end_to_end.BATCH)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5, help="minimum samples per measurement")
    parser.add_argument("--threads", type=int, help="run on this many CPUs (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each layer alone (default: on)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call sparseprop_jax.keep_freed_memory() first (the whole process, "
                             "PyTorch too, then allocates from a heap that keeps freed memory)")
    args = parser.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory: keep_freed_memory() took no effect here")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    info = _timing.machine_info()
    info["keep_freed_memory"] = args.keep_freed_memory
    print(f"# {_timing.machine_summary(info)}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)"
          + (", malloc keeps freed memory" if args.keep_freed_memory else ""))
    unknown = sorted(set(args.models) - set(FAMILIES))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(FAMILIES)}")
    print(f"# {NUM_CLASSES} classes, batch {args.batch}, sparsity {args.sparsity} on every layer "
          f"but the stem (patch embedding) and the classifier; medians; "
          f"ratio = peer ms / sparseprop_jax ms")
    table = _timing.TablePrinter([("model", 16, "s"), ("measure", 10, "s"), ("peer", 14, "s"),
                                  ("ms", 9, ".1f"), ("images/s", 9, ".0f"), ("ratio", 6, ".2f")])
    table.header()
    results = []
    for key in args.models:
        r = run(FAMILIES[key], args.sparsity, args.batch, args.min_time, args.repeats)
        results.append(r)
        for measure in ("train_step", "inference"):
            ours = r[measure]["sparseprop_jax"]["median_ms"]
            for peer, stats in r[measure].items():
                ms = stats["median_ms"]
                table.row([r["model"], measure, peer, ms, args.batch / ms * 1e3, ms / ours])
        print(f"# {r['model']}: SparseProp made {r['sparseprop_sparse_layers']} layers sparse, "
              f"sparsify {r['sparseprop_jax_sparse_layers']}")
    layers = []
    if args.layers:
        print(f"\n# each layer alone: forward + input and weight gradients, sparsity "
              f"{args.sparsity}, ms (medians); ratio = peer ms / sparseprop_jax ms; * = "
              "SparseProp kept the layer dense")
        columns = [("layer", 28, "s")]
        for peer in ("pytorch dense", "sparseprop", "xla dense", "sparseprop_jax"):
            columns += [(peer, 14, ".2f")] + ([("ratio", 6, ".2f")] if peer != "sparseprop_jax"
                                              else [])
        layer_table = _timing.TablePrinter(columns)
        layer_table.header()
        for case in layer_cases(args.batch):
            r = run_layer(case, args.sparsity, min(args.min_time, 1.0), args.repeats)
            layers.append(r)
            ms = {k: v["median_ms"] for k, v in r["fwd_bwd"].items()}
            ours = ms["sparseprop_jax"]
            label = case.label + (" *" if r["sparseprop_kept_dense"] else "")
            layer_table.row([label, ms["pytorch dense"], ms["pytorch dense"] / ours,
                             ms["sparseprop"], ms["sparseprop"] / ours, ms["xla dense"],
                             ms["xla dense"] / ours, ours])
    if args.json:
        _timing.write_json(args.json, {"machine": info, "torch": torch.__version__,
                                       "results": results, "layers": layers})


if __name__ == "__main__":
    main()
