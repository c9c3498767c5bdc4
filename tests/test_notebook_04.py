"""Executes notebooks/04_cross_architecture.ipynb in smoke mode (BRANCHIFY_SMOKE=1) with nbclient."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_cross_architecture.ipynb"


def test_notebook_04_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "clear the outputs"


def test_notebook_04_runs_in_smoke_mode(monkeypatch):
    monkeypatch.setenv("BRANCHIFY_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    elapsed = time.perf_counter() - start
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "class-count check -> the peers predict different numbers of classes" in text
    assert "max |exported - cohort peer 1|: 0.0" in text
    assert "project_features" in text and "OKDDip on a cohort" in text
    assert "| resnet20 |" in text and "| mobilenetv2_0.5 |" in text and "cycle 0:" in text
    assert elapsed < 60, f"smoke run took {elapsed:.0f} s"
