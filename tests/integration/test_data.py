"""Tests for recipes.data: idx parsing, dataset resolution, subsets and the on-device loader."""

from __future__ import annotations

import gzip
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from branchify.recipes import data
from branchify.recipes.data import (
    DATASETS,
    FASHION_MNIST_FILES,
    TensorLoader,
    fake_loaders,
    find_fashion_mnist,
    load_fashion_mnist,
    make_loaders,
    read_idx,
    stratified_subset,
)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) as an idx file, gzip-compressed if ``compress``."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fake_fmnist(directory: Path, compress: bool = True, per_class: int = 6, seed: int = 0) -> Path:
    """Write a tiny Fashion-MNIST look-alike (10 classes) with the four canonical file names."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    train_labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
    test_labels = np.arange(10, dtype=np.uint8)
    arrays = [
        rng.integers(0, 256, (len(train_labels), 28, 28), dtype=np.uint8),
        train_labels,
        rng.integers(0, 256, (len(test_labels), 28, 28), dtype=np.uint8),
        test_labels,
    ]
    for name, array in zip(FASHION_MNIST_FILES, arrays):
        write_idx(directory / name, array, compress)
    return directory


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env vars, a missing system dir, a private cache and a download that fails offline."""
    monkeypatch.delenv(data.ENV_FASHION_MNIST, raising=False)
    monkeypatch.setenv(data.ENV_DATA, str(tmp_path / "cache"))
    monkeypatch.setattr(data.sources, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "system-missing")

    def offline(destination):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(data.sources, "_download_fashion_mnist", offline)
    return tmp_path


# ----------------------------------------------------------------------------- idx parser


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 255], dtype=np.uint8)
    image_file = write_idx(tmp_path / "images-idx3-ubyte", images, compress)
    label_file = write_idx(tmp_path / "labels-idx1-ubyte", labels, compress)
    assert image_file.name.endswith(".gz") == compress
    parsed = read_idx(image_file)
    assert parsed.dtype == torch.uint8 and parsed.shape == (3, 4, 5)
    assert torch.equal(parsed, torch.from_numpy(images))
    assert read_idx(label_file).tolist() == [7, 0, 255]


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(bad_magic)
    truncated = write_idx(tmp_path / "short", np.zeros((4, 4), dtype=np.uint8), compress=False)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)


# ----------------------------------------------------------------------------- resolution


def test_resolution_order_explicit_then_env_then_system(isolated, monkeypatch):
    explicit = make_fake_fmnist(isolated / "explicit")
    from_env = make_fake_fmnist(isolated / "env", compress=False)
    system = make_fake_fmnist(isolated / "system")
    monkeypatch.setattr(data.sources, "SYSTEM_FASHION_MNIST_DIR", system)
    monkeypatch.setenv(data.ENV_FASHION_MNIST, str(from_env))
    assert find_fashion_mnist(explicit) == explicit
    assert find_fashion_mnist() == from_env
    monkeypatch.delenv(data.ENV_FASHION_MNIST)
    assert find_fashion_mnist() == system


def test_unusable_explicit_root_warns_and_falls_back(isolated, monkeypatch):
    system = make_fake_fmnist(isolated / "system")
    monkeypatch.setattr(data.sources, "SYSTEM_FASHION_MNIST_DIR", system)
    (isolated / "empty").mkdir()
    with pytest.warns(UserWarning, match="train-images-idx3-ubyte"):
        assert find_fashion_mnist(isolated / "empty") == system


def test_torchvision_layout_is_accepted(isolated):
    raw = make_fake_fmnist(isolated / "tv" / "FashionMNIST" / "raw")
    assert find_fashion_mnist(isolated / "tv") == raw


def test_download_used_when_nothing_local(isolated, monkeypatch):
    monkeypatch.setattr(
        data.sources, "_download_fashion_mnist", lambda dest: make_fake_fmnist(dest / "FashionMNIST" / "raw")
    )
    found = find_fashion_mnist()
    assert found == isolated / "cache" / "fashion-mnist" / "FashionMNIST" / "raw"


def test_not_found_message_names_every_place_and_the_fixes(isolated):
    with pytest.raises(FileNotFoundError) as info:
        find_fashion_mnist()
    message = str(info.value)
    assert data.ENV_FASHION_MNIST in message
    assert str(isolated / "system-missing") in message
    assert str(isolated / "cache" / "fashion-mnist") in message
    assert "no network in tests" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download" in message


def test_cifar_download_failure_names_root_and_internet(monkeypatch, tmp_path):
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError) as info:
        make_loaders("cifar10", 8, "cpu", root=tmp_path / "c10")
    assert str(tmp_path / "c10") in str(info.value) and "internet" in str(info.value)


# ----------------------------------------------------------------------------- loading


def test_load_and_stratified_subset(isolated):
    root = make_fake_fmnist(isolated / "fm", per_class=20)
    x, y, xt, yt = load_fashion_mnist(root)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert xt.shape == (10, 1, 28, 28) and yt.tolist() == list(range(10))

    xs, ys, _, _ = load_fashion_mnist(root, train_subset=50, seed=3)
    assert xs.shape == (50, 1, 28, 28)
    assert torch.bincount(ys, minlength=10).tolist() == [5] * 10
    again, _, _, _ = load_fashion_mnist(root, train_subset=50, seed=3)
    other, _, _, _ = load_fashion_mnist(root, train_subset=50, seed=4)
    assert torch.equal(xs, again)
    assert not torch.equal(xs, other)


def test_stratified_subset_rejects_uneven_or_too_large():
    labels = torch.arange(10).repeat(3)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        stratified_subset(labels, 25)
    with pytest.raises(ValueError, match="only 3 samples"):
        stratified_subset(labels, 40)


