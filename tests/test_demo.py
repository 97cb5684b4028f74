"""The `python -m sparseprop_jax` demo runs and reports both models."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from sparseprop_jax.__main__ import main  # noqa: E402


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
