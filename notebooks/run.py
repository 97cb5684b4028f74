"""Executes the notebooks top to bottom, as CI and the committed outputs do.

    python notebooks/run.py                 # every notebook, full size, outputs saved in place
    python notebooks/run.py --small         # small-size mode, outputs discarded (what CI runs)
    python notebooks/run.py 02_sparse_transfer.ipynb --small

Small-size mode sets the environment variable SPARSEPROP_NOTEBOOK_SMALL=1 for
the kernel; each notebook reads it and shrinks its data, models and loops so
that it runs in well under two minutes. A full-size run records
`"sparseprop_jax": {"small": false}` in the notebook's metadata, which the
tests check for the committed copies. Cells run in the notebook's folder, so
relative paths behave as in Jupyter.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
SMALL_ENV = "SPARSEPROP_NOTEBOOK_SMALL"


def notebooks() -> list[pathlib.Path]:
    """The project's notebooks, in their numbered order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def execute(path: pathlib.Path, *, small: bool, timeout: int = 1800):
    """Runs every cell of the notebook at `path`; returns the executed notebook.

    Raises `nbclient.exceptions.CellExecutionError` (with the cell's
    traceback) if a cell fails.
    """
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get(SMALL_ENV)
    os.environ[SMALL_ENV] = "1" if small else "0"  # the kernel inherits this environment
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        if env_before is None:
            del os.environ[SMALL_ENV]
        else:
            os.environ[SMALL_ENV] = env_before
    nb.metadata["sparseprop_jax"] = {"small": small}
    return nb


def main(argv: Optional[Sequence[str]] = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--small", action="store_true",
                        help=f"small-size mode ({SMALL_ENV}=1); outputs are not saved")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [NOTEBOOK_DIR / name for name in args.names] if args.names else notebooks()
    for path in paths:
        if not path.is_file():
            parser.error(f"no notebook {path}")
    for path in paths:
        start = time.perf_counter()
        nb = execute(path, small=args.small, timeout=args.timeout)
        if not args.small:
            nbformat.write(nb, path)
        print(f"{path.name}: ran in {time.perf_counter() - start:.0f} s"
              f"{' (small)' if args.small else ', outputs saved'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
