"""Executes notebooks/01_quickstart.ipynb and 02_methods_and_trees.ipynb in smoke mode with nbclient.

Each notebook runs in a fresh ``python3`` kernel started from this interpreter (the test checks
that the kernel's ``sys.executable`` is the one running pytest), with ``BRANCHIFY_SMOKE=1``, the
repository root as working directory and ``BRANCHIFY_NB_OUT`` pointing into ``tmp_path``. The
notebooks train on real Fashion-MNIST, so the tests skip when it is not installed locally (they
never download it).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # provides the native "python3" kernel (run with sys.executable)
pytest.importorskip("matplotlib")
pytest.importorskip("safetensors")

from recipes.data import ENV_FASHION_MNIST, FASHION_MNIST_FILES, SYSTEM_FASHION_MNIST_DIR, data_cache_dir

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
QUICKSTART = NOTEBOOKS / "01_quickstart.ipynb"
METHODS = NOTEBOOKS / "02_methods_and_trees.ipynb"
SMOKE_LIMIT_S = 300  # a guard against smoke mode silently growing; expected ~15-40 s each


def _local_fashion_mnist() -> Path | None:
    """The folder holding Fashion-MNIST's four idx files, looking only where recipes.data looks locally."""
    candidates = [Path(p).expanduser() for p in [os.environ.get(ENV_FASHION_MNIST)] if p]
    candidates += [SYSTEM_FASHION_MNIST_DIR, data_cache_dir() / "fashion-mnist"]
    for base in candidates:
        for folder in (base, base / "FashionMNIST" / "raw"):
            if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in FASHION_MNIST_FILES):
                return folder
    return None


needs_data = pytest.mark.skipif(
    _local_fashion_mnist() is None,
    reason=f"Fashion-MNIST is not installed locally (apt-get install dataset-fashion-mnist, or set "
           f"{ENV_FASHION_MNIST}); the notebooks train on the real data set and these tests never download it")


def _execute(path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[nbformat.NotebookNode, float]:
    monkeypatch.setenv("BRANCHIFY_SMOKE", "1")
    monkeypatch.setenv("BRANCHIFY_NB_OUT", str(out_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    # Not saved anywhere: proves the kernel runs this interpreter (the venv), not another python.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=SMOKE_LIMIT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    kernel = _stream(nb.cells[0]).split("KERNEL", 1)[1].strip()
    assert Path(kernel).resolve() == Path(sys.executable).resolve(), f"kernel ran {kernel}, not {sys.executable}"
    return nb, elapsed


def _stream(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _all_stream(nb) -> str:
    return "\n".join(_stream(c) for c in nb.cells if c.cell_type == "code")


def _rich(nb, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]


@pytest.mark.parametrize("path", [QUICKSTART, METHODS], ids=lambda p: p.stem)
def test_notebook_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, \
                f"{path.name}: clear the outputs before committing"
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("BRANCHIFY_SMOKE") == "1"' in source


@needs_data
def test_quickstart_runs_in_smoke_mode(tmp_path, monkeypatch):
    nb, elapsed = _execute(QUICKSTART, tmp_path / "out", monkeypatch)
    text = _all_stream(nb)
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
    assert len(_rich(nb, "image/png")) >= 3                          # samples, trees, accuracy curves
    assert (tmp_path / "out" / "resnet20_one.safetensors").is_file()
    assert elapsed < SMOKE_LIMIT_S, f"smoke run took {elapsed:.0f} s"


@needs_data
def test_methods_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    import branchify as bf

    nb, elapsed = _execute(METHODS, tmp_path / "out", monkeypatch)
    text = _all_stream(nb)
    assert "smoke=True" in text
    methods = ["baseline"] + bf.available_methods()
    for m in methods:                                                 # one training line per method
        assert re.search(rf"^{m}\s+target\s+\d+\.\d\d%\s+ensemble\s+\d+\.\d\d%\s+diversity", text, re.M), m
    tables = [t for t in _rich(nb, "text/markdown") if "| method | target acc (%)" in t and "ResNet-20" in t]
    assert len(tables) == 1, "the final summary table is missing"
    final = tables[0].split("| method | target acc (%)", 1)[1]
    rows = [line.split("|")[1].strip() for line in final.splitlines() if line.startswith("| ")]
    assert sorted(rows) == sorted(methods), rows                      # one row per method, no extras
    tree_table = [t for t in _rich(nb, "text/markdown") if "| method | leaves |" in t]
    assert tree_table and all(f"| {m} |" in tree_table[0] for m in bf.available_methods())
    assert len(_rich(nb, "image/png")) >= 3                          # trees, curves, bars
    assert (tmp_path / "out" / "trees.png").is_file()
    assert (tmp_path / "out" / "summary.md").is_file()
    assert elapsed < SMOKE_LIMIT_S, f"smoke run took {elapsed:.0f} s"
