"""Where the recipes' datasets come from: their metadata (:data:`DATASETS`), the idx reader, finding
or downloading Fashion-MNIST, downloading CIFAR-10/100 through torchvision, and seeded
class-stratified training subsets; everything is returned as in-memory uint8 image and int64 label
tensors."""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ENV_FASHION_MNIST = "BRANCHIFY_FASHION_MNIST"
ENV_DATA = "BRANCHIFY_DATA"
#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four idx files of (Fashion-)MNIST, each accepted raw or gzip-compressed.
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetMeta:
    """What a model and a training loop need to know about a dataset.

    Examples:
        >>> DATASETS["cifar100"].num_classes
        100
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Zero padding of the random-crop augmentation (4 for 32x32 CIFAR, 2 for 28x28).
    crop_padding: int


#: Supported datasets with the per-channel normalisation used by the papers.
DATASETS: dict[str, DatasetMeta] = {
    "fashion_mnist": DatasetMeta("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), 2),
    "cifar10": DatasetMeta(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4
    ),
    "cifar100": DatasetMeta(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4
    ),
}


def _dataset_meta(dataset: str) -> DatasetMeta:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}; valid names are: {', '.join(DATASETS)}"
        ) from None


def data_cache_dir() -> Path:
    """Root for downloaded datasets: ``$BRANCHIFY_DATA`` or ``~/.cache/branchify``.

    Examples:
        >>> data_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/branchify')
    """
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "branchify"


# --------------------------------------------------------------------------- idx files


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an idx file (the MNIST format), raw or gzip-compressed, into a tensor.

    The header is two zero bytes, a type code (0x08 = uint8, used by all MNIST-style files), the
    number of dimensions, then one big-endian uint32 per dimension.  Compression is detected
    from the gzip magic bytes, not the file name.

    Raises:
        ValueError: if the file is not a well-formed idx file (wrong magic or size).

    Examples:
        >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([10000, 28, 28]), torch.uint8)
    """
    path = Path(path)
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an idx file: expected a header 00 00 <type> <ndim> with type in "
            f"{sorted(hex(code) for code in _IDX_DTYPES)}, got {data[:4].hex(' ') or 'an empty file'}"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(data) - offset} bytes after the header; it is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    # Convert big-endian types to native order; copy() also makes the buffer writable.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


# --------------------------------------------------------------------------- Fashion-MNIST


def _idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dir(directory: Path) -> tuple[Path | None, str]:
    """Return (the folder holding the four idx files, "") or (None, why not) for ``directory``.

    Both a flat folder and torchvision's ``<root>/FashionMNIST/raw/`` layout are accepted.
    """
    if not directory.is_dir():
        return None, "does not exist"
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        if all(_idx_file(folder, name) for name in FASHION_MNIST_FILES):
            return folder, ""
    missing = [name for name in FASHION_MNIST_FILES if not _idx_file(directory, name)]
    return None, f"has no {', '.join(missing)} (raw or .gz, also looked in FashionMNIST/raw/)"


def _download_fashion_mnist(destination: Path) -> None:
    """Download Fashion-MNIST with torchvision into ``destination/FashionMNIST/raw``."""
    import torchvision

    torchvision.datasets.FashionMNIST(str(destination), train=True, download=True)


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """Locate (or download) Fashion-MNIST and return the folder holding its four idx files.

    Tried in order, the first that holds all four files wins:

    1. the ``root`` argument;
    2. the environment variable ``BRANCHIFY_FASHION_MNIST``;
    3. ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``);
    4. ``$BRANCHIFY_DATA/fashion-mnist`` (default ``~/.cache/branchify/fashion-mnist``),
       downloading there with torchvision if it is not there yet.

    A ``root`` or environment variable that is given but unusable is reported with a warning
    before falling back, so a typo does not go unnoticed.

    Raises:
        FileNotFoundError: if every place fails; the message lists each place and why.

    Examples:
        >>> find_fashion_mnist()  # doctest: +SKIP
        PosixPath('/usr/share/datasets/fashion-mnist')
    """
    tried: list[str] = []

    def check(directory: Path, label: str, warn: bool) -> Path | None:
        found, reason = _fashion_mnist_dir(directory)
        if found is None:
            tried.append(f"{label} {directory}: {reason}")
            if warn:
                warnings.warn(f"{label} {directory} {reason}; looking elsewhere for Fashion-MNIST", stacklevel=2)
        return found

    candidates: list[tuple[Path, str, bool]] = []
    if root is not None:
        candidates.append((Path(root).expanduser(), "root argument", True))
    env = os.environ.get(ENV_FASHION_MNIST)
    if env:
        candidates.append((Path(env).expanduser(), f"${ENV_FASHION_MNIST}", True))
    else:
        tried.append(f"${ENV_FASHION_MNIST}: not set")
    candidates.append((SYSTEM_FASHION_MNIST_DIR, "system path", False))
    for directory, label, warn in candidates:
        found = check(directory, label, warn)
        if found is not None:
            return found

    cache = data_cache_dir() / "fashion-mnist"
    found, _ = _fashion_mnist_dir(cache)
    if found is not None:
        return found
    try:
        _download_fashion_mnist(cache)
    except Exception as error:  # noqa: BLE001 - any failure means "not available here"
        tried.append(f"torchvision download into {cache}: failed ({type(error).__name__}: {error})")
    else:
        found = check(cache, "torchvision download into", False)
        if found is not None:
            return found
    raise FileNotFoundError(
        "Fashion-MNIST not found. Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nFix one of: `apt-get install dataset-fashion-mnist` (installs into "
        f"{SYSTEM_FASHION_MNIST_DIR}); set {ENV_FASHION_MNIST} to a folder holding "
        f"{', '.join(FASHION_MNIST_FILES)} (raw or .gz); or allow the torchvision download "
        f"(needs internet) into {cache}."
    )


