"""MD's soft labels: per-sample softened predictions over a whole training set, and their
accuracy-weighted combination.

Soft labels are stored as one ``[N, C]`` table per peer, row ``i`` = training sample ``i``, so a
distillation batch reads its targets with the sample indices its loader yields. The loaders
therefore yield ``(inputs, labels, indices)``: a loader that also yields each sample's index
(``IndexedDataset`` below, or the recipes' ``TensorLoader(..., with_index=True)``) or
``DataLoader(IndexedDataset(dataset))``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from branchify.aggregators.accuracy_weighted import accuracy_weights  # noqa: F401  (MD's weight rule, re-exported)
from branchify.cohort import call_peer, peer_logits
from branchify.errors import BranchifyError

_MIX = 1_000_003
"""Multiplier of the positional checksums (a prime; int64 arithmetic wraps deterministically)."""


class SoftLabelError(BranchifyError, ValueError):
    """A loader or a set of soft labels that MD cannot use (says what the loader must yield)."""


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


def split_batch(batch: Any, *, need_index: bool = True) -> tuple[tuple, dict, torch.Tensor, torch.Tensor | None]:
    """``(args, kwargs, labels, indices)`` of a batch ``(inputs, labels[, indices])``.

    ``inputs`` is a tensor (one positional input), a tuple (positional inputs) or a dict
    (keyword inputs).

    Examples:
        >>> args, kwargs, y, idx = split_batch((torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([5, 9])))
        >>> len(args), idx.tolist()
        (1, [5, 9])
    """
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise SoftLabelError(f"a batch must be (inputs, labels, indices), got {type(batch).__name__}"
                             f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")
    if len(batch) == 2:
        if need_index:
            raise SoftLabelError(
                "MD reads its soft labels by training-sample index, but the loader yields (inputs, labels) "
                "without indices: wrap the dataset as DataLoader(branchify.soft_labels.IndexedDataset(dataset), ...) "
                "(or use a loader that yields (inputs, labels, indices), e.g. the recipes' TensorLoader(..., "
                "with_index=True))")
        inputs, labels, index = batch[0], batch[1], None
    else:
        inputs, labels, index = batch
    if isinstance(inputs, dict):
        return (), dict(inputs), labels, index
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}, labels, index
    return (inputs,), {}, labels, index


def to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """Move the tensors among ``args`` / ``kwargs`` to ``device`` (others pass through)."""
    def move(v: Any) -> Any:
        return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and v.device != device else v

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a stateless model."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


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
        raise SoftLabelError("sequence_checksum needs at least one tensor")
    return h


@dataclass
class SoftLabelPass:
    """One peer's predictions over the whole training set (eval mode, no augmentation).

    Attributes:
        probs: ``[N, C]`` float32, row ``i`` = ``softmax(z_i / T)`` of training sample ``i``.
        labels: ``[N]`` the labels by sample index (to check ranks hold the same data).
        accuracy: training accuracy in percent (argmax of the logits vs labels).
    """

    probs: torch.Tensor
    labels: torch.Tensor
    accuracy: float

    def labels_checksum(self) -> int:
        """Checksum of the labels in index order: equal on every rank iff the data sets agree."""
        return int(sequence_checksum(self.labels))


@torch.no_grad()
def compute_soft_labels(net: nn.Module, loader: Iterable, num_samples: int, temperature: float = 3.0, *,
                        amp_dtype: torch.dtype | None = None) -> SoftLabelPass:
    """Soft labels ``softmax(z / T)`` of ``net`` for every training sample, in eval mode.

    ``loader`` must yield ``(inputs, labels, indices)`` without augmentation and visit each of the
    ``num_samples`` samples exactly once (no ``drop_last``); the order does not matter. The net's
    train/eval mode is restored afterwards.

    Examples:
        >>> net = nn.Linear(4, 3)
        >>> data = [(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.arange(5))]
        >>> sl = compute_soft_labels(net, data, num_samples=5)
        >>> tuple(sl.probs.shape), torch.allclose(sl.probs.sum(1), torch.ones(5))
        ((5, 3), True)
    """
    if not temperature > 0:
        raise SoftLabelError(f"temperature must be > 0, got {temperature}")
    was_training = net.training
    device = model_device(net)
    net.eval()
    probs: torch.Tensor | None = None
    labels = torch.full((num_samples,), -1, dtype=torch.long, device=device)
    visits = torch.zeros(num_samples, dtype=torch.long, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    try:
        for batch in loader:
            args, kwargs, y, index = split_batch(batch)
            args, kwargs = to_device(args, kwargs, device)
            y, index = y.to(device), index.to(device).long()
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
                raise SoftLabelError(f"the loader yielded sample index {int(index.max())} (or a negative one) but "
                                     f"num_samples={num_samples}; indices must be 0..{num_samples - 1}")
            cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with cast:
                z = peer_logits(call_peer(net, args, kwargs))
            z = z.float()
            if probs is None:
                probs = torch.zeros(num_samples, z.shape[-1], device=device)
            probs[index] = torch.softmax(z / temperature, dim=-1)
            labels[index] = y.long()
            visits.index_add_(0, index, torch.ones_like(index))
            correct += (z.argmax(-1) == y).sum()
    finally:
        net.train(was_training)
    if probs is None:
        raise SoftLabelError("the soft-label loader yielded no batches")
    if not bool((visits == 1).all()):
        missing, repeated = int((visits == 0).sum()), int((visits > 1).sum())
        raise SoftLabelError(f"the soft-label loader must visit each of the {num_samples} training samples exactly "
                             f"once, but {missing} were never seen and {repeated} more than once; use a loader "
                             f"over the whole training set without shuffling-with-replacement or drop_last")
    return SoftLabelPass(probs=probs, labels=labels, accuracy=100.0 * int(correct) / num_samples)


def weighted_sum(probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i * probs_i``, accumulated in list order from zeros (the order a collective sum
    over ranks reproduces exactly for two peers, and to rounding for more).

    Examples:
        >>> weighted_sum([torch.ones(2, 2), torch.zeros(2, 2)], [0.25, 0.75])
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
    """
    if len(probs) != len(weights) or not probs:
        raise SoftLabelError(f"got {len(probs)} soft-label tables for {len(weights)} weights")
    out = torch.zeros_like(probs[0])
    for p, w in zip(probs, weights):
        if p.shape != out.shape:
            raise SoftLabelError(f"soft-label tables differ in shape: {tuple(p.shape)} vs {tuple(out.shape)}")
        out += p.to(out.device) * w
    return out
