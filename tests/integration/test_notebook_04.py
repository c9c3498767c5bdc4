"""Executes notebooks/04_cross_architecture.ipynb in smoke mode (BRANCHIFY_SMOKE=1) with nbclient."""
from __future__ import annotations

from notebook_runner import NOTEBOOKS, all_stream, assert_committed_with_outputs, execute_smoke

NOTEBOOK = NOTEBOOKS / "04_cross_architecture.ipynb"


def test_notebook_04_committed_with_the_outputs_of_a_full_run():
    assert_committed_with_outputs(NOTEBOOK)


def test_notebook_04_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb, elapsed = execute_smoke(NOTEBOOK, tmp_path / "out", monkeypatch, timeout=120)
    text = all_stream(nb)
    assert "class-count check -> the peers predict different numbers of classes" in text
    assert "max |exported - cohort peer 1|: 0.0" in text
    assert "project_features" in text and "OKDDip on a cohort" in text
    assert "| resnet20 |" in text and "| mobilenetv2_0.5 |" in text and "cycle 0:" in text
    assert elapsed < 60, f"smoke run took {elapsed:.0f} s"
