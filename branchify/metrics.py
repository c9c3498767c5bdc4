"""Evaluation metrics over a branched output: per-leaf accuracy, ensemble accuracy, peer diversity.

All functions accept a :class:`~branchify.outputs.BranchedOutput` or a list of per-leaf logits,
ignore positions labelled -100 (token-level outputs), and return Python floats for one batch.
To aggregate over a dataset, weight each batch by its number of (unmasked) positions.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .functional import IGNORE_INDEX
from .outputs import BranchedOutput

Logits = Union[BranchedOutput, Sequence[torch.Tensor]]


def _leaves(out: Logits, leaves: Sequence[int] | None = None) -> list[torch.Tensor]:
    logits = list(out.logits if isinstance(out, BranchedOutput) else out)
    if not logits:
        raise ValueError("no leaf logits given")
    if leaves is None:
        return logits
    bad = [k for k in leaves if not 0 <= k < len(logits)]
    if bad:
        raise ValueError(f"leaves {bad} are not leaf indices (0..{len(logits) - 1})")
    return [logits[k] for k in leaves]


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return float("nan")
    return float((pred[keep] == labels[keep]).sum()) / n


@torch.no_grad()
def leaf_accuracies(out: Logits, labels: torch.Tensor) -> list[float]:
    """Top-1 accuracy of every leaf, in leaf order.

    Examples:
        >>> z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
        >>> leaf_accuracies(z, torch.tensor([0]))
        [1.0, 0.0]
    """
    return [_accuracy(z.argmax(dim=-1), labels) for z in _leaves(out)]


@torch.no_grad()
def ensemble_probs(out: Logits, leaves: Sequence[int] | None = None) -> torch.Tensor:
    """Plain mean of the leaves' softmax probabilities (the -E deployment of ONE/TSA).

    Examples:
        >>> ensemble_probs([torch.zeros(1, 4), torch.zeros(1, 4)])
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    return torch.stack([F.softmax(z.float(), dim=-1) for z in _leaves(out, leaves)]).mean(dim=0)


@torch.no_grad()
def ensemble_accuracy(out: Logits, labels: torch.Tensor, leaves: Sequence[int] | None = None) -> float:
    """Top-1 accuracy of the mean of the leaves' probabilities (optionally over a subset of leaves).

    Examples:
        >>> z = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
        >>> ensemble_accuracy(z, torch.tensor([0]))
        1.0
    """
    return _accuracy(ensemble_probs(out, leaves).argmax(dim=-1), labels)


@torch.no_grad()
def peer_diversity(out: Logits, leaves: Sequence[int] | None = None, labels: torch.Tensor | None = None) -> float:
    """Mean pairwise L2 distance between leaves' softmax probabilities (OKDDip's "dist").

    Per position, the Euclidean distance ``||p_i - p_j||_2`` (T = 1) averaged over all pairs
    ``i < j`` of the chosen leaves, then averaged over positions (positions labelled -100 are
    skipped when ``labels`` is given). OKDDip reports it over the auxiliary peers only: pass
    ``leaves=`` without the leader for that.

    Examples:
        >>> peer_diversity([torch.tensor([[10.0, -10.0]]), torch.tensor([[-10.0, 10.0]])])  # doctest: +ELLIPSIS
        1.414...
    """
    probs = [F.softmax(z.float(), dim=-1) for z in _leaves(out, leaves)]
    if len(probs) < 2:
        raise ValueError("peer diversity needs at least two leaves")
    dists = [(probs[i] - probs[j]).norm(dim=-1) for i in range(len(probs)) for j in range(i + 1, len(probs))]
    per_position = torch.stack(dists).mean(dim=0)
    if labels is not None:
        per_position = per_position[labels != IGNORE_INDEX]
    if per_position.numel() == 0:
        return float("nan")
    return float(per_position.mean())
