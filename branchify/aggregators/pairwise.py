"""Pairwise peer distillation: every leaf learns from every other leaf (DML, TSA)."""
from __future__ import annotations

from ..outputs import BranchedOutput
from .base import Aggregator, KDTerm, Targets


class Pairwise(Aggregator):
    """Leaf k distils from each other leaf j with weight ``1/(K-1)``: ``KL(p_j || p_k) / (K-1)``.

    Default detach: ``True`` - peers are constants for each other (DML's paper and its
    TF/PyTorch code, TSA's "peers detached"). ``detach=False`` reproduces OKDDip's DML
    baseline, where gradient flows into the teaching peer too.

    Terms are named ``"leaf{k}<-leaf{j}"`` (student <- teacher).

    Args:
        detach: default detach rule of the KD terms.

    Examples:
        >>> import torch
        >>> from branchify.outputs import BranchedOutput
        >>> z = [torch.randn(4, 10) for _ in range(2)]
        >>> [t.name for t in Pairwise()(BranchedOutput(z, [None] * 2, [None] * 2)).kd]
        ['leaf0<-leaf1', 'leaf1<-leaf0']
    """

    def __init__(self, detach: bool = True) -> None:
        super().__init__(detach=detach)

    def forward(self, out: BranchedOutput) -> Targets:
        k_leaves = self._check_leaves(out, minimum=2)
        weight = 1.0 / (k_leaves - 1)
        kd = [KDTerm(f"leaf{k}<-leaf{j}", teacher=out.logits[j], student=out.logits[k],
                     weight=weight, detach=self.detach)
              for k in range(k_leaves) for j in range(k_leaves) if j != k]
        return Targets(kd=kd, ce={})
