"""Moved to :mod:`branchify.recipes.benchmark_accuracy`; this module keeps ``python -m recipes.benchmark_accuracy`` working from the repository."""
from branchify.recipes.benchmark_accuracy import main

if __name__ == "__main__":
    raise SystemExit(main())
