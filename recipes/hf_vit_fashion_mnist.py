"""Moved to :mod:`branchify.recipes.hf_vit_fashion_mnist`; this module keeps ``python -m recipes.hf_vit_fashion_mnist`` working from the repository."""
from branchify.recipes.hf_vit_fashion_mnist import main

if __name__ == "__main__":
    main()
