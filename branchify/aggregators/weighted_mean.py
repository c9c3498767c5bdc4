"""KDCL's generated soft targets beyond the plain mean: weighted logits (Linear) and per-class minimum (MinLogit)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets


def _as_weights(weights: Sequence[float]) -> torch.Tensor:
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or not len(weights):
        raise AggregatorError(f"weights must be a list with one number per leaf, got {weights!r}")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise AggregatorError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return (w / w.sum()).float()


class WeightedMean(Aggregator):
    """Teacher ``z_t = sum_k w_k z_k`` with fixed weights on the simplex; every leaf distils from it.

    KDCL-Linear (Guo et al., CVPR 2020, Sec. 3): the students' logits are combined with weights
    fitted on held-out data (:func:`fit_ensemble_weights` fits them; :meth:`set_weights`
    replaces them, e.g. once per epoch). Equal weights are :class:`~branchify.aggregators.Mean`.

    Default detach: ``True`` (the generated soft target is a constant, as in KDCL).

    Args:
        weights: one non-negative weight per leaf (normalised to sum to 1).
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> agg = WeightedMean([3, 1])
        >>> z = [torch.zeros(2, 4), torch.ones(2, 4)]
        >>> agg.weights.tolist(), agg(BranchedOutput(z, [None] * 2, [None] * 2)).kd[0].teacher[0, 0].item()
        ([0.75, 0.25], 0.25)
    """

    weights: torch.Tensor

    def __init__(self, weights: Sequence[float], detach: bool = True) -> None:
        super().__init__(detach=detach)
        w = _as_weights(weights)
        self.num_leaves = int(w.numel())
        self.register_buffer("weights", w)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Replace the weights (same number of leaves).

        Examples:
            >>> agg.set_weights(fit_ensemble_weights(val_logits, val_labels))     # doctest: +SKIP
        """
        w = _as_weights(weights)
        if w.numel() != self.weights.numel():
            raise AggregatorError(f"got {w.numel()} weights for {self.weights.numel()} leaves")
        self.weights.copy_(w.to(self.weights.device))

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        z = torch.stack(list(out.logits), dim=0)
        w = self.weights.to(dtype=z.dtype).view(-1, *[1] * (z.dim() - 1))
        teacher = (w * z).sum(dim=0)
        kd = [KDTerm(f"leaf{k}", teacher=teacher, student=zk, detach=self.detach) for k, zk in enumerate(out.logits)]
        return Targets(kd=kd, ce={})


class MinLogit(Aggregator):
    """KDCL-MinLogit (Guo et al., CVPR 2020, Sec. 3): teacher ``z_t[c] = min_k (z_k[c] - z_k[y])``.

    Each student's logits are shifted so its true-class logit is 0; per class the smallest shifted
    logit is kept, so the teacher puts the true class on top with the most cautious margins of the
    group. The teacher depends on the labels, which aggregators never see: each KD term carries the
    stacked logits with ``label_rule="min_logit"`` and the loss builds the teacher with the batch's
    labels (:func:`branchify.outputs.with_labels`). There is no public code of this variant.

    Default detach: ``True`` (a constant soft target, as KDCL's other ensembles).

    Args:
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput, with_labels
        >>> z = [torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 1.0, 3.0]])]
        >>> targets = with_labels(MinLogit()(BranchedOutput(z, [None] * 2, [None] * 2)), torch.tensor([0]))
        >>> targets.kd[0].teacher.tolist()
        [[0.0, -2.0, -1.0]]
    """

    def __init__(self, detach: bool = True) -> None:
        super().__init__(detach=detach)

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        z = torch.stack(list(out.logits), dim=0)
        kd = [KDTerm(f"leaf{k}", teacher=z, student=zk, detach=self.detach, label_rule="min_logit")
              for k, zk in enumerate(out.logits)]
        return Targets(kd=kd, ce={})


def fit_ensemble_weights(logits: Sequence[torch.Tensor], labels: torch.Tensor, *, steps: int = 200,
                         lr: float = 0.1) -> list[float]:
    """Weights on the simplex minimising ``CE(sum_k w_k z_k, y)`` over held-out logits (KDCL-Linear).

    ``w = softmax(a)``, ``a`` found by Adam from equal weights; returns python floats summing to 1.
    The paper fits its linear weights on a held-out split; its solver is not public.

    Examples:
        >>> y = torch.tensor([0, 1, 0, 1])
        >>> good, bad = torch.eye(2)[y] * 4, torch.zeros(4, 2)
        >>> w = fit_ensemble_weights([good, bad], y)
        >>> w[0] > 0.9
        True
    """
    z = torch.stack([t.detach().double() for t in logits], dim=0)
    if z.shape[1] != labels.shape[0]:
        raise AggregatorError(f"fit_ensemble_weights: {z.shape[1]} logit rows but {labels.shape[0]} labels")
    a = torch.zeros(z.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a], lr=lr)
    for _ in range(int(steps)):
        w = a.softmax(0).view(-1, *[1] * (z.dim() - 1))
        loss = F.cross_entropy((w * z).sum(0), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [float(v) for v in a.detach().softmax(0)]
