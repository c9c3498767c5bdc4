"""MD's per-batch loss: cross-entropy alone in the independent phase, ``alpha * CE + beta * KL``
against the fixed soft labels ``S_e`` in the distillation phase (the paper's Eq. 9), and the
error raised for an inconsistently configured MD run."""
from __future__ import annotations

import torch

from ..errors import BranchifyError
from ..functional import cross_entropy, kl_div_probs
from ..online_kd import LossOutput
from ..schedules import IntervalPhase


class MDError(BranchifyError, ValueError):
    """An MD run configured inconsistently (optimisers, loaders, checkpoints); says what to change."""


def md_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_probs: torch.Tensor | None,
            phase: IntervalPhase | None, temperature: float = 3.0, *, kd_t2: bool = False) -> LossOutput:
    """One peer's MD loss for a batch: CE alone, or ``alpha * CE + beta * KL(S_e || p^T)`` (Eq. 9).

    Args:
        logits: the peer's logits ``[B, C]``.
        labels: integer labels ``[B]``.
        teacher_probs: the batch's rows of the fixed ``S_e`` (``None`` outside distillation).
        phase: where the epoch falls in the interval schedule (``None`` = independent baseline).
        temperature: ``t`` of the student's softening (``S_e`` was computed with the same).
        kd_t2: multiply the KL by ``t^2`` (the other methods' convention); default off, as in
            the paper's Eq. 9.

    Examples:
        >>> from branchify.schedules import IntervalSchedule
        >>> z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> phase = IntervalSchedule(1, 4)(3)          # r = 2: alpha 0.5, beta 1.5
        >>> out = md_loss(z, y, torch.softmax(z / 3, -1), phase)
        >>> round(float(out.parts["alpha"]), 2), abs(float(out.parts["kd"])) < 1e-6
        (0.5, True)
    """
    ce = cross_entropy(logits, labels)
    parts: dict[str, torch.Tensor] = {"ce": ce.detach()}
    if phase is None or not phase.distill:
        parts.update(alpha=torch.tensor(1.0), beta=torch.tensor(0.0))
        return LossOutput(total=ce, parts=parts)
    if teacher_probs is None:
        raise MDError(f"epoch is in a distillation phase ({phase}) but no soft labels were given")
    kd = kl_div_probs(teacher_probs, logits, temperature)
    if not kd_t2:
        kd = kd / (temperature * temperature)
    parts.update(kd=kd.detach(), alpha=torch.tensor(phase.alpha), beta=torch.tensor(phase.beta))
    return LossOutput(total=phase.alpha * ce + phase.beta * kd, parts=parts)
