"""The notebooks run top to bottom in small-size mode; the committed copies are full-size runs.

Each notebook is executed in a fresh kernel by `notebooks/run.py` (nbclient)
with SPARSEPROP_NOTEBOOK_SMALL=1; a cell that raises fails the test with the
cell's traceback. The saved outputs are not compared: they hold timings.
"""

import importlib.util
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "notebooks" / "run.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)

NOTEBOOKS = runner.notebooks()
EXPECTED = ["01_layer_speedups.ipynb", "02_sparse_transfer.ipynb", "03_gmp_from_scratch.ipynb",
            "04_resnet18_end_to_end.ipynb"]


def test_the_four_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path):
    nb = runner.execute(path, small=True, timeout=600)
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_holds_a_full_size_run(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("sparseprop_jax") == {"small": False}, (
        f"{path.name}: commit it as saved by `python notebooks/run.py {path.name}` (full size)")
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code)
    assert not [o for cell in code for o in cell.get("outputs", [])
                if o.get("output_type") == "error"]
    # In order, top to bottom, in one kernel.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
