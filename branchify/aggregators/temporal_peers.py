"""Temporal-mean teachers as KD terms: each leaf learns from the EMA copies of its peers (PCL)."""
from __future__ import annotations

from typing import Literal

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets

WHOSE = ("others", "own", "all")


class PeerTemporalMean(Aggregator):
    """KD from the temporal means: ``sum_{j in S(k)} (1/|S(k)|) KL(p~_j || p_k)`` for every leaf ``k``.

    ``p~_j`` is leaf j of the model's temporal-mean (EMA) copy on the same inputs - ``out.temporal``,
    filled by a :class:`~branchify.temporal.TemporalMean` attached to the model (constants: the copy
    runs without gradient). ``whose`` picks the teachers ``S(k)``:

    - ``"others"`` (default): the other leaves' temporal means, PCL's "peer mean teacher"
      (``shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation@6afb473``,
      ``src/losses/kd_loss.py`` lines 29-41 ``PMLoss``: the mean over the given targets of
      ``KDLoss(pred, target.detach())``; ``src/losses/loss_wrapper.py`` lines 47, 52, 57 pass peer
      ``k`` the two other peers' mean-model outputs);
    - ``"own"``: the leaf's own temporal mean (a mean teacher per leaf);
    - ``"all"``: every leaf's temporal mean, its own included.

    Terms are named ``"leaf{k}<-mean{j}"``. Works on any tree or cohort with at least two leaves
    (one for ``"own"``).

    Args:
        whose: ``"others"``, ``"own"`` or ``"all"``.

    Examples:
        >>> import torch
        >>> from branchify.outputs import BranchedOutput
        >>> z = [torch.randn(2, 4) for _ in range(3)]
        >>> out = BranchedOutput(z, [None] * 3, [None] * 3, temporal=BranchedOutput(z, [None] * 3, [None] * 3))
        >>> [(t.name, round(t.weight, 2)) for t in PeerTemporalMean()(out).kd][:2]
        [('leaf0<-mean1', 0.5), ('leaf0<-mean2', 0.5)]
    """

    def __init__(self, whose: Literal["others", "own", "all"] = "others") -> None:
        super().__init__(detach=True)
        if whose not in WHOSE:
            raise AggregatorError(f"PeerTemporalMean(whose={whose!r}) is unknown; choose one of {list(WHOSE)}")
        self.whose = whose

    def teachers(self, k: int, num_leaves: int) -> list[int]:
        """The leaves whose temporal means teach leaf ``k``."""
        if self.whose == "own":
            return [k]
        return [j for j in range(num_leaves) if self.whose == "all" or j != k]

    def forward(self, out: BranchedOutput) -> Targets:
        n = self._check_leaves(out, minimum=1 if self.whose == "own" else 2)
        if out.temporal is None:
            raise AggregatorError("PeerTemporalMean teaches with the model's temporal-mean copy, but out.temporal is "
                                  "None: attach one first - branchify.TemporalMean(decay=0.999).attach(model) - or "
                                  "use bf.method('pcl', ...), which attaches it")
        if out.temporal.num_leaves != n:
            raise AggregatorError(f"out.temporal has {out.temporal.num_leaves} leaves but the output has {n}")
        kd: list[KDTerm] = []
        for k, z in enumerate(out.logits):
            js = self.teachers(k, n)
            kd.extend(KDTerm(f"leaf{k}<-mean{j}", teacher=out.temporal.logits[j], student=z, weight=1.0 / len(js),
                             detach=True) for j in js)
        return Targets(kd=kd, ce={})
