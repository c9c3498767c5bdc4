"""Re-run the notebooks at full size and save them with their outputs (plots, tables, trees).

The committed notebooks carry the outputs of a full run, so the repository page and the docs
show their results without running anything; the test suite re-executes them in smoke mode
(``BRANCHIFY_SMOKE=1``) and never writes them. Run from the repository root:

    .venv/bin/python scripts/run_notebooks.py                 # all four, a few minutes each on a CPU
    .venv/bin/python scripts/run_notebooks.py 02_methods_and_trees   # one

Each notebook runs in a fresh ``python3`` kernel of this interpreter with the repository root as
working directory; files it writes go to ``runs/notebooks/<name>/``. Volatile metadata (execution
timings) is dropped so a re-run only changes what the notebook shows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def tidy(nb: nbformat.NotebookNode) -> None:
    """Drop what only describes the machine that ran it: execution timestamps, and library warnings
    printed to stderr (they carry that machine's install paths and say nothing about the results)."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if not (
                o.get("output_type") == "stream" and o.get("name") == "stderr" and "Warning" in o.get("text", ""))]


def run(path: Path, timeout: int) -> float:
    """Execute ``path`` at full size and write it back with its outputs; returns the seconds taken."""
    nb = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ.pop("BRANCHIFY_SMOKE", None)
    os.environ["BRANCHIFY_NB_OUT"] = f"runs/notebooks/{path.stem}"  # relative: the kernel runs in ROOT
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env_before.get("PYTHONPATH")]))
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})
        start = time.perf_counter()
        client.execute()
        elapsed = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    tidy(nb)
    nb.metadata.pop("widgets", None)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook stems (default: every notebook)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        known = {p.stem: p for p in paths}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            sys.exit(f"unknown notebook(s) {unknown}; choose from {sorted(known)}")
        paths = [known[n] for n in args.names]
    for path in paths:
        print(f"[notebooks] running {path.name} at full size ...", flush=True)
        print(f"[notebooks] {path.name}: {run(path, args.timeout):.0f} s, saved with outputs", flush=True)


if __name__ == "__main__":
    main()
