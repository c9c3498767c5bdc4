"""Fast on-device minibatch loading: :class:`TensorLoader` slices shuffled, augmented, normalised
batches out of a dataset held as one tensor on the training device, and :func:`make_loaders` /
:func:`fake_loaders` build the train and test loaders of a dataset (real or random look-alike)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .sources import DatasetMeta, _dataset_meta, load_cifar, load_fashion_mnist


class TensorLoader:
    """Minibatch iterator over in-memory image tensors, with on-device batched augmentation.

    The images (uint8 ``[N, C, H, W]``, or float in ``[0, 1]``) and labels are moved to
    ``device`` once.  Each epoch (each ``iter()``) draws a permutation from a generator seeded
    with ``(seed, epoch)``, so epoch ``k`` is the same whatever happened before it (resuming
    works, see :meth:`set_epoch`).  Per batch, in this order, all on ``device``:

    1. random crop with zero padding ``crop_padding`` and random horizontal flip, done as one
       gather from the padded batch (only if ``augment``).  Padding happens before
       normalisation, like torchvision's ``RandomCrop(padding=p)`` on raw images;
    2. uint8 -> float32 in [0, 1], then ``(x - mean) / std`` per channel;
    3. optional ``channels_last`` memory format.

    Yields ``(x float32 [B, C, H, W], y int64 [B])``, or ``(x, y, index int64 [B])`` with
    ``with_index=True`` (the samples' positions in ``images``: MD reads its per-sample soft labels
    by these); ``len(loader)`` is the number of batches.

    Examples:
        >>> images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
        >>> labels = torch.randint(0, 10, (100,))
        >>> loader = TensorLoader(images, labels, 32, mean=(0.286,), std=(0.353,), shuffle=True)
        >>> len(loader), [tuple(x.shape) for x, _ in loader][-1]
        (4, (4, 1, 28, 28))
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...] | list[float],
        std: tuple[float, ...] | list[float],
        device: str | torch.device = "cpu",
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        augment: bool = False,
        crop_padding: int | None = None,
        flip: bool = True,
        channels_last: bool = False,
        with_index: bool = False,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be [N] = [{images.shape[0]}] to match images, got {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop_padding is None:
            crop_padding = 4 if images.shape[-1] >= 32 else 2
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.channels_last = channels_last
        self.with_index = with_index
        self.epoch = 0
        self._divisor = 255.0 if images.dtype == torch.uint8 else 1.0
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._generator = torch.Generator(device=self.device)

    @property
    def num_samples(self) -> int:
        """Number of images the loader iterates over."""
        return self.images.shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``'s order and augmentation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # A fresh seed per (seed, epoch): reproducible and independent of earlier epochs.
        self._generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        n = self.num_samples
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            x = self.images[index].float()
            if self.augment:
                x = self._crop_and_flip(x)
            x = (x / self._divisor - self._mean) / self._std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous()
            yield (x, self.labels[index], index) if self.with_index else (x, self.labels[index])

    def _crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Random zero-padded crop and horizontal flip of a whole batch with one gather."""
        b, _, h, w = x.shape
        p = self.crop_padding
        padded = F.pad(x, (p, p, p, p)) if p > 0 else x
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=self._generator, device=self.device)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=self._generator, device=self.device)
        rows = dy + torch.arange(h, device=self.device)  # [B, H]: source row of each output row
        cols = torch.arange(w, device=self.device).expand(b, w)  # [B, W]
        if self.flip:
            flipped = torch.rand(b, 1, generator=self._generator, device=self.device) < 0.5
            cols = torch.where(flipped, w - 1 - cols, cols)  # mirror inside the crop window
        cols = dx + cols
        batch = torch.arange(b, device=self.device).view(b, 1, 1)
        # Advanced indexing on dims 0, 2, 3 around the channel slice -> [B, H, W, C].
        out = padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)]
        return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- factories


def make_loaders(
    dataset: str,
    batch_size: int,
    device: str | torch.device,
    train_subset: int | None = None,
    seed: int = 0,
    augment: bool = True,
    root: str | Path | None = None,
    *,
    eval_batch_size: int | None = None,
    drop_last: bool = False,
    channels_last: bool = False,
) -> tuple[TensorLoader, TensorLoader, DatasetMeta]:
    """Build ``(train_loader, test_loader, meta)`` for ``"fashion_mnist"``, ``"cifar10"`` or ``"cifar100"``.

    The train loader shuffles (seeded) and, if ``augment``, applies the papers' augmentation:
    random crop with zero padding (4 for CIFAR, 2 for Fashion-MNIST) and horizontal flip.  The
    test loader keeps the order and never augments.  Both normalise with the dataset's
    mean/std (see :data:`DATASETS`).

    Examples:
        >>> train, test, meta = make_loaders("fashion_mnist", 128, "cpu", train_subset=5000)  # doctest: +SKIP
        >>> len(train), meta.in_channels  # doctest: +SKIP
        (40, 1)
    """
    meta = _dataset_meta(dataset)
    if dataset == "fashion_mnist":
        x_train, y_train, x_test, y_test = load_fashion_mnist(root, train_subset, seed)
    else:
        x_train, y_train, x_test, y_test = load_cifar(dataset, root, train_subset, seed)
    return _loaders_from_tensors(
        meta, x_train, y_train, x_test, y_test, batch_size, device, seed, augment,
        eval_batch_size=eval_batch_size, drop_last=drop_last, channels_last=channels_last,
    )  # fmt: skip


def fake_loaders(
    dataset: str,
    batch_size: int,
    num_batches: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    *,
    augment: bool = True,
    channels_last: bool = False,
) -> tuple[TensorLoader, TensorLoader, DatasetMeta]:
    """Random uint8 data shaped like ``dataset``, with the interface of :func:`make_loaders`.

    For smoke tests of CIFAR configurations without the download: both loaders hold
    ``batch_size * num_batches`` images with uniformly random labels.

    Examples:
        >>> train, test, meta = fake_loaders("cifar100", 8, 3)
        >>> x, y = next(iter(train))
        >>> tuple(x.shape), len(train), meta.num_classes
        ((8, 3, 32, 32), 3, 100)
    """
    meta = _dataset_meta(dataset)
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    generator = torch.Generator().manual_seed(seed)
    n = batch_size * num_batches
    shape = (n, meta.in_channels, meta.image_size, meta.image_size)
    tensors = []
    for _ in range(2):
        tensors.append(torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8))
        tensors.append(torch.randint(0, meta.num_classes, (n,), generator=generator))
    return _loaders_from_tensors(
        meta, *tensors, batch_size, device, seed, augment, channels_last=channels_last
    )


def _loaders_from_tensors(
    meta: DatasetMeta,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    batch_size: int,
    device: str | torch.device,
    seed: int,
    augment: bool,
    *,
    eval_batch_size: int | None = None,
    drop_last: bool = False,
    channels_last: bool = False,
) -> tuple[TensorLoader, TensorLoader, DatasetMeta]:
    train = TensorLoader(
        x_train, y_train, batch_size, mean=meta.mean, std=meta.std, device=device,
        shuffle=True, seed=seed, drop_last=drop_last, augment=augment,
        crop_padding=meta.crop_padding, flip=True, channels_last=channels_last,
    )  # fmt: skip
    test = TensorLoader(
        x_test, y_test, eval_batch_size or batch_size, mean=meta.mean, std=meta.std,
        device=device, channels_last=channels_last,
    )  # fmt: skip
    return train, test, meta
