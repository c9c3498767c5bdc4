"""Shared helpers for the notebook tests (tests/test_notebooks*.py, tests/test_notebook_04.py).

A plain module, imported as ``from notebook_runner import ...``. Each notebook runs in a fresh
``python3`` kernel started from this interpreter (``execute_smoke`` checks that the kernel's
``sys.executable`` is the one running pytest), with ``BRANCHIFY_SMOKE=1``, the repository root as
working directory and on ``PYTHONPATH``, and ``BRANCHIFY_NB_OUT`` pointing at the given folder.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")  # provides the native "python3" kernel (run with sys.executable)

from fashion_mnist import needs_fashion_mnist as needs_data  # noqa: F401  (re-exported for the notebook tests)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SMOKE_LIMIT_S = 300  # a guard against smoke mode silently growing; expected ~15-40 s for 01/02


def assert_committed_with_outputs(path: Path, plots: bool = True) -> None:
    """The notebook is valid nbformat 4 for the ``python3`` kernel, has a smoke switch, and is
    committed with the outputs of a full run (``scripts/run_notebooks.py``): every code cell ran,
    in order, without an error, the run was not a smoke run, and (``plots``) a figure is shown."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{path.name}: cells without outputs; run scripts/run_notebooks.py {path.stem}"
    assert counts == sorted(counts), f"{path.name}: cells were run out of order; re-run it from the top"
    errors = [o.get("ename") for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with errors {errors}"
    assert "smoke=True" not in all_stream(nb), f"{path.name}: committed from a smoke run; run it at full size"
    if plots:
        assert rich(nb, "image/png"), f"{path.name}: shows no plot"
    source = "\n".join(c.source for c in code)
    assert 'os.environ.get("BRANCHIFY_SMOKE") == "1"' in source


def execute_smoke(path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch,
                  timeout: int = SMOKE_LIMIT_S) -> tuple[nbformat.NotebookNode, float]:
    """Runs the notebook in smoke mode; returns the executed notebook and the seconds it took.

    ``timeout`` is nbclient's per-cell limit. Extra environment (e.g. ``MPLBACKEND``) can be set
    with ``monkeypatch`` before the call: the kernel inherits this process's environment.
    """
    monkeypatch.setenv("BRANCHIFY_SMOKE", "1")
    monkeypatch.setenv("BRANCHIFY_NB_OUT", str(out_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    # Not saved anywhere: proves the kernel runs this interpreter (the venv), not another python.
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    kernel = stream(nb.cells[0]).split("KERNEL", 1)[1].strip()
    assert Path(kernel).resolve() == Path(sys.executable).resolve(), f"kernel ran {kernel}, not {sys.executable}"
    return nb, elapsed


def stream(cell) -> str:
    """The stdout/stderr text of one code cell."""
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def all_stream(nb) -> str:
    """The stdout/stderr text of every code cell, one cell a line-separated block."""
    return "\n".join(stream(c) for c in nb.cells if c.cell_type == "code")


def rich(nb, mime: str) -> list[str]:
    """Every display_data / execute_result payload of the given MIME type, in cell order."""
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]
