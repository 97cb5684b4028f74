"""Two processes on 127.0.0.1 with `jax.distributed` (gloo CPU collectives) train the
same sparse MLP on different shards of every batch, with examples/data_parallel.py.

Their parameters must stay identical and equal one process trained on the full
batches (computed here, on this process's single device).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "data_parallel.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("data_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference(example):
    return example.train(12, 64, log=lambda msg: None)[0]


# jit + shardings with one device per process; shard_map with two per process
# (4 devices: collectives both within and across the processes).
@pytest.mark.parametrize("mode, local_devices", [("jit", 1), ("shard_map", 2)])
def test_two_processes_match_one(example, reference, tmp_path, mode, local_devices):
    outs = example.launch(2, 12, 64, mode, str(tmp_path), timeout=180,
                          local_devices=local_devices)
    # compare() raises unless both processes hold bit-identical parameters.
    assert example.compare(outs, reference) < 1e-5
