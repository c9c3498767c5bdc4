"""Executes notebooks/03_hf_trainer.ipynb in smoke mode (BRANCHIFY_SMOKE=1) with nbclient."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_hf_trainer.ipynb"


def test_notebook_03_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "clear the outputs"


def test_notebook_03_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHIFY_SMOKE", "1")
    monkeypatch.setenv("BRANCHIFY_NB_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    elapsed = time.perf_counter() - start
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream")
    assert "max |exported - target leaf|" in text
    assert "ViT + ONE" in text
    assert (tmp_path / "runs" / "one" / "exported-target" / "config.json").is_file()
    assert elapsed < 60, f"smoke run took {elapsed:.0f} s"
