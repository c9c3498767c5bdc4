"""Moved to :mod:`branchify.recipes.demo`; this module keeps ``python -m recipes.demo`` working from the repository."""
from branchify.recipes.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
