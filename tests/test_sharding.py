"""Data parallelism on 4 host devices: the batch split, the sparse weights replicated.

The checks run in one subprocess (tests/sharding_worker.py) that forces 4 CPU
devices; this pytest process keeps its single device. Each model's loss and
gradients must equal the single-device step, under `jit` with `NamedSharding`
(auto and explicit mesh axes) and under `shard_map`, and the compiled steps must
run the sparse custom calls on each device's shard without gathering the batch.
The controls show what the package's calls did when issued naively, so these
checks can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
TOL = 1e-5
MODES = ("jit_auto", "jit_explicit", "shard_map", "shard_map_no_check_vma")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, WORKER], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["dense", "conv"])
@pytest.mark.parametrize("mode", MODES)
def test_sharded_step_equals_single_device(results, model, mode):
    assert results[model][mode]["err"] < TOL


@pytest.mark.parametrize("model", ["dense", "conv"])
@pytest.mark.parametrize("mode", MODES)
def test_each_device_computes_its_shard(results, model, mode):
    r = results[model][mode]
    assert r["all_gather"] == 0 and r["all_to_all"] == 0
    # Every sparse custom call sees the local batch: 16 (dense) or 12 (conv) over 4 devices.
    # (The dense model's first layer sees it as 3 x 4 rows.)
    local, full = {"dense": (4, 16), "conv": (3, 12)}[model]
    calls = r["custom_call_results"]
    assert calls and all(f"f32[{full}," not in c and f",{full}]" not in c for c in calls), calls
    assert any(f"f32[{local}," in c for c in calls), calls


@pytest.mark.parametrize("model", ["dense", "conv"])
@pytest.mark.parametrize("mode", MODES)
def test_values_gradients_all_reduced_once(results, model, mode):
    assert results[model][mode]["values_all_reduced"] == [1] * len(results[model]["nnz"])


@pytest.mark.parametrize("model", ["dense", "conv"])
def test_control_unpartitioned_calls_gather_the_batch(results, model):
    # The same step with the custom calls issued as plain ffi_calls: XLA cannot
    # split an opaque custom call, so it gathers the batch and runs it whole.
    naive = results[model]["jit_naive"]
    assert naive["all_gather"] > 0
    assert naive["values_all_reduced"] == [0] * len(results[model]["nnz"])


@pytest.mark.parametrize("model", ["dense", "conv"])
def test_control_invariant_results_break_shard_map(results, model):
    # With results declared by a plain ShapeDtypeStruct (device-invariant), JAX
    # all-reduces the cotangents of the sparse outputs inside shard_map: the
    # gradients are silently wrong, or jax rejects the custom_vjp's types.
    naive = results[model]["shard_map_naive"]
    assert "error" in naive or naive["err"] > 1e-3, naive
