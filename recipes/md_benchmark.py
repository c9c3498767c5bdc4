"""Moved to :mod:`benchmarks.md_accuracy`; this module keeps ``python -m recipes.md_benchmark`` working from the repository."""
from benchmarks.md_accuracy import main

if __name__ == "__main__":
    raise SystemExit(main())
