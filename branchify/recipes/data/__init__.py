"""In-memory datasets and fast on-device minibatch loaders for the recipes.

The recipes' datasets are small (Fashion-MNIST 47 MB, CIFAR 150 MB as uint8), so instead of a
``DataLoader`` with worker processes the whole dataset lives as one uint8 tensor on the training
device, and :class:`TensorLoader` slices shuffled minibatches out of it, augments them with
batched tensor ops and normalises them there.  On a GPU this removes the input pipeline from the
profile; on a CPU it is still faster than PIL transforms per sample.

Where the data comes from:

* Fashion-MNIST (:func:`find_fashion_mnist`): the ``root`` argument, ``$BRANCHIFY_FASHION_MNIST``,
  the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or a
  torchvision download into ``$BRANCHIFY_DATA/fashion-mnist`` (default ``~/.cache/branchify``).
* CIFAR-10/100: torchvision's download into ``$BRANCHIFY_DATA/<name>`` (or ``root``).
"""

from __future__ import annotations

from .loader import TensorLoader, fake_loaders, make_loaders
from .sources import (
    DATASETS,
    ENV_DATA,
    ENV_FASHION_MNIST,
    FASHION_MNIST_FILES,
    SYSTEM_FASHION_MNIST_DIR,
    DatasetMeta,
    data_cache_dir,
    find_fashion_mnist,
    load_cifar,
    load_fashion_mnist,
    read_idx,
    stratified_subset,
)

__all__ = ["DATASETS", "DatasetMeta", "ENV_DATA", "ENV_FASHION_MNIST", "FASHION_MNIST_FILES",
           "SYSTEM_FASHION_MNIST_DIR", "TensorLoader", "data_cache_dir", "fake_loaders", "find_fashion_mnist",
           "load_cifar", "load_fashion_mnist", "make_loaders", "read_idx", "stratified_subset"]
