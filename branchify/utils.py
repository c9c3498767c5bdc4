"""Small helpers every part of the package uses, with no idea of any method: splitting a batch
``(inputs, labels[, indices])``, moving it to a device, the device of a model, autocast on or off,
and order-sensitive checksums that let ranks verify they see the same tensors.

Examples:
    >>> args, kwargs, y, idx = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    >>> len(args), idx is None
    (1, True)
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import BranchifyError

_MIX = 1_000_003
"""Multiplier of the positional checksums (a prime; int64 arithmetic wraps deterministically)."""


class BatchError(BranchifyError, ValueError):
    """A batch (or a set of tensors) a helper cannot read; says what shape it expects."""


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so each item also carries its index: ``(x, y) -> (x, y, i)``.

    Examples:
        >>> ds = IndexedDataset([(torch.zeros(2), 1), (torch.ones(2), 0)])
        >>> ds[1][2], len(ds)
        (1, 2)
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, (tuple, list)) else (item, index)


def split_batch(batch: Any) -> tuple[tuple, dict, torch.Tensor, torch.Tensor | None]:
    """``(args, kwargs, labels, indices)`` of a batch ``(inputs, labels[, indices])``; ``indices``
    is ``None`` for a batch without them.

    ``inputs`` is a tensor (one positional input), a tuple (positional inputs) or a dict
    (keyword inputs).

    Examples:
        >>> args, kwargs, y, idx = split_batch((torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([5, 9])))
        >>> len(args), idx.tolist()
        (1, [5, 9])
    """
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise BatchError(f"a batch must be (inputs, labels) or (inputs, labels, indices), got {type(batch).__name__}"
                         f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
    inputs, labels, index = (*batch, None) if len(batch) == 2 else batch
    if isinstance(inputs, dict):
        return (), dict(inputs), labels, index
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}, labels, index
    return (inputs,), {}, labels, index


def to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Move the tensors among ``args`` / ``kwargs`` to ``device`` (others pass through).

    Examples:
        >>> args, kwargs = to_device((torch.zeros(1), "text"), {"mask": torch.ones(1)}, torch.device("cpu"))
        >>> args[1], kwargs["mask"].device.type
        ('text', 'cpu')
    """
    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a stateless model.

    Examples:
        >>> model_device(nn.Linear(2, 2)).type, model_device(nn.ReLU()).type
        ('cpu', 'cpu')
    """
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is ``None`` (full precision).

    Examples:
        >>> with autocast(torch.device("cpu"), None):
        ...     (torch.ones(2) * 2).dtype
        torch.float32
    """
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (a no-op where autocast does not exist, e.g. ``meta``).

    Examples:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), no_autocast(torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def sequence_checksum(*tensors: torch.Tensor) -> torch.Tensor:
    """An order-sensitive int64 checksum of integer tensors (stays on their device; no sync).

    Equal sequences give equal checksums on every device; a different order, value or length
    almost surely does not. Used to verify that ranks see the same samples.

    Examples:
        >>> a, b = torch.tensor([3, 1, 2]), torch.tensor([1, 3, 2])
        >>> int(sequence_checksum(a)) == int(sequence_checksum(a.clone()))
        True
        >>> int(sequence_checksum(a)) == int(sequence_checksum(b))
        False
    """
    h = None
    for t in tensors:
        v = t.reshape(-1).long()
        pos = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.long)
        part = ((v + 7) * pos).sum() + v.numel()
        h = part if h is None else h * _MIX + part
    if h is None:
        raise BatchError("sequence_checksum needs at least one tensor")
    return h


def tensor_fingerprint(*tensors: torch.Tensor) -> torch.Tensor:
    """A bitwise, order-sensitive int64 checksum of tensors of any dtype (no device sync).

    Floats are hashed by their bit patterns, so equal batches (same samples, same
    augmentation) give equal fingerprints on every rank and anything else almost surely not.

    Examples:
        >>> x = torch.randn(4, 3)
        >>> int(tensor_fingerprint(x)) == int(tensor_fingerprint(x.clone()))
        True
        >>> int(tensor_fingerprint(x)) == int(tensor_fingerprint(x + 1))
        False
    """
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    parts = []
    for t in tensors:
        t = t.detach().contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.is_floating_point() or t.is_complex():  # hash the bit patterns, exactly
            t = t.reshape(-1).view(as_int.get(t.element_size(), torch.uint8))
        parts.append(t.reshape(-1))
        parts.append(torch.tensor(list(t.shape) or [0], device=t.device))
    return sequence_checksum(*parts)


__all__ = ["BatchError", "IndexedDataset", "autocast", "model_device", "no_autocast", "sequence_checksum",
           "split_batch", "tensor_fingerprint", "to_device"]
