"""Executes notebooks/01_quickstart.ipynb and 02_methods_and_trees.ipynb in smoke mode with nbclient.

Each notebook runs in a fresh ``python3`` kernel started from this interpreter (the test checks
that the kernel's ``sys.executable`` is the one running pytest), with ``BRANCHIFY_SMOKE=1``, the
repository root as working directory and ``BRANCHIFY_NB_OUT`` pointing into ``tmp_path``. The
notebooks train on real Fashion-MNIST, so the tests skip when it is not installed locally (they
never download it). The shared execution and checks live in tests/notebook_runner.py.
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("matplotlib")  # nbformat, nbclient and ipykernel: guarded by notebook_runner
pytest.importorskip("safetensors")

from notebook_runner import (NOTEBOOKS, SMOKE_LIMIT_S, all_stream, assert_committed_with_outputs, execute_smoke,
                             needs_data, rich)

QUICKSTART = NOTEBOOKS / "01_quickstart.ipynb"
METHODS = NOTEBOOKS / "02_methods_and_trees.ipynb"


@pytest.mark.parametrize("path", [QUICKSTART, METHODS], ids=lambda p: p.stem)
def test_notebook_committed_with_the_outputs_of_a_full_run(path):
    assert_committed_with_outputs(path)


@needs_data
def test_quickstart_runs_in_smoke_mode(tmp_path, monkeypatch):
    nb, elapsed = execute_smoke(QUICKSTART, tmp_path / "out", monkeypatch)
    text = all_stream(nb)
    assert "smoke=True" in text
    assert "leaf 0 computes the original model: True" in text
    assert "leaf 1 computes the original model: False" in text      # replicas re-initialised
    assert re.search(r"peer diversity, copied replicas:\s+0\.000", text)
    assert re.search(r"peer diversity, re-initialised replicas:\s+0\.[0-9]*[1-9]", text)
    assert "training cost vs the original model" in text              # describe()
    assert "is a CifarResNet: True" in text
    assert "reloaded model matches leaf 0: True" in text
    assert re.search(r"max \|reloaded - leaf 0\| = 0\.00e\+00", text)
    for label in ("baseline accuracy:", "ONE target accuracy:", "ONE ensemble accuracy:"):
        assert re.search(re.escape(label) + r"\s+\d+\.\d\d%", text), label
    assert len(rich(nb, "image/png")) >= 3                          # samples, trees, accuracy curves
    assert (tmp_path / "out" / "resnet20_one.safetensors").is_file()
    assert elapsed < SMOKE_LIMIT_S, f"smoke run took {elapsed:.0f} s"


@needs_data
def test_methods_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    import branchify as bf

    nb, elapsed = execute_smoke(METHODS, tmp_path / "out", monkeypatch)
    text = all_stream(nb)
    assert "smoke=True" in text
    methods = ["baseline"] + bf.available_methods()
    for m in methods:                                                 # one training line per method
        assert re.search(rf"^{m}\s+target\s+\d+\.\d\d%\s+ensemble\s+\d+\.\d\d%\s+diversity", text, re.M), m
    tables = [t for t in rich(nb, "text/markdown") if "| method | target acc (%)" in t and "ResNet-20" in t]
    assert len(tables) == 1, "the final summary table is missing"
    final = tables[0].split("| method | target acc (%)", 1)[1]
    rows = [line.split("|")[1].strip() for line in final.splitlines() if line.startswith("| ")]
    assert sorted(rows) == sorted(methods), rows                      # one row per method, no extras
    tree_table = [t for t in rich(nb, "text/markdown") if "| method | leaves |" in t]
    assert tree_table and all(f"| {m} |" in tree_table[0] for m in bf.available_methods())
    assert len(rich(nb, "image/png")) >= 3                          # trees, curves, bars
    assert (tmp_path / "out" / "trees.png").is_file()
    assert (tmp_path / "out" / "summary.md").is_file()
    assert elapsed < SMOKE_LIMIT_S, f"smoke run took {elapsed:.0f} s"