def test_real_fashion_mnist_if_installed():
    folder, reason = data.sources._fashion_mnist_dir(data.SYSTEM_FASHION_MNIST_DIR)
    if folder is None:
        pytest.skip(f"Fashion-MNIST not installed: {data.SYSTEM_FASHION_MNIST_DIR} {reason}")
    x, y, xt, yt = load_fashion_mnist(folder)
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert y.shape == (60000,) and yt.shape == (10000,)
    assert int(y.min()) == 0 and int(y.max()) == 9 and int(yt.min()) == 0 and int(yt.max()) == 9
    assert torch.bincount(y).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- TensorLoader


def random_images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)


def test_loader_batches_shapes_dtypes_and_normalisation():
    images, labels = random_images(70), torch.arange(70) % 10
    loader = TensorLoader(images, labels, 32, mean=(0.25,), std=(0.5,))
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 6]
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (32, 1, 28, 28)
    expected = (images[:32].float() / 255 - 0.25) / 0.5
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.equal(y, labels[:32])

    dropped = TensorLoader(images, labels, 32, mean=(0.25,), std=(0.5,), drop_last=True)
    assert len(dropped) == 2 and [len(y) for _, y in dropped] == [32, 32]


def test_loader_per_channel_normalisation_and_channels_last():
    images = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    loader = TensorLoader(
        images, torch.zeros(4, dtype=torch.long), 4, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25),
        channels_last=True,
    )  # fmt: skip
    x, _ = next(iter(loader))
    assert x[:, 0].eq(1.0).all() and x[:, 1].eq(1.0).all() and x[:, 2].eq(0.0).all()
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_loader_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one value per channel"):
        TensorLoader(random_images(4), torch.zeros(4, dtype=torch.long), 2, mean=(0.1, 0.2), std=(1, 1))
    with pytest.raises(ValueError, match="labels must be"):
        TensorLoader(random_images(4), torch.zeros(5, dtype=torch.long), 2, mean=(0.1,), std=(1,))


def test_shuffle_is_seed_reproducible_and_changes_per_epoch():
    images, labels = random_images(64), torch.arange(64)

    def order(seed: int, epochs: int = 1) -> list[list[int]]:
        loader = TensorLoader(images, labels, 16, mean=(0,), std=(1,), shuffle=True, seed=seed)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(epochs)]

    first, second = order(0, epochs=2)
    assert sorted(first) == list(range(64)) and first != list(range(64))
    assert first != second
    assert order(0) == [first] and order(1) != [first]

    loader = TensorLoader(images, labels, 16, mean=(0,), std=(1,), shuffle=True, seed=0)
    loader.set_epoch(1)
    assert torch.cat([y for _, y in loader]).tolist() == second


def batches(loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_augmentation_with_no_padding_and_no_flip_is_identity():
    images, labels = random_images(40), torch.arange(40)
    kwargs = dict(mean=(0.3,), std=(0.4,), shuffle=True, seed=5)
    plain = batches(TensorLoader(images, labels, 16, **kwargs))
    identity = batches(TensorLoader(images, labels, 16, augment=True, crop_padding=0, flip=False, **kwargs))
    assert torch.equal(plain[0], identity[0]) and torch.equal(plain[1], identity[1])


@pytest.mark.parametrize("channels,size,pad", [(1, 28, 2), (3, 32, 4)])
def test_augmentation_is_a_padded_crop_or_its_mirror(channels, size, pad):
    images, labels = random_images(48, channels, size), torch.arange(48)
    loader = TensorLoader(images, labels, 16, mean=(0.0,) * channels, std=(1.0,) * channels, augment=True)
    assert loader.crop_padding == pad  # default chosen from the image size
    x, y = batches(loader)
    assert x.shape == (48, channels, size, size)
    original = images[y].float() / 255
    padded = torch.nn.functional.pad(original, (pad,) * 4)
    changed = flipped = 0
    for i in range(len(x)):
        views = [
            (view, mirrored)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for view, mirrored in (
                (padded[i, :, dy : dy + size, dx : dx + size], False),
                (padded[i, :, dy : dy + size, dx : dx + size].flip(-1), True),
            )
        ]
        matches = [mirrored for view, mirrored in views if torch.equal(view, x[i])]
        assert matches, f"image {i} is not a zero-padded crop (or its mirror) of its source"
        changed += not torch.equal(x[i], original[i])
        flipped += all(matches)
    assert changed > len(x) // 2  # almost every image is shifted and/or flipped
    assert 0 < flipped < len(x)


def test_fake_loaders_shapes():
    for name, meta in DATASETS.items():
        train, test, got = fake_loaders(name, batch_size=8, num_batches=3, device="cpu", seed=1)
        assert got == meta and len(train) == 3 and len(test) == 3
        x, y = next(iter(train))
        assert x.shape == (8, meta.in_channels, meta.image_size, meta.image_size)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert int(y.max()) < meta.num_classes
    with pytest.raises(ValueError, match="cifar100"):
        fake_loaders("svhn", 8, 1)


def test_make_loaders_fashion_mnist_from_root(isolated):
    root = make_fake_fmnist(isolated / "fm", per_class=10)
    train, test, meta = make_loaders("fashion_mnist", 16, "cpu", train_subset=50, root=root)
    assert (meta.name, meta.num_classes, meta.in_channels, meta.image_size) == ("fashion_mnist", 10, 1, 28)
    assert len(train) == 4 and train.num_samples == 50 and train.augment and train.shuffle
    assert len(test) == 1 and not test.augment and not test.shuffle
    x, _ = next(iter(test))
    _, _, xt, _ = load_fashion_mnist(root)
    assert torch.allclose(x, (xt.float() / 255 - 0.2860) / 0.3530, atol=1e-6)
