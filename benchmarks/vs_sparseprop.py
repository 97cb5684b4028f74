"""Benchmark: ResNet18 training steps and inference against PyTorch and SparseProp's own code.

In one process, samples interleaved, on the same inputs' shapes:

  * PyTorch dense: torchvision's ResNet-18 (written out here: torchvision
    does not import beside the CPU build of torch this project uses), NCHW,
    SGD with momentum, cross-entropy;
  * SparseProp (PyTorch): that model pruned by magnitude to the sparsity on
    every conv but the stem (the classifier stays dense), then
    `sparseprop.utils.swap_modules_with_sparse`, as its users run it (it keeps
    a layer dense where dense measured faster);
  * XLA dense: `sparseprop_jax.reference_models.ResNet18` under XLA;
  * sparseprop_jax: the same model after `sparsify` at the same sparsity,
    skipping the same layers.

Train step: forward, loss, backward and optimizer update. Inference: the
eval-mode forward (BatchNorm on running averages), in images per second.
Needs the `compare` extra (see the README: torch 2.13.0 CPU and
sparseprop 0.1.14, which builds against it).

    python benchmarks/vs_sparseprop.py --threads 2 | tee benchmarks/results/vs_sparseprop.txt
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _threads  # noqa: E402

if __name__ == "__main__":
    _threads.limit_from_argv()  # --threads N: before jax and torch size their thread pools

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import _timing  # noqa: E402
import end_to_end  # noqa: E402
from sparseprop_jax import reference_models  # noqa: E402
from sparseprop_jax.sparsify import sparsify  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
    from sparseprop.utils import swap_modules_with_sparse
except ImportError as err:
    raise SystemExit(f"vs_sparseprop.py needs torch and sparseprop ({err}); install them as "
                     "the README's Benchmarks section says") from None

NUM_CLASSES = end_to_end.NUM_CLASSES
STEM_AND_HEAD = "conv1,fc"  # the layers SparseProp skips: as RESNET18_SPARSIFY_SKIP


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


@torch.no_grad()
def prune_convs(model: torch.nn.Module, sparsity: float) -> None:
    """Uniform magnitude pruning of every conv but the stem (`conv1`)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name != "conv1":
            w = module.weight
            k = int(round(sparsity * w.numel()))
            threshold = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= threshold] = 0.0


class TorchTrainStep:
    def __init__(self, model: torch.nn.Module, x, y):
        self.model, self.x, self.y = model, x, y
        self.model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

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


def run(size: int, sparsity: float, batch: int, min_time: float, min_repeats: int) -> dict:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch)

    torch.manual_seed(0)
    torch_dense = TorchResNet18(NUM_CLASSES)
    torch_sparse = TorchResNet18(NUM_CLASSES)
    torch_sparse.load_state_dict(torch_dense.state_dict())
    prune_convs(torch_sparse, sparsity)
    with contextlib.redirect_stdout(io.StringIO()) as log:  # it prints a line per layer
        torch_sparse = swap_modules_with_sparse(torch_sparse, (batch, 3, size, size),
                                                inplace=True, skip_modules=STEM_AND_HEAD)
    swapped = sum("replaced" in line for line in log.getvalue().splitlines())
    tx = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ty = torch.from_numpy(labels)

    jax_dense = reference_models.ResNet18(NUM_CLASSES, rngs=nnx.Rngs(0))
    jax_sparse, report = sparsify(jax_dense, sparsity, skip=reference_models.RESNET18_SPARSIFY_SKIP,
                                  copy=True)
    jx, jy = jax.numpy.asarray(images), jax.numpy.asarray(labels)
    tx_opt = end_to_end.CONFIGS[0].optimizer()
    peers = {"pytorch dense": torch_dense, "sparseprop": torch_sparse,
             "xla dense": jax_dense, "sparseprop_jax": jax_sparse}
    step_cases, infer_cases = [], []
    for name, model in peers.items():
        if isinstance(model, torch.nn.Module):
            step_cases.append(_timing.Case(name, TorchTrainStep(model, tx, ty)))
            infer_cases.append(_timing.Case(name, TorchInference(model, tx)))
        else:
            step_cases.append(_timing.Case(name, end_to_end.TrainLoop(model, tx_opt, jx, jy)))
            fn, state = end_to_end.forward_fn(model)
            infer_cases.append(_timing.Case(name, fn, state, jx))
    timing = dict(min_time=min_time, min_repeats=min_repeats)
    step, infer = _timing.run_interleaved(step_cases, **timing), \
        _timing.run_interleaved(infer_cases, **timing)
    return {"size": size, "sparsity": sparsity, "batch": batch,
            "sparseprop_sparse_layers": swapped,
            "sparseprop_jax_sparse_layers": sum(r.is_sparse for r in report),
            "train_step": {k: _timing.summarize(v) for k, v in step.items()},
            "inference": {k: _timing.summarize(v) for k, v in infer.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_timing.comma_list(int), default=(64, 128))
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=end_to_end.BATCH)
    parser.add_argument("--min-time", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5, help="minimum samples per measurement")
    parser.add_argument("--threads", type=int, help="run on this many CPUs (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    info = _timing.machine_info()
    print(f"# {_timing.machine_summary(info)}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"# ResNet18, {NUM_CLASSES} classes, batch {args.batch}, sparsity {args.sparsity} on "
          f"every conv but the stem; medians; ratio = peer / sparseprop_jax")
    table = _timing.TablePrinter([("image", 7, "s"), ("measure", 14, "s"), ("peer", 14, "s"),
                                  ("ms", 9, ".1f"), ("images/s", 9, ".0f"), ("ratio", 6, ".2f")])
    table.header()
    results = []
    for size in args.sizes:
        r = run(size, args.sparsity, args.batch, args.min_time, args.repeats)
        results.append(r)
        for measure in ("train_step", "inference"):
            ours = r[measure]["sparseprop_jax"]["median_ms"]
            for peer, stats in r[measure].items():
                ms = stats["median_ms"]
                table.row([f"{size}x{size}", measure, peer, ms, args.batch / ms * 1e3, ms / ours])
        print(f"# {size}x{size}: SparseProp made {r['sparseprop_sparse_layers']} layers sparse, "
              f"sparsify {r['sparseprop_jax_sparse_layers']}")
    if args.json:
        _timing.write_json(args.json, {"machine": info, "torch": torch.__version__,
                                       "results": results})


if __name__ == "__main__":
    main()