def stratified_subset(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a seeded subset with exactly ``size / num_classes`` samples per class.

    Raises:
        ValueError: if ``size`` is not a positive multiple of the number of classes or a class
            has too few samples.

    Examples:
        >>> labels = torch.arange(10).repeat(100)
        >>> idx = stratified_subset(labels, 50, seed=0)
        >>> torch.bincount(labels[idx]).tolist()
        [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    """
    classes = torch.unique(labels)
    if size <= 0 or size % len(classes) != 0:
        raise ValueError(
            f"train_subset={size} must be a positive multiple of the {len(classes)} classes so that "
            f"every class gets the same count (e.g. {len(classes) * max(1, size // len(classes))})"
        )
    per_class = size // len(classes)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in classes.tolist():
        members = torch.nonzero(labels == cls).flatten()
        if len(members) < per_class:
            raise ValueError(
                f"class {cls} has only {len(members)} samples, fewer than the {per_class} "
                f"per class needed for train_subset={size}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def load_fashion_mnist(
    root: str | Path | None = None, train_subset: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST as ``(x_train, y_train, x_test, y_test)``.

    Images are uint8 ``[N, 1, 28, 28]``, labels int64.  ``train_subset`` keeps a seeded,
    class-stratified subset of that many training images (the test set is always complete).

    Examples:
        >>> x, y, xt, yt = load_fashion_mnist(train_subset=5000)  # doctest: +SKIP
        >>> x.shape, xt.shape  # doctest: +SKIP
        (torch.Size([5000, 1, 28, 28]), torch.Size([10000, 1, 28, 28]))
    """
    folder = find_fashion_mnist(root)
    tensors = [read_idx(_idx_file(folder, name)) for name in FASHION_MNIST_FILES]  # type: ignore[arg-type]
    x_train, y_train, x_test, y_test = tensors
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {split} images {tuple(images.shape)} do not match labels "
                f"{tuple(labels.shape)}; expected [N, 28, 28] images and N labels"
            )
    x_train, x_test = x_train.unsqueeze(1), x_test.unsqueeze(1)
    y_train, y_test = y_train.long(), y_test.long()
    if train_subset is not None:
        index = stratified_subset(y_train, train_subset, seed)
        x_train, y_train = x_train[index], y_train[index]
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------- CIFAR


def load_cifar(
    name: str, root: str | Path | None = None, train_subset: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 or CIFAR-100 via torchvision as uint8 ``[N, 3, 32, 32]`` and int64 labels.

    The data is downloaded into ``root`` (default ``$BRANCHIFY_DATA/<name>``) on first use.

    Raises:
        FileNotFoundError: if the data is not in ``root`` and cannot be downloaded.

    Examples:
        >>> x, y, xt, yt = load_cifar("cifar10")  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([50000, 3, 32, 32])
    """
    import torchvision

    classes = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    if name not in classes:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid names are: cifar10, cifar100")
    root = Path(root).expanduser() if root is not None else data_cache_dir() / name
    splits = []
    for train in (True, False):
        try:
            dataset = classes[name](str(root), train=train, download=True)
        except Exception as error:  # noqa: BLE001 - URLError, OSError, RuntimeError, ...
            raise FileNotFoundError(
                f"{name} is not in {root} and downloading it failed "
                f"({type(error).__name__}: {error}). The download needs internet access: run once "
                f"on a machine that has it and copy {root} here, or pass root= / set {ENV_DATA} "
                "to where the data already is."
            ) from error
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        splits += [images, torch.as_tensor(dataset.targets, dtype=torch.int64)]
    x_train, y_train, x_test, y_test = splits
    if train_subset is not None:
        index = stratified_subset(y_train, train_subset, seed)
        x_train, y_train = x_train[index], y_train[index]
    return x_train, y_train, x_test, y_test
