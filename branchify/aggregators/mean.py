"""Mean teacher: the plain average of the leaves' logits (CL-ILR, KDCL-style)."""
from __future__ import annotations

import torch

from ..outputs import BranchedOutput
from .base import Aggregator, KDTerm, Targets


class Mean(Aggregator):
    """Teacher ``z_t = (1/K) sum_k z_k``; every leaf distils from it: ``KL(p_t || p_k)``.

    Default detach: ``True`` - the teacher is a constant target (KDCL's reading, and CL-ILR's
    ``ensemble="mean"`` reading: docs/methods/cl_ilr.md). Pass ``detach=False`` to let each leaf's
    gradient also flow through the mean into the other leaves.

    Args:
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> z = [torch.randn(4, 10) for _ in range(3)]
        >>> t = Mean()(BranchedOutput(z, [None] * 3, [None] * 3))
        >>> [term.name for term in t.kd]
        ['leaf0', 'leaf1', 'leaf2']
    """

    def __init__(self, detach: bool = True) -> None:
        super().__init__(detach=detach)

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        teacher = torch.stack(list(out.logits), dim=0).mean(dim=0)
        kd = [KDTerm(f"leaf{k}", teacher=teacher, student=z, detach=self.detach)
              for k, z in enumerate(out.logits)]
        return Targets(kd=kd, ce={})
