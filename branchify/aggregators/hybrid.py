"""OKDPH's teacher: the mean of the leaves' and the hybrid-weight model's logits."""
from __future__ import annotations

import torch

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets


class HybridTeacher(Aggregator):
    """Teacher ``z_t = mean(z_1, ..., z_N, z_h)`` over the N leaves and the hybrid ``z_h``
    (``out.hybrid``, from :class:`~branchify.hybrid.WeightFusion`); every leaf distils from it,
    ``KL(p_t || p_k)``, and the hybrid gets a cross-entropy (``ce/hybrid``).

    Official code ``tianlizhang/OKDPH@a562089``, ``src/OKDPH.py``: line 75
    ``stable_out = torch.stack(out_list).mean(dim=0).detach()`` (``out_list`` holds the students'
    and, last, the hybrid's logits); lines 76 and 82-86: ``CE(hybrid)`` and ``T^2 * KLDiv(batchmean)``
    of each student against ``stable_out``. Default detach: ``True`` (the code's ``.detach()``).

    Args:
        detach: default detach rule of the KD terms.
        include_hybrid: average the hybrid's logits into the teacher (the code); ``False``
            averages the leaves only.

    Examples:
        >>> z = [torch.randn(4, 10) for _ in range(2)]
        >>> h = BranchedOutput([torch.randn(4, 10)], [None], [None])
        >>> t = HybridTeacher()(BranchedOutput(z, [None] * 2, [None] * 2, hybrid=h))
        >>> [term.name for term in t.kd], list(t.ce)
        (['leaf0', 'leaf1'], ['hybrid'])
    """

    def __init__(self, detach: bool = True, include_hybrid: bool = True) -> None:
        super().__init__(detach=detach)
        self.include_hybrid = bool(include_hybrid)

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        if out.hybrid is None:
            raise AggregatorError("HybridTeacher reads the hybrid-weight model's logits (out.hybrid), but the model "
                                  "has none: attach one with branchify.hybrid.WeightFusion().attach(model) "
                                  "(bf.method('okdph', net) does)")
        z_h = out.hybrid.logits[0]
        members = [*out.logits, z_h] if self.include_hybrid else list(out.logits)
        teacher = torch.stack(members, dim=0).mean(dim=0)
        kd = [KDTerm(f"leaf{k}", teacher=teacher, student=z, detach=self.detach) for k, z in enumerate(out.logits)]
        return Targets(kd=kd, ce={"hybrid": z_h})
