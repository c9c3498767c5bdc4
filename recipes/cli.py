"""Moved to :mod:`branchify.recipes.cli`; this module keeps ``python -m recipes.cli`` working from the repository."""
from branchify.recipes.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
