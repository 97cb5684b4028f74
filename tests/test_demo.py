"""The demo (`sparseprop-jax-demo`, `python -m sparseprop_jax`) runs and reports both models."""

from __future__ import annotations

import re
import sys
from importlib import metadata

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from sparseprop_jax.__main__ import cli, main  # noqa: E402


def test_demo_prints_both_accuracies(capsys):
    results = main(["--epochs", "1", "--sparsity", "0.9", "--seed", "1"])
    out = capsys.readouterr().out
    assert set(results) == {"sparse (90%)", "dense"}
    for name, (accuracy, ms_per_step) in results.items():
        assert 0.0 <= accuracy <= 1.0 and ms_per_step > 0.0
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d+%\s+\d+\.\d+$", out, re.MULTILINE), out
    # One epoch already learns something (chance is 10%).
    assert results["sparse (90%)"][0] > 0.5


def test_demo_rejects_bad_sparsity(capsys):
    with pytest.raises(SystemExit):
        main(["--sparsity", "1.5"])
    assert "--sparsity must be in [0, 1]" in capsys.readouterr().err


def test_demo_command_runs_the_demo_on_the_command_line(monkeypatch, capsys):
    # The installed console script points at cli, which reads sys.argv.
    (script,) = metadata.entry_points(group="console_scripts", name="sparseprop-jax-demo")
    assert script.load() is cli
    monkeypatch.setattr(sys, "argv", ["sparseprop-jax-demo", "--sparsity", "1.5"])
    with pytest.raises(SystemExit):
        cli()
    assert "--sparsity must be in [0, 1]" in capsys.readouterr().err
