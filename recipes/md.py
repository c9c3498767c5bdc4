"""Moved to :mod:`branchify.recipes.md`; this module keeps ``python -m recipes.md`` working from the repository."""
from branchify.recipes.md import main

if __name__ == "__main__":
    raise SystemExit(main())
