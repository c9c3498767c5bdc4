"""Moved to :mod:`branchify.recipes.md_benchmark`; this module keeps ``python -m recipes.md_benchmark`` working from the repository."""
from branchify.recipes.md_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
