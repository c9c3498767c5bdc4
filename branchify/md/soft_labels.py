"""MD's soft labels: per-sample softened predictions over a whole training set, and their
weighted sum (the weights are :func:`~branchify.aggregators.accuracy_weighted.accuracy_weights`,
combined over peers and ranks by :mod:`branchify.md.exchange`).

Soft labels are stored as one ``[N, C]`` table per peer, row ``i`` = training sample ``i``, so a
distillation batch reads its targets with the sample indices its loader yields. The loaders
therefore yield ``(inputs, labels, indices)``: the recipes' ``TensorLoader(..., with_index=True)``
or ``DataLoader(branchify.utils.IndexedDataset(dataset))``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..cohort import call_peer, peer_logits
from ..errors import BranchifyError
from ..utils import autocast, model_device, sequence_checksum, split_batch, to_device


class SoftLabelError(BranchifyError, ValueError):
    """A loader or a set of soft labels that MD cannot use (says what the loader must yield)."""


def indexed_batch(batch: Any, *, need_index: bool = True) -> tuple[tuple, dict, torch.Tensor, torch.Tensor | None]:
    """:func:`~branchify.utils.split_batch`, failing with MD's advice when the batch has no indices
    and ``need_index`` (soft labels are read by training-sample index).

    Examples:
        >>> args, kwargs, y, idx = indexed_batch((torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([5, 9])))
        >>> idx.tolist()
        [5, 9]
    """
    args, kwargs, labels, index = split_batch(batch)
    if need_index and index is None:
        raise SoftLabelError(
            "MD reads its soft labels by training-sample index, but the loader yields (inputs, labels) "
            "without indices: wrap the dataset as DataLoader(branchify.utils.IndexedDataset(dataset), ...) "
            "(or use a loader that yields (inputs, labels, indices), e.g. the recipes' TensorLoader(..., "
            "with_index=True))")
    return args, kwargs, labels, index


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
            args, kwargs, y, index = indexed_batch(batch)
            args, kwargs = to_device(args, kwargs, device)
            y, index = y.to(device), index.to(device).long()
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
                raise SoftLabelError(f"the loader yielded sample index {int(index.max())} (or a negative one) but "
                                     f"num_samples={num_samples}; indices must be 0..{num_samples - 1}")
            with autocast(device, amp_dtype):
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
