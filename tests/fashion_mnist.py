"""The local-only Fashion-MNIST skip marker for the integration tests that train on the real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from branchify.recipes.data import ENV_FASHION_MNIST, FASHION_MNIST_FILES, SYSTEM_FASHION_MNIST_DIR, data_cache_dir


def _local_fashion_mnist() -> Path | None:
    """The folder holding Fashion-MNIST's four idx files, looking only where recipes.data looks locally."""
    candidates = [Path(p).expanduser() for p in [os.environ.get(ENV_FASHION_MNIST)] if p]
    candidates += [SYSTEM_FASHION_MNIST_DIR, data_cache_dir() / "fashion-mnist"]
    for base in candidates:
        for folder in (base, base / "FashionMNIST" / "raw"):
            if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in FASHION_MNIST_FILES):
                return folder
    return None


needs_fashion_mnist = pytest.mark.skipif(
    _local_fashion_mnist() is None,
    reason=f"Fashion-MNIST is not installed locally (apt-get install dataset-fashion-mnist, or set "
           f"{ENV_FASHION_MNIST}); these tests train on the real data set and never download it")
