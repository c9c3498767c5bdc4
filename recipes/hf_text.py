"""Moved to :mod:`branchify.recipes.hf_text`; this module keeps ``python -m recipes.hf_text`` working from the repository."""
from branchify.recipes.hf_text import main

if __name__ == "__main__":
    main()
