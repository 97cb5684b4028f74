"""`keep_freed_memory`: a jitted op stops faulting its buffers back in; late calls warn.

The probe reports the median of the faults of single calls once warm: with
the memory kept, a call now and then still grows the heap (a new peak of
buffers alive at once when other work shares the CPUs), but most fault
nothing; by default every call faults its result afresh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sparseprop_jax.allocator import KEEP_FREED_MEMORY_TUNABLES

# Page faults per call of a jitted op with a 64 MiB result, once warm (median of 11 calls).
_PROBE = """
import json, resource, sys, warnings
import sparseprop_jax as sp
import jax, jax.numpy as jnp
if sys.argv[1] == "late":
    jnp.ones(3).block_until_ready()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kept = sp.keep_freed_memory() if sys.argv[1] != "default" else None
step = jax.jit(lambda x: jnp.sin(x) * 2.0 + x)
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(30):  # the heap grows to cover the working set
    step(x).block_until_ready()
per_call = []
for _ in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(per_call)[len(per_call) // 2]
print(json.dumps({"kept": kept, "faults": faults, "per_call": per_call,
                  "warnings": [str(w.message) for w in caught]}))
"""


def _probe(mode: str, cwd, env: dict | None = None) -> dict:
    # Run outside the checkout, so that the installed package is imported, not the source tree.
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused(tmp_path):
    default, kept = _probe("default", tmp_path), _probe("keep", tmp_path)
    # By default each call maps the result's 16384 pages afresh.
    assert default["faults"] > 8000, default
    assert kept["kept"] is True and not kept["warnings"], kept
    assert kept["faults"] < 500, kept


def test_too_late_warns_and_changes_nothing(tmp_path):
    late = _probe("late", tmp_path)
    assert late["kept"] is False
    assert any("before the first JAX computation" in w for w in late["warnings"]), late
    assert late["faults"] > 8000, late


def test_the_tunables_do_the_same_for_an_unchanged_program(tmp_path):
    tuned = _probe("default", tmp_path, {"GLIBC_TUNABLES": KEEP_FREED_MEMORY_TUNABLES})
    assert tuned["faults"] < 500, tuned
