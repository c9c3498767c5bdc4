"""Executes notebooks/03_hf_trainer.ipynb in smoke mode (BRANCHIFY_SMOKE=1) with nbclient."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from notebook_runner import NOTEBOOKS, all_stream, assert_committed_with_outputs, execute_smoke

NOTEBOOK = NOTEBOOKS / "03_hf_trainer.ipynb"


def test_notebook_03_committed_with_the_outputs_of_a_full_run():
    assert_committed_with_outputs(NOTEBOOK)


def test_notebook_03_runs_in_smoke_mode(tmp_path, monkeypatch):
    nb, elapsed = execute_smoke(NOTEBOOK, tmp_path / "runs", monkeypatch, timeout=120)
    text = all_stream(nb)
    assert "max |exported - target leaf|" in text
    assert "ViT + ONE" in text
    assert (tmp_path / "runs" / "one" / "exported-target" / "config.json").is_file()
    assert elapsed < 60, f"smoke run took {elapsed:.0f} s"
