"""Moved to :mod:`benchmarks.accuracy_gpu`; this module keeps ``python -m recipes.benchmark_accuracy`` working from the repository."""
from benchmarks.accuracy_gpu import main

if __name__ == "__main__":
    raise SystemExit(main())
