"""Peer-mean teacher: each leaf learns from the mean of the *other* leaves' logits (CL-ILR, DML)."""
from __future__ import annotations

import torch

from ..outputs import BranchedOutput
from .base import Aggregator, KDTerm, Targets


class PeerMean(Aggregator):
    """Teacher of leaf k: ``t_k = (1/(K-1)) sum_{j != k} z_j``; every leaf distils ``KL(p_{t_k} || p_k)``.

    This is CL-ILR as its only public code computes it (OKDDip's re-implementation,
    ``DefangChen/OKDDip@c6a05de: models/model_cifar/resnet_one.py`` lines 236-247 with
    ``train_one.py --avg --bpscale``): the mean of the other K-1 branches' logits, no
    cross-entropy on the teacher, and the teacher **not detached**, so each leaf is also pulled
    towards the leaves that teach it. It is also OKDDip's default DML ("ensemble first",
    ``train_DML.py`` lines 100-106) for any number of peers.

    Paper vs code: CL-ILR's paper describes an average teacher without saying whether the
    student is in it; :class:`~branchify.aggregators.Mean` (all K leaves, detached) is that other
    reading - about (K-1)/K of the pull for the same student.

    Default detach: ``False`` (the authors' code); ``True`` makes every teacher a constant.

    Args:
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> z = [torch.full((1, 2), float(v)) for v in (0, 3, 6)]
        >>> [t.teacher[0, 0].item() for t in PeerMean()(BranchedOutput(z, [None] * 3, [None] * 3)).kd]
        [4.5, 3.0, 1.5]
    """

    def __init__(self, detach: bool = False) -> None:
        super().__init__(detach=detach)

    def forward(self, out: BranchedOutput) -> Targets:
        k_leaves = self._check_leaves(out, minimum=2)
        total = torch.stack(list(out.logits), dim=0).sum(dim=0)
        kd = [KDTerm(f"leaf{k}", teacher=(total - z) / (k_leaves - 1), student=z, detach=self.detach)
              for k, z in enumerate(out.logits)]
        return Targets(kd=kd, ce={})
