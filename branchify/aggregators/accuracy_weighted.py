"""MD's accuracy-weighted ensemble: a fixed mixture of the leaves' softened probabilities."""
from __future__ import annotations

from typing import Sequence

import torch

from ..outputs import BranchedOutput
from .base import Aggregator, AggregatorError, KDTerm, Targets


def accuracy_weights(accuracies: Sequence[float]) -> list[float]:
    """MD's aggregation weights ``a_i = v_i / sum_k v_k`` (python floats, computed in float64) - the
    one accuracy-weight rule, used by this aggregator and by MD's soft labels.

    All-zero accuracies (e.g. untrained peers on a tiny set) give equal weights - the limit of
    the formula when every peer is equally (in)accurate.

    Examples:
        >>> accuracy_weights([60.0, 30.0, 10.0])
        [0.6, 0.3, 0.1]
        >>> accuracy_weights([0, 0])
        [0.5, 0.5]
    """
    v = [float(a) for a in accuracies]
    if not v:
        raise AggregatorError("accuracy_weights needs one accuracy per peer, got none")
    if any(a < 0 or a != a or a == float("inf") for a in v):
        raise AggregatorError(f"accuracies must be finite and >= 0, got {v}")
    total = sum(v)
    if total == 0:
        return [1.0 / len(v)] * len(v)
    return [a / total for a in v]


def _log_weights(accuracies: Sequence[float]) -> torch.Tensor:
    if isinstance(accuracies, (str, bytes)) or not hasattr(accuracies, "__len__"):
        raise AggregatorError(f"accuracies must be a list with one number per leaf, got {accuracies!r}")
    # log(0) = -inf is deliberate: a zero-accuracy peer gets zero weight in the logsumexp mixture.
    return torch.tensor(accuracy_weights(accuracies), dtype=torch.float64).log().float()


class AccuracyWeighted(Aggregator):
    """MD (Gao et al. 2019): teacher ``S_e = sum_i a_i softmax(z_i / T)``, ``a_i = v_i / sum_k v_k``.

    ``v_i`` are per-leaf accuracies (validation accuracy when available, else training
    accuracy), fixed until :meth:`set_accuracies` is called again (MD recomputes them at
    every distillation cycle). Because MD mixes *probabilities*, each KD term carries the
    stacked leaf logits as mixture components with ``teacher_log_weights = log a``; the loss
    evaluates ``log S_e`` at its own temperature with ``logsumexp`` (see
    :class:`~branchify.aggregators.base.KDTerm`). Every leaf distils from ``S_e``.

    Default detach: ``True`` - MD's soft labels are computed once per cycle, so they are
    constants during distillation.

    Args:
        accuracies: one accuracy (any non-negative scale) per leaf.
        detach: default detach rule of the KD terms.

    Examples:
        >>> from branchify.outputs import BranchedOutput
        >>> agg = AccuracyWeighted([0.7, 0.6, 0.5])
        >>> agg.weights
        tensor([0.3889, 0.3333, 0.2778])
        >>> len(agg(BranchedOutput([torch.randn(2, 10) for _ in range(3)], [None] * 3, [None] * 3)).kd)
        3
    """

    log_weights: torch.Tensor

    def __init__(self, accuracies: Sequence[float], detach: bool = True) -> None:
        super().__init__(detach=detach)
        log_w = _log_weights(accuracies)
        self.num_leaves = int(log_w.numel())
        self.register_buffer("log_weights", log_w)

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights ``a_i`` (sum to 1)."""
        return self.log_weights.exp()

    def set_accuracies(self, accuracies: Sequence[float]) -> None:
        """Replace the accuracies (same number of leaves), e.g. at the start of an MD cycle."""
        log_w = _log_weights(accuracies)
        if log_w.numel() != self.log_weights.numel():
            raise AggregatorError(f"got {log_w.numel()} accuracies for {self.log_weights.numel()} leaves")
        self.log_weights.copy_(log_w.to(self.log_weights.device))

    def forward(self, out: BranchedOutput) -> Targets:
        self._check_leaves(out)
        z = torch.stack(list(out.logits), dim=0)
        log_w = self.log_weights.to(dtype=z.dtype)
        kd = [KDTerm(f"leaf{k}", teacher=z, student=zk, detach=self.detach, teacher_log_weights=log_w)
              for k, zk in enumerate(out.logits)]
        return Targets(kd=kd, ce={})
